import math

import pytest
import yaml

from sim.config import load_config
from sim.costmodel import (CostModel, PrefillPadding, ProfileCost, RooflineCost, build_cost_model, interp2,
                           parse_profile, preload_pipeline_s)
from sim.errors import KvsimError
from sim.models import MODELS

from profiles import small_profile


def test_preload_pipeline_is_paced_by_the_slower_stage():
    # 4 layers, load 2 ms, compute 1 ms, double buffer: 2 + 1 + 3*2 = 9 ms
    assert preload_pipeline_s(4, 2.0, 1.0, 2, True) == pytest.approx(9.0)
    # compute-bound: first load then 4 computes: 1 + 4*2 = 9 ... = 1 + 2 + 3*2
    assert preload_pipeline_s(4, 1.0, 2.0, 2, True) == pytest.approx(9.0)
    # one buffer slot or no layer-wise preload: nothing overlaps
    assert preload_pipeline_s(4, 2.0, 1.0, 1, True) == pytest.approx(12.0)
    assert preload_pipeline_s(4, 2.0, 1.0, 8, False) == pytest.approx(12.0)
    assert preload_pipeline_s(4, 0.0, 1.0, 2, True) == pytest.approx(4.0)


def _maxplus(layers, l, c, n):
    """Reference recursion of the pipeline, layer by layer."""
    load_end, comp_end = [], []
    for i in range(layers):
        start = max(load_end[-1] if load_end else 0.0, comp_end[i - n] if i - n >= 0 else 0.0)
        load_end.append(start + l)
        comp_end.append(max(load_end[i], comp_end[-1] if comp_end else 0.0) + c)
    return comp_end[-1]


@pytest.mark.parametrize("l,c,n", [(2, 1, 2), (1, 2, 2), (3, 1, 4), (1, 1, 2), (0.5, 3, 3), (2, 1, 1)])
def test_closed_form_pipeline_matches_layer_by_layer_recursion(l, c, n):
    assert preload_pipeline_s(40, l, c, n, True) == pytest.approx(_maxplus(40, l, c, n))


def test_roofline_prefill_is_compute_bound_and_counts_attention_over_history():
    m = MODELS["llama2-7b"]
    rc = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3)
    flops = 2 * m.params_per_layer * 1000 + 4 * m.hidden * 1000 * (3000 + 1001 / 2)
    assert rc.prefill_layer_s(1000, 3000) == pytest.approx(flops / 50e12)


def test_roofline_decode_is_bandwidth_bound():
    m = MODELS["llama2-7b"]
    rc = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3)
    layer_bytes = m.params_per_layer * 2 + m.kv_bytes_per_token_layer * 8000
    head = m.vocab * m.hidden * 2
    assert rc.decode_step_s(8, 8000) == pytest.approx((m.layers * layer_bytes + head) / 1e12)


def test_bilinear_interpolation_is_exact_on_planes_and_extrapolates():
    xs, ys = (0.0, 10.0), (0.0, 100.0)
    z = ((1.0, 2.0), (3.0, 4.0))  # z = 1 + 0.2 x + 0.01 y
    assert interp2(xs, ys, z, 5, 50) == pytest.approx(1 + 1 + 0.5)
    assert interp2(xs, ys, z, 20, 0) == pytest.approx(1 + 4)


def test_measured_profile_replaces_the_roofline():
    prof = parse_profile(small_profile())
    pc = ProfileCost(MODELS["llama2-7b"], prof)
    assert pc.prefill_layer_s(1000, 1000) == pytest.approx(3.0e-3)
    assert pc.decode_step_s(8, 8 * 1000) == pytest.approx((32 * 0.9 + 0.6) * 1e-3)
    # links interpolate in log(chunk size): halfway in log space
    assert pc.h2d_bw(math.sqrt(1024 * 1048576)) == pytest.approx(15e9)


def test_config_naming_a_profile_uses_it(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(small_profile()))
    cm = build_cost_model(load_config({"model": "llama2-7b", "hardware_profile": str(p)}))
    assert isinstance(cm, ProfileCost)
    assert isinstance(build_cost_model(load_config({"model": "llama2-7b"})), RooflineCost)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(schema="v0"), "schema: expected"),
    (lambda d: d["links"].pop("h2d_pinned"), "links.h2d_pinned: missing"),
    (lambda d: d["models"]["llama2-7b"]["prefill_layer_ms"].update(ms=[[1.0]]), "prefill_layer_ms.ms: expected 2 rows"),
    (lambda d: d["links"]["d2h_pinned"].update(chunk_bytes=[5, 1]), "chunk_bytes: expected strictly ascending"),
    (lambda d: d.update(prefill_padding={"new_tokens": [64, 32], "context_multiple": 256}),
     "prefill_padding.new_tokens: expected strictly ascending"),
    (lambda d: d.update(prefill_padding={"new_tokens": [32, 64], "context_multiple": 0}),
     "prefill_padding.context_multiple: expected an integer >= 1"),
    (lambda d: d.update(decode_padding={"context_multiple": 0}), "decode_padding.context_multiple: expected an integer >= 1"),
    (lambda d: d.update(decode_padding={}), "decode_padding.context_multiple: missing"),
    (lambda d: d["models"]["llama2-7b"].update(host_turn_ms=-0.1), "llama2-7b.host_turn_ms: expected a number >= 0"),
    (lambda d: d["models"]["llama2-7b"].update(preload_gate_layer_ms="x"), "preload_gate_layer_ms: expected a number"),
    (lambda d: d["ssd"].update(contention="yes"), "ssd.contention: expected one of none, even_split, interleaved"),
    (lambda d: d["models"]["llama2-7b"].update(host_turn_msx=0.5), "models.llama2-7b.host_turn_msx: unknown key"),
    (lambda d: d.update(ssd_contention="none"), "ssd_contention: unknown key"),
    (lambda d: d["models"]["llama2-7b"].update(decode_after_prefill_ms={"prefill_ms": [1.0, 5.0], "ms": [0.5, -1.0], "steps": 3}),
     "decode_after_prefill_ms.ms: expected finite values >= 0"),
    (lambda d: d["models"]["llama2-7b"].update(decode_after_prefill_ms={"prefill_ms": [5.0, 1.0], "ms": [0.5, 1.0], "steps": 3}),
     "decode_after_prefill_ms.prefill_ms: expected strictly ascending"),
    (lambda d: d["models"]["llama2-7b"].update(decode_after_prefill_ms={"ms": [0.5]}),
     "decode_after_prefill_ms.prefill_ms: missing"),
    (lambda d: d["models"]["llama2-7b"].update(decode_after_prefill_ms={"prefill_ms": [5.0], "ms": [0.5]}),
     "decode_after_prefill_ms.steps: missing"),
    (lambda d: d["models"]["llama2-7b"].update(decode_after_prefill_ms={"prefill_ms": [5.0], "ms": [0.5], "steps": 0}),
     r"decode_after_prefill_ms.steps: expected an integer >= 1"),
])
def test_bad_profile_names_the_key(mutate, fragment):
    d = small_profile()
    mutate(d)
    with pytest.raises(KvsimError, match=fragment):
        parse_profile(d, "h.yaml")


def test_padding_rounds_new_tokens_to_a_bucket_and_keys_to_the_multiple():
    pad = PrefillPadding((16, 64, 256), 128)
    assert pad.padded(1, 0) == (16, 0)            # no history: plain causal over the padded tokens
    assert pad.padded(17, 0) == (64, 0)
    assert pad.padded(64, 0) == (64, 0)
    # history 100 + 64 padded tokens = 164 keys -> 256 keys, of which 64 are the new ones
    assert pad.padded(40, 100) == (64, 256 - 64)
    assert pad.padded(40, 192) == (64, 256 - 64)   # 192 + 64 = 256 exactly: no further rounding
    with pytest.raises(KvsimError, match="above the largest padded shape 256"):
        pad.padded(257, 0)
    # slack a cache needs: worst padding of new tokens (65 -> 256: 191) plus one key multiple
    assert pad.max_pad(256) == 191 + 128


def test_a_padded_profile_is_looked_up_at_the_padded_shape():
    d = small_profile()
    d["prefill_padding"] = {"new_tokens": [10, 1000], "context_multiple": 500}
    pc = ProfileCost(MODELS["llama2-7b"], parse_profile(d))
    unpadded = ProfileCost(MODELS["llama2-7b"], parse_profile(small_profile()))
    # 11 new tokens after 100 run as 1000 new tokens attending over 1500 keys (history 500)
    assert pc.prefill_layer_s(11, 100) == pytest.approx(unpadded.prefill_layer_s(1000, 500))
    assert pc.prefill_layer_s(11, 100) > unpadded.prefill_layer_s(11, 100)
    assert pc.prefill_layer_s(5, 0) == pytest.approx(unpadded.prefill_layer_s(10, 0))


def test_a_decode_padded_profile_prices_a_step_at_its_bucket_of_keys():
    d = small_profile()
    d["decode_padding"] = {"context_multiple": 500}
    pc = ProfileCost(MODELS["llama2-7b"], parse_profile(d))
    # batch 1: layer 0.3 ms at 100 keys, 0.4 ms at 1000 (0.1 / 900 a key); head 0.4 ms; 32 layers
    at500 = (32 * (0.3 + 0.1 * 400 / 900) + 0.4) * 1e-3        # 11.4222 ms
    at1000 = (32 * 0.4 + 0.4) * 1e-3                             # 13.2 ms
    assert pc.decode_step_s(1, 101) == pytest.approx(at500)      # 101 keys run as the 500-key bucket
    assert pc.decode_step_s(1, 500) == pytest.approx(at500)      # a full bucket: no further rounding
    assert pc.decode_step_s(1, 501) == pytest.approx(at1000)
    # a span crossing a bucket: contexts 490..500 (11 steps) at 500 keys, 501..509 (9 steps) at 1000
    total, k = pc.decode_span(1, 490, 20)
    assert k == 20 and total == pytest.approx(11 * at500 + 9 * at1000)
    # cut by a budget inside the second bucket: 11 steps + 2 of the next reach 11 at500 + 1.5 at1000
    total, k = pc.decode_span(1, 490, 20, budget_s=11 * at500 + 1.5 * at1000)
    assert k == 13 and total == pytest.approx(11 * at500 + 2 * at1000)
    # without the key, the table is read at the context itself
    assert _cost(small_profile()).decode_step_s(1, 101) == pytest.approx((32 * (0.3 + 0.1 / 900) + 0.4) * 1e-3)


def _cost(d):
    return ProfileCost(MODELS["llama2-7b"], parse_profile(d))


def test_host_time_per_turn_and_gating_per_loaded_layer_are_added_where_they_are_paid():
    d = small_profile()
    d["models"]["llama2-7b"].update(host_turn_ms=0.8, preload_gate_layer_ms=0.01)
    pc, bare = _cost(d), _cost(small_profile())
    L, c, head = 32, 0.3e-3, 0.5e-3
    # no load: the turn's host time only
    assert pc.prefill_iteration(0.0, c, head, 2, True).total_s == pytest.approx(L * c + head + 0.8e-3)
    # layer-wise preload, compute-bound: every gated layer pays the wait on its compute side
    got = pc.prefill_iteration(0.1e-3, c, head, 2, True).total_s
    assert got == pytest.approx(bare.prefill_iteration(0.1e-3, c + 0.01e-3, head, 2, True).total_s + 0.8e-3)
    assert got == pytest.approx(0.1e-3 + L * (c + 0.01e-3) + head + 0.8e-3)
    # load first, then compute: no gates
    assert pc.prefill_iteration(0.1e-3, c, head, 2, False).total_s == pytest.approx(L * (0.1e-3 + c) + head + 0.8e-3)
    # the roofline has no host terms
    assert bare.prefill_iteration(0.0, c, head, 2, True).total_s == pytest.approx(L * c + head)


def _parts(it):
    return (it.layers_s, it.compute_s, it.load_s, it.head_s, it.host_s, it.comm_s)


@pytest.mark.parametrize("load, comp, n, layerwise, want", [
    # load-bound, double buffer: 0.2 + 0.11 + 31 x 0.2 = 6.51 ms of layers; compute 32 x (0.1 + 0.01 gate)
    (0.2e-3, 0.1e-3, 2, True, (6.51e-3, 3.52e-3, 6.4e-3)),
    # compute-bound: 0.1 + 0.31 + 31 x 0.31 = 10.02 ms
    (0.1e-3, 0.3e-3, 2, True, (10.02e-3, 9.92e-3, 3.2e-3)),
    # one buffer slot: each load waits for the compute that frees it, 32 x (0.2 + 0.11)
    (0.2e-3, 0.1e-3, 1, True, (9.92e-3, 3.52e-3, 6.4e-3)),
    # everything loaded first: no gating, 32 x (0.2 + 0.1)
    (0.2e-3, 0.1e-3, 2, False, (9.6e-3, 3.2e-3, 6.4e-3)),
    # nothing to load: no gating either
    (0.0, 0.1e-3, 2, True, (3.2e-3, 3.2e-3, 0.0)),
])
def test_prefill_iteration_names_its_parts(load, comp, n, layerwise, want):
    d = small_profile()
    d["models"]["llama2-7b"].update(host_turn_ms=0.8, preload_gate_layer_ms=0.01)
    it = _cost(d).prefill_iteration(load, comp, 0.5e-3, n, layerwise)
    assert _parts(it) == pytest.approx(want + (0.5e-3, 0.8e-3, 0.0))
    assert it.total_s == pytest.approx(want[0] + 0.5e-3 + 0.8e-3)
    # the parts add up, bit for bit, to what one formula gave before they were named
    gate = 0.01e-3 if load > 0.0 and layerwise else 0.0
    assert it.total_s == preload_pipeline_s(32, load, comp + gate, n, layerwise) + 0.5e-3 + 0.8e-3


def test_an_iterations_all_reduces_join_each_layers_compute_inside_the_pipeline():
    """Guards adding communication on top of the overlapped layers (or leaving it out): 32 layers,
    load 0.2 ms, compute 0.1 ms + 0.05 ms of all-reduces per layer, double buffer: still load-bound,
    0.2 + 0.15 + 31 x 0.2 = 6.55 ms; comm_s reads 32 x 0.05 = 1.6 ms of it."""
    it = _cost(small_profile()).prefill_iteration(0.2e-3, 0.1e-3, 0.5e-3, 2, True, 0.05e-3)
    assert _parts(it) == pytest.approx((6.55e-3, 4.8e-3, 6.4e-3, 0.5e-3, 0.0, 1.6e-3))
    assert it.total_s == pytest.approx(6.55e-3 + 0.5e-3)


def _roofline(h2d_gbps, ssd_read_gbps):
    return RooflineCost(MODELS["llama2-7b"], 1, 100e12, 2000, 0.5, 0.5, h2d_gbps, 25, ssd_read_gbps, 3)


def test_history_load_per_layer_crosses_the_slower_stage_and_pays_the_copy_overhead_once():
    slow_ssd, fast_ssd = _roofline(25, 5), _roofline(25, 50)
    # DRAM only: 50 MB over 25 GB/s
    assert slow_ssd.history_load_layer_s(50e6) == pytest.approx(2e-3)
    # SSD only, paced by the SSD (10 MB at 5 GB/s) or by H2D (50 MB at 25 GB/s, the SSD reads 50)
    assert slow_ssd.history_load_layer_s(0.0, 10e6) == pytest.approx(2e-3)
    assert fast_ssd.history_load_layer_s(0.0, 50e6) == pytest.approx(2e-3)
    # writes sharing the SSD slow its reads 4x: 12.5 GB/s now paces the staging
    assert fast_ssd.history_load_layer_s(0.0, 50e6, ssd_slowdown=4.0) == pytest.approx(4e-3)
    # both tiers: 1 ms + 1 ms, and the per-layer copy overhead once
    assert fast_ssd.history_load_layer_s(25e6, 25e6, overhead_s=0.5e-3) == pytest.approx(2.5e-3)
    assert slow_ssd.history_load_layer_s(50e6, overhead_s=0.5e-3) == pytest.approx(2.5e-3)
    assert slow_ssd.history_load_layer_s(0.0, 10e6, overhead_s=0.5e-3) == pytest.approx(2.5e-3)
    # nothing to load costs nothing, overhead included
    assert slow_ssd.history_load_layer_s(0.0, 0.0, overhead_s=0.5e-3) == 0.0
    # the default overhead is the profile's measured one (0.02 ms); the roofline has none
    d = small_profile()
    d["models"]["llama2-7b"]["preload_layer_overhead_ms"] = 0.02
    # 1 MiB over the 25 GB/s end of the h2d table
    assert _cost(d).history_load_layer_s(1048576) == pytest.approx(1048576 / 25e9 + 0.02e-3)
    assert slow_ssd.history_load_layer_s(50e6) == 50e6 / 25e9


def test_a_back_end_that_leaves_a_measured_quantity_out_cannot_be_built():
    class NoSsdWrite(CostModel):
        def prefill_layer_s(self, new, hist): return 0.0
        def prefill_head_s(self, new): return 0.0
        def decode_step_s(self, batch, context_tokens): return 0.0
        def h2d_bw(self, chunk_bytes): return 1.0
        def d2h_bw(self, chunk_bytes): return 1.0
        def ssd_read_bw(self, chunk_bytes): return 1.0

    with pytest.raises(TypeError, match="ssd_write_bw"):
        NoSsdWrite(MODELS["llama2-7b"], layer_copy_overhead_s=0.0, layer_gate_s=0.0, host_turn_s=0.0,
                   host_next_turn_s=0.0, measured_contention=None)
    # and the profile answers every question itself, none by falling back on the roofline's answer
    assert not issubclass(ProfileCost, RooflineCost)


def test_ssd_contention_is_the_configs_else_the_profiles_else_none(tmp_path):
    d = small_profile()
    d["ssd"]["contention"] = "interleaved"
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(d))
    measured = {"model": "llama2-7b", "hardware_profile": str(p)}
    assert build_cost_model(load_config(measured)).ssd_contention == "interleaved"
    assert build_cost_model(load_config({**measured, "ssd": {"contention": "even_split"}})).ssd_contention == "even_split"
    assert build_cost_model(load_config({**measured, "ssd": {"contention": "none"}})).ssd_contention == "none"
    assert build_cost_model(load_config({"model": "llama2-7b"})).ssd_contention == "none"
    assert build_cost_model(load_config({"model": "llama2-7b", "ssd": {"contention": "even_split"}})).ssd_contention == "even_split"


def test_hbm_for_kv_is_what_weights_and_the_reserved_share_leave(tmp_path):
    w7 = MODELS["llama2-7b"].weight_bytes
    cfg = load_config({"model": "llama2-7b", "gpu": {"name": "h100-80gb", "hbm_bytes": "20GB", "reserved_fraction": 0.1}})
    assert build_cost_model(cfg).hbm_kv_bytes == pytest.approx(20e9 * 0.9 - w7)
    # two GPUs hold twice the HBM and one copy of the weights (tensor-parallel shards)
    cfg = load_config({"model": "llama2-7b", "gpu": {"name": "h100-80gb", "count": 2, "hbm_bytes": "20GB",
                                                     "reserved_fraction": 0.1}})
    assert build_cost_model(cfg).hbm_kv_bytes == pytest.approx(40e9 * 0.9 - w7)
    # a measured profile's HBM (80 GB) replaces the datasheet's
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(small_profile()))
    cfg = load_config({"model": "llama2-7b", "hardware_profile": str(p), "gpu": {"hbm_bytes": "20GB", "reserved_fraction": 0.1}})
    assert build_cost_model(cfg).hbm_kv_bytes == pytest.approx(80e9 * 0.9 - w7)
    with pytest.raises(KvsimError, match=r"gpu.count: llama2-70b weights \(138 GB\) leave no HBM for KV on 1 x h100-80gb; "
                                         "expected more GPUs"):
        build_cost_model(load_config({"model": "llama2-70b", "gpu": {"name": "h100-80gb"}}))


# --- today's shapes: MoE, MLA, sliding windows, tensor parallelism ------------------------------------

from sim.collectives import RingAllReduce, allreduce_bytes_per_layer, parse_allreduce_table  # noqa: E402
from sim.costmodel import kv_shards, sliding_pairs  # noqa: E402


def _roof(model, gpus=1, allreduce=None):
    # 100 TF/s at 50%, 2000 GB/s at 50%: 50e12 FLOP/s and 1e12 B/s effective per GPU
    return RooflineCost(MODELS[model], gpus, 100e12, 2000, 0.5, 0.5, 25, 25, 6, 3, allreduce=allreduce)


def test_moe_decode_reads_the_dense_weights_and_only_the_experts_the_batch_touches():
    m = MODELS["mixtral-8x7b"]
    non_routed = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 4096 * 8)   # attention and routers
    expert_bytes = 3 * 4096 * 14336 * 2
    head = 32000 * 4096 * 2 / 1e12                                    # LM head, memory-bound
    # one sequence, no context: its top-2 experts in each of 32 layers
    assert _roof("mixtral-8x7b").decode_step_s(1, 0) == pytest.approx(
        (non_routed * 2 + 32 * 2 * expert_bytes) / 1e12 + head, rel=1e-12)
    # 4 sequences touch 8 (1 - 0.75^4) = 5.47 experts per layer, not 4 x 2
    touched = 8 * (1 - 0.75 ** 4)
    assert _roof("mixtral-8x7b").decode_step_s(4, 0) == pytest.approx(
        (non_routed * 2 + 32 * touched * expert_bytes) / 1e12 + head, rel=1e-12)
    assert m.weight_bytes == (non_routed + 32 * 8 * 3 * 4096 * 14336 + 2 * 32000 * 4096) * 2


def test_moe_prefill_flops_come_from_the_active_parameters():
    # 8192 new tokens, compute-bound: 2 x active layer params per token, attention over the causal half
    m = MODELS["mixtral-8x7b"]
    active_per_layer = m.active_layer_params / 32
    flops = 2 * active_per_layer * 8192 + 4 * 32 * 128 * 8192 * (0 + 8193 / 2)
    assert _roof("mixtral-8x7b").prefill_layer_s(8192, 0) == pytest.approx(flops / 50e12, rel=1e-12)


def test_mla_attends_in_the_latent():
    c = _roof("deepseek-v3")
    # scores over 512 + 64 and values over 512, for 128 heads: 2 x 128 x (2 x 512 + 64) per pair
    assert c._attn_flops == 2 * 128 * (2 * 512 + 64) == 278528
    assert kv_shards(MODELS["deepseek-v3"], 8) == 1


def test_a_sliding_window_bounds_the_attended_pairs():
    assert sliding_pairs(10, 0, 128) == 55                       # all inside: 1 + ... + 10
    assert sliding_pairs(100, 200, 128) == 100 * 128             # all past the window
    assert sliding_pairs(100, 100, 128) == (101 + 128) * 28 / 2 + 72 * 128 == 12422
    # gpt-oss decode at 10,000 tokens of context: half its layers read 128 tokens' KV
    c = _roof("gpt-oss-120b")
    full = _roof("gpt-oss-120b")
    full._slide = 0
    assert c.decode_step_s(1, 10_000) < full.decode_step_s(1, 10_000)


def test_tp_allreduce_moves_each_tokens_hidden_state_twice_per_layer():
    m = MODELS["llama2-70b"]
    # 64 decoding sequences: 64 x 8192 x 2 bytes per all-reduce
    assert allreduce_bytes_per_layer(m, 64) == 1048576
    ring = RingAllReduce(450.0)
    # ring over 4 GPUs: 2 x 3/4 of the message over each 450 GB/s link
    one = 2 * 3 / 4 * 1048576 / 450e9
    assert ring(1048576, 4) == pytest.approx(one)
    c = _roof("llama2-70b", 4, ring)
    assert c.comm_layer_s(64) == pytest.approx(2 * one)
    total, comm = c.decode_parts(64, 64_000)
    assert comm == pytest.approx(80 * 2 * one)
    plain = _roof("llama2-70b", 4)
    assert c.decode_step_s(64, 64_000) == pytest.approx(plain.decode_step_s(64, 64_000) + comm, rel=1e-12)
    assert c.prefill_layer_s(512, 0) == pytest.approx(plain.prefill_layer_s(512, 0) + 2 * ring(512 * 16384, 4))
    assert ring(1048576, 1) == 0.0


def test_allreduce_table_interpolates_measured_timings_per_tp_degree():
    t = parse_allreduce_table({"schema": "kvsim-allreduce-table/1",
                               "tp": {2: {"bytes": [1000, 3000], "us": [10, 30]}}}, "t.yaml")
    assert t(2000, 2) == pytest.approx(20e-6)
    assert t(100, 2) == pytest.approx(10e-6)           # below the smallest size: its time (latency)
    assert t(5000, 2) == pytest.approx(50e-6)          # past the largest: the last segment's slope
    with pytest.raises(KvsimError, match="t.yaml: tp: no all-reduce timings for 4 GPUs"):
        t(2000, 4)
    with pytest.raises(KvsimError, match="t.yaml: tp.2.bytes: expected strictly ascending"):
        parse_allreduce_table({"schema": "kvsim-allreduce-table/1", "tp": {2: {"bytes": [3, 1], "us": [1, 2]}}},
                              "t.yaml")


def test_kv_heads_fewer_than_gpus_are_replicated():
    m = MODELS["qwen3-235b-a22b"]        # 4 KV heads
    assert kv_shards(m, 8) == 4 and kv_shards(m, 2) == 2
    c = RooflineCost(m, 8, 100e12, 2000, 0.5, 0.5, 25, 25, 6, 3)
    assert c.h2d_bw(1) == 4 * 25e9                       # one copy's links carry a load
    cfg = load_config({"model": "qwen3-235b-a22b", "gpu": {"name": "h200", "count": 8}})
    built = build_cost_model(cfg)
    room = 8 * 141e9 * 0.9 - m.weight_bytes
    assert built.hbm_kv_bytes == pytest.approx(room / 2)


def test_tp_comm_stays_off_unless_a_config_asks_for_it():
    # gpu.efficiency constant: compared with the hand-built constant-efficiency roofline below
    base = {"model": "llama2-70b", "gpu": {"count": 4, "efficiency": "constant"}}
    off = build_cost_model(load_config(base))
    on = build_cost_model(load_config({**base, "gpu": {"count": 4, "efficiency": "constant", "allreduce": "ring"}}))
    assert off.decode_step_s(8, 8000) == RooflineCost(
        MODELS["llama2-70b"], 4, 312e12, 2039.0, 0.55, 0.75, 25, 25, 6, 3).decode_step_s(8, 8000)
    # a100 NVLink 3: 300 GB/s per direction
    assert on.decode_step_s(8, 8000) - off.decode_step_s(8, 8000) == pytest.approx(
        80 * 2 * (2 * 3 / 4 * 8 * 8192 * 2 / 300e9), rel=1e-9)


def test_a_mixed_iteration_reads_the_weights_once_for_prefill_chunks_and_decodes():
    """LLaMA-2-7B on an A100 roofline: one layer over a 512-token chunk after 1,000 cached tokens plus 32
    decodes holding 48,000 tokens is one forward pass: FLOPs 2 P (512 + 32) + 4 H d (512 (1000 + 256.5)
    + 48000), bytes P x 2 + kv (1000 + 1024 + 48000); the layer time is the larger over peak x efficiency.
    Alone, the chunk and the decodes each reproduce the prefill and decode formulas."""
    from sim.config import load_config
    from sim.costmodel import build_cost_model
    cm = build_cost_model(load_config({}, {"model": "llama2-7b", "gpu.efficiency": "constant"}))
    s = cm.shape
    P, Hd, kv = s.params_per_layer, s.heads * s.head_dim, s.kv_bytes_per_token_layer
    flops = 2 * P * (512 + 32) + 4 * Hd * (512 * (1000 + 256.5) + 48000)
    byts = 2 * P + kv * (1000 + 2 * 512 + 48000)
    F, BW = 312e12 * 0.55, 2039e9 * 0.75
    assert cm.mixed_layer_s([(512, 1000)], 32, 48000) == pytest.approx(max(flops / F, byts / BW), rel=1e-12)
    assert cm.mixed_layer_s([(512, 1000)], 0, 0.0) == pytest.approx(cm.prefill_layer_s(512, 1000), rel=1e-12)
    assert (cm.mixed_layer_s([], 32, 48000) * s.layers + cm.decode_head_s(32)
            == pytest.approx(cm.decode_step_s(32, 48000), rel=1e-12))
    it = cm.iteration([(512, 1000)], 32, 48000)
    assert it.total_s == pytest.approx(s.layers * max(flops / F, byts / BW) + cm.decode_head_s(33), rel=1e-12)


def _tp_profile(tp, model="llama3.1-70b"):
    d = small_profile()
    d["tp"] = tp
    d["models"] = {model: d["models"]["llama2-7b"]}
    return d


def test_a_profile_without_tp_is_single_gpu_and_refuses_more_gpus():
    prof = parse_profile(small_profile(), "h100.yaml")
    assert prof.tp == 1
    with pytest.raises(KvsimError, match=r"^h100.yaml: tp: the tables were measured at tensor-parallel degree 1; "
                                         r"expected gpu.count 1, got gpu.count 2$"):
        ProfileCost(MODELS["llama2-7b"], prof, 2)


def test_a_tp4_profile_serves_gpu_count_4_with_its_tables_as_measured():
    pc = ProfileCost(MODELS["llama3.1-70b"], parse_profile(_tp_profile(4), "tp4.yaml"), 4)
    # the layer tables already hold the all-reduces: looked up as they are, not divided by 4
    assert pc.prefill_layer_s(1000, 1000) == pytest.approx(3.0e-3)
    assert pc.decode_step_s(8, 8 * 1000) == pytest.approx((80 * 0.9 + 0.6) * 1e-3)
    # 8 KV heads over 4 GPUs: a 4 MiB layer chunk is 1 MiB on each GPU's link (25 GB/s there), 100 GB/s in all
    assert pc.h2d_bw(4 * 1048576) == pytest.approx(100e9)
    assert pc.history_load_layer_s(4 * 1048576) == pytest.approx(1048576 / 25e9)
    # a 4 KiB chunk is 1 KiB per GPU: 5 GB/s each
    assert pc.d2h_bw(4096) == pytest.approx(20e9)
    with pytest.raises(KvsimError, match=r"^tp4.yaml: tp: the tables were measured at tensor-parallel degree 4; "
                                         r"expected gpu.count 4, got gpu.count 2$"):
        ProfileCost(MODELS["llama3.1-70b"], parse_profile(_tp_profile(4), "tp4.yaml"), 2)


def test_a_tp_profile_with_fewer_kv_heads_than_gpus_loads_each_shard_once_per_copy():
    # qwen3-235b-a22b has 4 KV heads: at TP 8 each head sits on 2 GPUs, so a chunk splits 4 ways, not 8
    pc = ProfileCost(MODELS["qwen3-235b-a22b"], parse_profile(_tp_profile(8, "qwen3-235b-a22b")), 8)
    assert pc.h2d_bw(4 * 1048576) == pytest.approx(4 * 25e9)


def test_config_with_gpu_count_equal_to_the_profiles_tp_builds(tmp_path):
    p = tmp_path / "tp4.yaml"
    p.write_text(yaml.safe_dump(_tp_profile(4)))
    cm = build_cost_model(load_config({"model": "llama3.1-70b", "hardware_profile": str(p), "gpu": {"count": 4}}))
    assert isinstance(cm, ProfileCost) and cm.gpus == 4
    with pytest.raises(KvsimError, match=r"tp4.yaml: tp: .* expected gpu.count 4, got gpu.count 8"):
        build_cost_model(load_config({"model": "llama3.1-70b", "hardware_profile": str(p), "gpu": {"count": 8}}))


@pytest.mark.parametrize("tp", [0, 1.5, True, "4"])
def test_bad_tp_names_the_key(tp):
    d = small_profile()
    d["tp"] = tp
    with pytest.raises(KvsimError, match=r"^h.yaml: tp: expected an integer >= 1"):
        parse_profile(d, "h.yaml")
