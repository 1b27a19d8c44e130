"""The batched executor's SSD tier (gpu/batched_ssd.py) on CPU with tiny models, GQA and MHA: histories saved
to session files and read back through the pinned staging slots give the logits of a one-pass recompute,
turn after turn; poisoned staging never reaches a result; the step records count the SSD's bytes; and the
validation's cost executor prices an SSD hit from the profile's SSD table, as the simulator does."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from gpu.batched import BatchedExecutor, block_table, random_model, reference_logits, serve_sessions
from gpu.model import TINY
from gpu.tp_layer import TINY_GQA
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest

from tiny_batched import BT, FakeClock, ids, run_checked


@pytest.fixture(scope="module", params=["gqa", "mha"])
def model(request):
    # TINY_GQA: 2 layers, 8 query heads over 4 KV heads; TINY: 4 layers, 4 heads each with its own KV (LLaMA-2)
    shape = TINY_GQA if request.param == "gqa" else TINY
    return random_model(shape, 512, "cpu", torch.float32, seed=5)


def ssd_executor(model, tmp_path, num_blocks=40, **kw):
    """A poisoned executor on the SSD tier with a read buffer of one layer (every staging slot is reused
    within a step), and a scheduler without prefix caching: histories come back from the SSD only."""
    ex = BatchedExecutor(model, num_blocks=num_blocks, block_tokens=BT, poison=True, ssd_dir=tmp_path,
                         read_buffer_layers=1, ssd_staging_blocks=2, **kw)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=num_blocks, max_num_batched_tokens=64,
                                           block_tokens=BT, prefix_caching=False), external_hit=ex.external_tokens)
    return ex, sched


def step_checked(ex, sched, saved):
    """One scheduled step, every request's logits checked against a recompute; finished requests saved."""
    plan, out, tables = run_checked(ex, sched)
    for r in sched.update(plan):
        saved[r] = ex.save(r, tables[r], r.num_computed_tokens)
    return plan, out


def serve_turns(ex, sched, sessions, turns=3, prompt=5, output=4):
    """Each session's turns one after the other (every session's turn k admitted together): returns the
    external (SSD) tokens each request was admitted with, and the tokens each save wrote."""
    hist = {s: [] for s in sessions}
    for s in sessions:
        ex.open_session(s, 200)
    ext, saved = {}, {}
    for k in range(turns):
        reqs = {}
        for j, s in enumerate(sessions):
            r = SeqRequest((s, k), len(hist[s]) + prompt, output, lambda i, s=s: (s, i))
            ex.add(r, hist[s] + ids(100 * k + j, prompt), session=s)
            sched.add_request(r)
            reqs[s] = r
        while sched.has_unfinished():
            plan, _ = step_checked(ex, sched, saved)
            for r, n in plan.external.items():
                ext[r.id] = n
        for s, r in reqs.items():
            hist[s] = ex.forget(r)
    ex.drain()
    return ext, saved


@pytest.mark.parametrize("layerwise,graphs", [(True, False), (False, True)])
def test_histories_read_back_from_the_ssd_equal_recompute_turn_after_turn(model, tmp_path, layerwise, graphs):
    """Layer-wise loads (eager) and load-first (the static step), three turns: each turn's history comes
    back from the session's file, every whole block the turns before computed."""
    ex, sched = ssd_executor(model, tmp_path, layerwise=layerwise, decode_graphs=graphs)
    ext, saved = serve_turns(ex, sched, ["s"])
    # turn 0: 5 + 4 tokens, 8 with KV (its last reply token has none): 2 blocks of 4 saved; turn 1 holds
    # 9 + 5 tokens, 17 computed: blocks 2-3 appended; turn 2 reads 4 blocks
    assert ext == {("s", 1): 8, ("s", 2): 16}
    assert [saved[r] for r in sorted(saved, key=lambda r: r.id)] == [8, 8, 8]
    assert ex.ssd.saved["s"] == 6


def test_two_sessions_loaded_in_one_step_equal_recompute(model, tmp_path):
    """Both sessions' turns admitted together: one step reads both histories into one staging slot."""
    ex, sched = ssd_executor(model, tmp_path)
    ext, _ = serve_turns(ex, sched, ["a", "b"], turns=2)
    assert ext == {("a", 1): 8, ("b", 1): 8}


def test_a_short_ssd_read_is_caught_by_the_poison(model, tmp_path, monkeypatch):
    """The checks above can fail: a read one block short leaves NaN staging, which reaches the logits."""
    from gpu.kvstore import DiskStore
    orig = DiskStore.read_layer

    def short(self, f, layer, tokens, buf, first_token=0):
        return orig(self, f, layer, tokens - BT, buf, first_token)
    monkeypatch.setattr(DiskStore, "read_layer", short)
    ex, sched = ssd_executor(model, tmp_path)
    with pytest.raises(AssertionError, match="NaN logits"):
        serve_turns(ex, sched, ["s"], turns=2)


def test_a_session_file_holds_each_layers_blocks_k_then_v(model, tmp_path):
    ex, sched = ssd_executor(model, tmp_path)
    ex.open_session("s", 40)
    r = SeqRequest(("s", 0), 9, 3, lambda i: ("s", i))
    ex.add(r, ids(7, 9), session="s")
    sched.add_request(r)
    saved = {}
    tables = None
    while sched.has_unfinished():
        plan = sched.schedule()
        tables = block_table(r)
        ex.run(plan)
        if sched.update(plan):
            saved[r] = ex.save(r, tables, r.num_computed_tokens)
    ex.drain()
    assert saved[r] == 8   # 11 computed tokens: blocks 0 and 1
    s = ex.shape
    f = ex.ssd.files["s"]
    raw = np.fromfile(f.path, dtype=np.float32)
    stride = f.layer_stride_bytes // 4
    for li in range(s.layers):
        got = torch.from_numpy(raw[li * stride:li * stride + 2 * 2 * BT * s.kv_heads * s.head_dim].copy())
        got = got.view(2, 2, BT, s.kv_heads, s.head_dim)
        for j in range(2):
            assert torch.equal(got[j, 0], ex.k[li, tables[j]]) and torch.equal(got[j, 1], ex.v[li, tables[j]])


def test_step_records_report_the_ssd_bytes_read_and_written(tmp_path):
    model = random_model(TINY_GQA, 512, "cpu", torch.float32, seed=5)
    ex, sched = ssd_executor(model, tmp_path, num_blocks=60)
    sessions = {"a": [(0.0, math.nan, 9, 4), (math.nan, 0.5, 6, 3)]}
    clk = FakeClock()
    res = serve_sessions(ex, sched, sessions, clock=clk, sleep=clk.sleep)
    a0, a1 = sorted(res.turns, key=lambda t: t.turn)
    assert (a0.saved_tokens, a1.ext_tokens) == (12, 12)
    # per token and layer: K and V of 4 KV heads x 8 dims in float32 = 256 bytes; 2 layers
    loads = [s for s in res.steps if s.ssd_read_bytes]
    assert [(s.ssd_read_tokens, s.ssd_read_bytes, s.ext_tokens) for s in loads] == [(12, 12 * 2 * 256, 12)]
    assert loads[0].ssd_read_ms > 0
    # turn 0 wrote its 3 whole blocks after its last step; turn 1 (13 + 6 tokens, 21 computed) blocks 3-4
    writes = [(s.step, s.ssd_write_tokens, s.ssd_write_bytes) for s in res.steps if s.ssd_write_bytes]
    assert [w[1:] for w in writes] == [(12, 12 * 512), (8, 8 * 512)]
    assert all(s.finished for s in res.steps if s.ssd_write_bytes)


# ---- the simulator's price of an SSD hit (gpu/batched_validate.py) ---------------------------------------

def profile_cost(contention=None):
    """small_profile's llama2-7b (SSD 3 GB/s read, 2 GB/s write; H2D 25 GB/s at 1 MiB), every prefill layer
    0.1 ms, so a step's price is its loads by hand."""
    from profiles import small_profile
    from sim.costmodel import ProfileCost, parse_profile
    from sim.models import MODELS
    raw = small_profile()
    raw["models"]["llama2-7b"]["prefill_layer_ms"]["ms"] = [[0.1, 0.1], [0.1, 0.1]]
    return ProfileCost(MODELS["llama2-7b"], parse_profile(raw, "test"), ssd_contention=contention)


def test_a_simulated_ssd_hit_is_priced_from_the_profiles_ssd_table():
    from gpu.batched_validate import simulate_sessions, steps_frame, turns_frame
    # a: 64-token prompt, 2 replies (4 blocks of 16 saved), its next turn 1 s later; b's 90 + 2 tokens take
    # all 6 KV blocks in between, so a's history is no longer cached in HBM and comes back from the SSD
    trace = pd.DataFrame({"session_id": ["a", "a", "b"], "turn": [0, 1, 0], "arrival_s": [0.0, math.nan, 0.5],
                          "think_s": [math.nan, 1.0, math.nan], "prompt_tokens": [64, 4, 90],
                          "output_tokens": [2, 2, 2]})
    res = simulate_sessions(profile_cost(), trace, "ssd", num_blocks=6, block_tokens=16)
    t = turns_frame(res).set_index(["session_id", "turn"])
    assert (t.loc[("a", 1), "hit_tokens"], t.loc[("a", 1), "ext_tokens"]) == (0, 64)
    # llama2-7b holds 16 KiB a token a layer: 64 tokens are 1 MiB per layer, read at 3 GB/s (slower than
    # H2D's 25 GB/s): 0.349525 ms a layer, 32 layers pipelined with 0.1 ms of compute each (N = 2), then the
    # LM head (0.4 ms)
    load = 1048576 / 3e9
    assert t.loc[("a", 1), "ttft_s"] == pytest.approx(32 * load + 0.1e-3 + 0.4e-3, rel=1e-9)
    st = steps_frame(res)
    assert st.ssd_read_bytes.sum() == 64 * 32 * 16384
    # a's 4 blocks and b's 5 (91 computed tokens); a's turn 1 computed 71 tokens: no whole block beyond the 4 saved
    assert st.ssd_write_tokens.sum() == 64 + 80


def test_a_step_reading_while_a_save_is_written_is_priced_slower():
    """predict_steps replays the SSD's links on the measured clock: step 0's finish queues a 64-token write
    at t = 0 (32 requests of 1 MiB at 2 GB/s, 16.8 ms), step 1 reads 64 tokens at t = 0 under the interleaved
    contention model: each of its 32 read requests (0.3495 ms alone) also waits for half a write request
    (0.2621 ms), the write backlog outlasting them all."""
    from gpu.batched_validate import predict_steps
    steps = pd.DataFrame({"start_s": [-0.01, 0.0], "end_s": [0.0, 0.02], "chunks": ["8:0", "6:64"],
                          "decodes": [0, 0], "decode_ctx": [0, 0], "ext": ["", "64"], "wall_ms": [10.0, 20.0],
                          "gpu_ms": [10.0, 20.0], "chunk_tokens": [8, 6], "ssd_read_bytes": [0, 64 * 32 * 16384],
                          "ssd_write_tokens": [64, 0]})
    pred = predict_steps(steps, profile_cost("interleaved"))
    load = 1048576 / 3e9 + 1048576 / 2e9 / 2
    assert pred.pred_ms.iloc[1] == pytest.approx((32 * load + 0.1e-3 + 0.4e-3) * 1e3, rel=1e-9)
    alone = predict_steps(steps.assign(ssd_write_tokens=[0, 0]), profile_cost("interleaved"))
    assert alone.pred_ms.iloc[1] == pytest.approx((32 * 1048576 / 3e9 + 0.5e-3) * 1e3, rel=1e-9)


def test_the_ssd_runs_simulator_settings_read_every_saved_history_from_the_ssd():
    """SIM_OVERRIDES["ssd"] under the chunked engine (sim/engine.py ChunkedReplica): no DRAM, so turn 0's
    saved KV lands on the SSD, and turn 1 reads what HBM's prefix cache lacks (the 20th block: turn 0's 320
    tokens left 19 whole blocks cached) from it, priced as CostExecutor prices it: SSD -> DRAM -> HBM per
    layer in the preload pipeline, alone on the disk after a 50 s think time."""
    from gpu.batched_validate import SIM_OVERRIDES
    from sim.config import load_config
    from sim.costmodel import build_cost_model
    from sim.runner import run_simulation
    from sim.workload import load_workload
    df = pd.DataFrame([
        dict(session_id="a", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=300, output_tokens=20),
        dict(session_id="a", turn=1, arrival_s=np.nan, think_s=50.0, prompt_tokens=100, output_tokens=10)])
    cfg = load_config({}, {"model": "llama2-7b", "scheduler.kind": "chunked", **SIM_OVERRIDES["ssd"]})
    t = run_simulation(cfg, load_workload(cfg, df)).turns.set_index("turn")
    cm = build_cost_model(cfg)
    load = cm.history_load_layer_s(0.0, 16 * cm.shape.kv_bytes_per_token_layer, 1.0)
    assert load > cm.history_load_layer_s(16 * cm.shape.kv_bytes_per_token_layer)   # slower than from DRAM
    assert t.loc[1, "hit_tier"] == "ssd"
    assert t.loc[1, "ttft_s"] == pytest.approx(cm.iteration([(100, 320)], 0, 0.0, load, 2, True).total_s)


# ---- the CUDA branch: with fake streams and events on CPU, and for real where CUDA is present ----------

class FakeEvent:
    def __init__(self, *a, **k):
        self.recorded = 0

    def record(self, stream=None):
        self.recorded += 1

    def synchronize(self):
        assert self.recorded, "synchronize on an event never recorded"


class FakeStream:
    def __init__(self, *a, **k):
        self.waited = []

    def wait_event(self, ev):
        assert ev.recorded, "a stream waits for an event never recorded"
        self.waited.append(ev)

    def wait_stream(self, other):
        pass


def test_the_cuda_branch_stages_each_layer_through_the_device_slot_after_its_gate(tmp_path, monkeypatch):
    """The tier's CUDA path (writer stream, events, the load stream's per-layer gate and device staging) run
    on CPU with torch.cuda's streams and events faked, as run 17's lost graphs taught (an attribute error
    there would first show on the device): the loaded blocks hold what was saved, and with a read buffer
    of one layer the load of layer 1 waited for layer 0's compute."""
    import contextlib
    from gpu.batched_ssd import SsdTier
    for name, fake in (("Event", FakeEvent), ("Stream", FakeStream), ("stream", lambda s: contextlib.nullcontext()),
                       ("set_device", lambda d: None)):
        monkeypatch.setattr(torch.cuda, name, fake)
    L, bt, K, D = 2, 4, 2, 8
    tier = SsdTier(tmp_path, L, bt, K, D, torch.float32, "cpu", read_buffer_layers=1, poison=True,
                   staging_blocks=1)
    tier.cuda, tier.write_stream = True, FakeStream()
    tier.open_session("s", 20)
    kv = torch.randn(L, 3, 2, bt, K, D)
    ready = FakeEvent()
    ready.record()
    assert tier.save("s", kv, 0, ready) == 12
    tier.drain()
    assert tier.write_stream.waited == [ready]
    k = torch.full((L, 10, bt, K, D), float("nan"))
    v = k.clone()
    idx = torch.tensor([7, 4])
    ev_load = [FakeEvent() for _ in range(2 * L)]
    ev_comp = [FakeEvent() for _ in range(L)]
    ls = FakeStream()
    issue = tier.start_load([("s", 1, 2)], idx, k, v, ev_load, ev_comp, ls, True, FakeStream())
    issue(0)
    ev_comp[0].record()   # layer 0's compute, issued before layer 1's load
    issue(1)
    tier.join()
    assert ls.waited == [ev_comp[0]] and all(e.recorded == 1 for e in ev_load)
    for li in range(L):
        assert torch.equal(k[li, [7, 4]], kv[li, 1:, 0]) and torch.equal(v[li, [7, 4]], kv[li, 1:, 1])
    assert torch.isnan(k[:, [0, 1, 2, 3, 5, 6, 8, 9]]).all()
    io = tier.take_io()
    assert (io["ssd_read_tokens"], io["ssd_write_tokens"]) == (8, 12)
    tier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layerwise", [True, False])
def test_cuda_histories_read_back_from_the_ssd_equal_recompute(tmp_path, layerwise):
    """On the GPU (bf16; load-first steps as captured graphs): every row within 2% of a one-pass recompute."""
    m = random_model(TINY_GQA, 512, "cuda", torch.bfloat16, seed=5)
    ex = BatchedExecutor(m, num_blocks=40, block_tokens=16, poison=True, ssd_dir=tmp_path, read_buffer_layers=1,
                         layerwise=layerwise)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=40, max_num_batched_tokens=256, block_tokens=16,
                                           prefix_caching=False), external_hit=ex.external_tokens)
    ex.open_session("s", 400)
    hist, loaded = [], 0
    for k in range(3):
        r = SeqRequest(("s", k), len(hist) + 37, 20, lambda i: ("s", i))
        ex.add(r, hist + ids(200 + k, 37), session="s")
        sched.add_request(r)
        while sched.has_unfinished():
            plan = sched.schedule()
            tables = {q: block_table(q) for q, _, _ in plan.scheduled}
            known = {q: list(ex.tokens[q]) for q, _, _ in plan.scheduled}
            out = ex.run(plan, keep_logits=True)
            loaded += out.ext_tokens
            for row, (q, n, _) in enumerate(plan.scheduled):
                last = q.num_computed_tokens + n - 1
                ref = reference_logits(m, known[q][:last + 1])[last]
                assert torch.isfinite(out.logits[row]).all()
                assert (out.logits[row] - ref).norm() / ref.norm() < 2e-2
            for q in sched.update(plan):
                ex.save(q, tables[q], q.num_computed_tokens)
        hist = ex.forget(r)
    ex.drain()
    assert loaded == 48 + 112   # turn 0: 56 computed tokens, 3 blocks of 16; turn 1: 113 computed, 7 blocks
    ex.use_ssd(None)
