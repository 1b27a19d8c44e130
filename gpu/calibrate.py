"""`kvsim gpu calibrate`: run the microbenchmarks and write a hardware profile for the simulator.

The schema, its validation and the interpolation live with the cost model (`sim.costmodel`, one
source of truth); this module only fills the tables, and checks its output with the cost model's own
parser before writing it. Raw samples (every repeat) go to a JSON file beside the profile.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import statistics

import yaml

from gpu.prefill_graph import PADDING
from sim.costmodel import CONTENTION, SCHEMA, parse_profile
from sim.files import atomic_write_text
from sim.units import MS, TFLOPS

PREFILL_NEW = list(PADDING.new_tokens)       # the executor only ever runs these (padded) sizes
PREFILL_HIST = [0, 256, 512, 1024, 2048, 4096, 8192]   # attention work is linear in keys between
DECODE_BATCH = [1, 2, 4, 8, 16, 32, 64]
DECODE_CTX = [256, 512, 1024, 2048, 3072, 4096, 6144, 8192]   # multiples of the graph bucket
QUICK = dict(prefill_new=[16, 64, 512, 2048], prefill_hist=[0, 512, 2048], decode_batch=[1, 8],
             decode_ctx=[256, 2048])


def profile_from_raw(raw: dict) -> dict:
    """Reduce raw microbenchmark samples to the `kvsim-hardware-profile/1` tables (pure function)."""
    links = {name: {"chunk_bytes": [r["chunk_bytes"] for r in rows], "gbps": [round(r["gbps"], 3) for r in rows]}
             for name, rows in raw["links"].items()}
    ssd = {k: {"chunk_bytes": [r["chunk_bytes"] for r in raw["ssd"][k]],
               "gbps": [round(r["gbps"], 4) for r in raw["ssd"][k]]} for k in ("read", "write")}
    ssd["method"] = raw["ssd"]["method"]
    # the executor's own I/O patterns, where measured (bench.ssd_layer_reads / ssd_layer_writes), replace
    # the sequential tables
    for k, measured, pattern in (("read", "layer_reads", "per-layer history reads of a session file"),
                                 ("write", "layer_writes", "per-layer appends of a turn's KV to a session file")):
        if raw["ssd"].get(measured):
            rows = raw["ssd"][measured]["rows"]
            ssd[k] = {"chunk_bytes": [r["chunk_bytes"] for r in rows], "gbps": [round(r["gbps"], 4) for r in rows]}
            ssd[f"{k}_pattern"] = f"{pattern} (gpu.kvstore.DiskStore)"
    models = {}
    for name, m in raw["models"].items():
        pf = m["prefill"]
        cell = {(r["new_tokens"], r["history_tokens"]): r["ms"] for r in pf["rows"]}
        dc = m["decode"]
        dcell = {(r["batch"], r["context_tokens"]): r["ms"] for r in dc["rows"]}
        models[name] = {
            "prefill_layer_ms": {"new_tokens": pf["new_tokens"], "history_tokens": pf["history_tokens"],
                                 "ms": [[round(cell[(n, h)], 5) for h in pf["history_tokens"]]
                                        for n in pf["new_tokens"]]},
            "decode_layer_ms": {"batch": dc["batch"], "context_tokens": dc["context_tokens"],
                                "ms": [[round(dcell[(b, c)], 5) for c in dc["context_tokens"]]
                                       for b in dc["batch"]]},
            "head_ms": {"prefill": {"new_tokens": [r["new_tokens"] for r in m["head"]["prefill"]],
                                    "ms": [round(r["ms"], 5) for r in m["head"]["prefill"]]},
                        "decode": {"batch": [r["batch"] for r in dc["head"]],
                                   "ms": [round(r["ms"], 5) for r in dc["head"]]}},
        }
        if m.get("preload_layer_overhead_ms") is not None:
            models[name]["preload_layer_overhead_ms"] = round(m["preload_layer_overhead_ms"], 5)
    peaks = raw["gpu"]
    prof = {
        "schema": SCHEMA,
        "device": raw["device"],
        "measured_at": raw["measured_at"],
        "command": raw["command"],
        # the TP degree the tables were measured at (gpu/tp_executor.py's calibration; 1 here)
        "tp": int(raw.get("tp", 1)),
        "gpu": {"hbm_bytes": int(peaks["hbm_bytes"]), "peak_bf16_flops": float(f"{peaks['peak_bf16_flops']:.4g}"),
                "hbm_bw_gbps": round(peaks["hbm_bw_gbps"], 1)},
        "links": links,
        "ssd": ssd,
        "models": models,
    }
    if raw.get("prefill_padding"):      # graph-captured prefill (absent from raw data of eager runs)
        prof["prefill_padding"] = raw["prefill_padding"]
    if raw.get("decode_padding"):       # graph decode over whole key buckets (the TP calibration records it)
        prof["decode_padding"] = raw["decode_padding"]
    if raw["ssd"].get("read_under_write"):
        ssd["contention"] = ssd_contention_fit(raw["ssd"]["read_under_write"])["contention"]
    for name, m in raw["models"].items():
        if m.get("serving"):
            models[name].update(serving_terms(prof, name, m["serving"]["rows"]))
        if m.get("served_gaps"):
            models[name]["host_next_turn_ms"] = next_turn_gap_ms(m["served_gaps"]["rows"])
        if m.get("decode_probes"):
            models[name]["decode_after_prefill_ms"] = decode_after_prefill(prof, name, m["decode_probes"]["rows"])
    return prof


def _cost_without(prof: dict, model: str, terms):
    """The cost model of `prof`'s tables for `model` with `terms` left out: what a reduction measures a
    term against (the term is what the tables miss)."""
    from sim.costmodel import ProfileCost
    from sim.models import MODELS

    tables = {**prof, "models": {model: {k: v for k, v in prof["models"][model].items() if k not in terms}}}
    return ProfileCost(MODELS[model], parse_profile(tables, "<calibration>"), prof.get("tp", 1))


def decode_after_prefill(prof: dict, model: str, rows: list[dict]) -> dict:
    """What a reply's decode takes beyond the profile's decode tables, over the prefill before it
    (`decode_after_prefill_ms`), from one-turn replies served back to back (`bench.decode_probes`). Per
    prompt length: the median prefill (start -> first token) and the median of each turn's decode
    (first token -> end) less the tables' decode of its output_tokens - 1 steps from its prompt + 1
    tokens of context, as the simulator prices that decode (`CostModel.decode_span`, batch 1), floored
    at 0; `steps`, the replies' decode steps (the term is spread over that many steps after a prefill).
    The tables are this profile's own (the term is what they miss, found after them)."""
    cost = _cost_without(prof, model, ("decode_after_prefill_ms",))
    by_prompt: dict = {}
    for r in rows:
        k = int(r["output_tokens"]) - 1
        if k < 1:
            continue
        pred_s = cost.decode_span(1, int(r["prompt_tokens"]) + 1, k)[0]
        by_prompt.setdefault(int(r["prompt_tokens"]), []).append(
            ((r["first_token_s"] - r["start_s"]) / MS, (r["end_s"] - r["first_token_s"] - pred_s) / MS))
    if not by_prompt:
        raise ValueError("decode probes: no turn decoded more than one token")
    pts = sorted((round(statistics.median(p for p, _ in v), 4), round(max(statistics.median(x for _, x in v), 0.0), 5))
                 for v in by_prompt.values())
    pts = [q for i, q in enumerate(pts) if i == 0 or q[0] > pts[i - 1][0]]   # the table's x must ascend
    return {"prefill_ms": [p for p, _ in pts], "ms": [x for _, x in pts],
            "steps": int(statistics.median_low(int(r["output_tokens"]) - 1 for r in rows))}


def next_turn_gap_ms(rows: list[dict]) -> float:
    """The serving loop's host time after a reply whose session goes on (`host_next_turn_ms`), from turns
    served back to back (`bench.served_gaps`): the median, over turns whose session continues and whose
    successor in serving order had already arrived, of the time from the turn's end to that successor's
    start (both on the serving process's clock). A successor that arrived later waited for its arrival,
    not for the host, and is left out."""
    by_start = sorted(rows, key=lambda r: r["start_s"])
    gaps = [(b["start_s"] - a["end_s"]) / MS for a, b in zip(by_start, by_start[1:])
            if a["continues"] and b["arrival_s"] <= a["end_s"]]
    if not gaps:
        raise ValueError("served gaps: no turn whose session continues was followed by a queued turn")
    return round(max(statistics.median(gaps), 0.0), 5)


def serving_terms(prof: dict, model: str, rows: list[dict]) -> dict:
    """The serving loop's host terms from the executor's own turns (`bench.serving_overheads`): the
    medians of what each measured prefill takes beyond the cost model's prediction from the tables of
    the same profile, one term at a time. Recompute turns give the host time per turn
    (host_turn_ms); DRAM turns that load every layer first, the fixed cost of each layer's copy
    (preload_layer_overhead_ms: issue and DMA set-up of a per-layer copy, which a one-transfer link
    benchmark does not see); DRAM turns with layer-wise preload, compute-bound, the per-layer gating
    (preload_gate_layer_ms)."""
    # the tables alone: the host terms are what is being found
    cost = _cost_without(prof, model, ("host_turn_ms", "preload_gate_layer_ms", "preload_layer_overhead_ms"))
    L = cost.shape.layers

    def base_ms(r, overhead_ms=0.0):
        n, h = r["new_tokens"], r["history_tokens"]
        chunk = h * cost.shape.kv_bytes_per_token_layer if r["tier"] == "dram" else 0.0
        load = cost.history_load_layer_s(chunk, overhead_s=overhead_ms * MS)
        return cost.prefill_iteration(load, cost.prefill_layer_s(n, h), cost.prefill_head_s(n),
                                      r["read_buffer_layers"], r["overlap"]).total_s / MS

    def median_of(residuals):
        return round(max(statistics.median(residuals), 0.0), 5) if residuals else None

    out = {"host_turn_ms": median_of([r["prefill_ms"] - base_ms(r) for r in rows if r["tier"] == "recompute"]) or 0.0}
    turn = out["host_turn_ms"]
    copy = median_of([(r["prefill_ms"] - turn - base_ms(r)) / L for r in rows
                      if r["tier"] == "dram" and not r["overlap"] and r["history_tokens"] > 0])
    if copy is not None:
        out["preload_layer_overhead_ms"] = copy
    gate = median_of([(r["prefill_ms"] - turn - base_ms(r, copy or 0.0)) / L for r in rows
                      if r["tier"] == "dram" and r["overlap"]])
    if gate is not None:
        out["preload_gate_layer_ms"] = gate
    return out


def iteration_from_raw(rows: list[dict], padding=None) -> dict:
    """A batched executor's whole steps (`bench/gpu_batched_validate.py`'s synthetic steps) reduced to
    the profile's optional `models.<name>.iteration` section (pure function; schema in sim/costmodel.py).

    `rows`: one per timed step shape, `{"kind": "decode" | "chunk" | "mixed", "batch", "context_tokens"
    (per decoding sequence), "new_tokens", "history_tokens", "ms"}` (the median step time). Decode rows
    fill the decode table over (batch, context), chunk rows the chunk table over (new, history); a cell
    the grid could not hold (more KV than the cache) is extrapolated linearly along its row from the two
    longest measured contexts. Mixed rows (a chunk with a decode batch) give `shared_ms`, the median of
    what the two parts timed alone cost beyond the step that runs them together (>= 0).

    `padding` (a `sim.costmodel.StepPadding`): the executor ran steps at those static shapes; rows whose
    `key` ("Bb:Nb:Kb", as the executor reported it) is set give `steps_ms`, the median time per shape
    (a shape timed by several rows: the median of theirs), the cost model's price of any step of that
    shape. Rows of kind "step" (shapes drawn from the runs' own steps) are used there only."""
    from sim.costmodel import Table2D

    def table(kind, xname, yname, xkey, ykey):
        cells = {(r[xkey], r[ykey]): float(r["ms"]) for r in rows if r["kind"] == kind}
        if not cells:
            raise ValueError(f"iteration samples: no {kind} rows")
        xs = sorted({x for x, _ in cells})
        ys = sorted({y for _, y in cells})
        grid = []
        for x in xs:
            have = [(y, cells[(x, y)]) for y in ys if (x, y) in cells]
            row = []
            for y in ys:
                if (x, y) in cells:
                    row.append(cells[(x, y)])
                elif len(have) == 1:
                    row.append(have[0][1])
                else:
                    (y0, v0), (y1, v1) = (have[-2], have[-1]) if y > have[-1][0] else (have[0], have[1])
                    row.append(max(v0 + (v1 - v0) * (y - y0) / (y1 - y0), 0.0))
            grid.append([round(v, 4) for v in row])
        return {xname: xs, yname: ys, "ms": grid}

    dec = table("decode", "batch", "context_tokens", "batch", "context_tokens")
    chk = table("chunk", "new_tokens", "history_tokens", "new_tokens", "history_tokens")
    d2 = Table2D(tuple(dec["batch"]), tuple(dec["context_tokens"]), tuple(map(tuple, dec["ms"])))
    c2 = Table2D(tuple(chk["new_tokens"]), tuple(chk["history_tokens"]), tuple(map(tuple, chk["ms"])))
    shared = [d2(r["batch"], r["context_tokens"]) + c2(r["new_tokens"], r["history_tokens"]) - float(r["ms"])
              for r in rows if r["kind"] == "mixed"]
    out = {"decode_ms": dec, "chunk_ms": chk,
           "shared_ms": round(max(statistics.median(shared), 0.0), 4) if shared else 0.0}
    if padding is not None:
        out["padding"] = {"batch": list(padding.batch), "chunk_tokens": list(padding.chunk_tokens),
                          "keys": list(padding.keys), "chunk_slots": padding.chunk_slots}
        by_key: dict = {}
        for r in rows:
            k = r.get("key")
            if isinstance(k, str) and k:
                by_key.setdefault(tuple(int(v) for v in k.split(":")), []).append(float(r["ms"]))
        keys = sorted(by_key)
        if keys:
            out["steps_ms"] = {"batch": [k[0] for k in keys], "chunk_tokens": [k[1] for k in keys],
                               "keys": [k[2] for k in keys],
                               "ms": [round(statistics.median(by_key[k]), 4) for k in keys]}
    return out


def host_step_from_steps(requests, loop_ms, edges=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict | None:
    """The serving loop's host time per step (`StepRecord.loop_ms` of a replay of the runs' traces on the
    device's own host, `gpu.batched_validate.simulate_sessions`) over the step's scheduled requests,
    reduced to the profile's `iteration.host_step_ms` (pure function): per bin [edge, next edge) of
    requests with >= 3 steps, the median requests and the median time. None without such a bin."""
    return _binned(zip((int(r) for r in requests), (float(m) for m in loop_ms)), statistics.median, edges)


def _binned(pairs, reduce, edges) -> dict | None:
    """(requests, ms) pairs per bin [edge, next edge) with >= 3 of them: the median requests and `reduce` of
    the times (4 decimals), as `iteration.host_step_ms`; None without such a bin."""
    pairs = sorted(pairs)
    xs, ys = [], []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else math.inf
        got = [(r, m) for r, m in pairs if lo <= r < hi]
        if len(got) >= 3:
            xs.append(float(statistics.median(r for r, _ in got)))
            ys.append(round(reduce(m for _, m in got), 4))
    if not xs:
        return None
    return {"requests": xs, "ms": ys}


def host_step_from_served(steps, edges=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict | None:
    """The serving loop's host time per step as a served run spent it, reduced to `iteration.host_step_ms`
    (pure function). `steps`: a served run's step records (`gpu.batched.StepRecord` columns `run`, `step`,
    `start_s`, `run_ms`, `decodes`, `chunks`, `finished`; several runs may be stacked).

    A step's host time is everything from its start to the next step's start except `ex.run` itself: the
    schedule, the block tables, the update, finishing and saving turns, admitting arrivals. The CPU replay
    `host_step_from_steps` reduces times only the scheduler and a stand-in executor on a warm cache; served
    between GPU steps the same loop took 3-4x longer (runs 31-32: 0.46-0.48 ms a step at ~42 requests
    against 0.12-0.14), with a heavy tail from the steps that finish and admit turns, so each bin gives the
    mean (time adds up over a run, the median would drop the tail). Excluded: each run's last step (no next
    start) and a step that emptied the batch (every scheduled request finished), after which the loop sleeps
    until the next arrival. Per bin [edge, next edge) of scheduled requests with >= 3 steps: the median
    requests and the mean time. None without such a bin."""
    pairs = []
    for _, g in steps.sort_values(["run", "step"]).groupby("run", sort=False):
        req = (g.decodes + g.chunks.fillna("").astype(str).str.count(":")).to_numpy()
        start = g.start_s.to_numpy()
        run_ms = g.run_ms.to_numpy()
        fin = g.finished.to_numpy()
        for i in range(len(g) - 1):
            if fin[i] >= req[i]:
                continue
            pairs.append((int(req[i]), (start[i + 1] - start[i]) * 1e3 - float(run_ms[i])))
    return _binned(pairs, statistics.fmean, edges)


def ssd_contention_fit(read_under_write: dict) -> dict:
    """Which contention model of `sim.costmodel.CONTENTION` the SSD follows, from the samples of
    `gpu.bench.ssd_read_under_write`: each model predicts the read under the write from the median
    read-alone and write-alone times with the simulator's own `sim.tiers.SharedDeviceLink` (seconds
    as bytes at 1 B/s, one request per layer; the read starts `lead_s` after the writes); the nearest
    model (least mean relative error over the request-size pairs) is the profile's `ssd.contention`.
    """
    from sim.errors import KvsimError
    from sim.tiers import SharedDeviceLink

    if "rows" not in read_under_write:
        # one request-size pair cannot tell the contention models apart: such samples are not reduced
        raise KvsimError("calibration raw samples: ssd.read_under_write.rows: missing (an older single-pair "
                         "probe); expected the samples of gpu.bench.ssd_read_under_write")
    layers, lead, rows = read_under_write["layers"], read_under_write["lead_s"], read_under_write["rows"]
    predicted, fifo = [], []
    for r in rows:
        read, write = statistics.median(r["read_alone_s"]), statistics.median(r["write_alone_s"])
        pred = {}
        for mode in CONTENTION:
            if mode == "none":
                pred[mode] = read
                continue
            r_link, w_link = SharedDeviceLink.pair("read", "write", mode)
            w_link.transfer(0.0, write, 1.0, layers)
            pred[mode] = r_link.transfer(lead, read, 1.0, layers) - lead
        predicted.append(pred)
        fifo.append(max(write - lead, 0.0) + read)      # the read behind all the writes
    err = {m: statistics.mean(abs(p[m] - statistics.median(r["read_under_write_s"]))
                              / statistics.median(r["read_under_write_s"]) for r, p in zip(rows, predicted))
           for m in CONTENTION}
    return {"predicted_s": predicted, "predicted_fifo_s": fifo, "mean_rel_error": err,
            "contention": min(err, key=err.get)}


def write_profile(raw: dict, out, raw_out=None) -> dict:
    prof = profile_from_raw(raw)
    parse_profile(prof, str(out))          # the cost model's own validator: fail before writing
    atomic_write_text(out, "# written by kvsim gpu calibrate; schema and interpolation: sim/costmodel.py\n"
                      + yaml.safe_dump(prof, sort_keys=False, default_flow_style=None, width=200))
    if raw_out is not None:
        atomic_write_text(raw_out, json.dumps(raw, indent=1))
    return prof


def measure(models=("llama2-7b", "llama2-13b"), ssd_dir="/tmp/kvsim_ssd", quick: bool = False,
            command: str = "kvsim gpu calibrate", log=print) -> dict:
    """Run every microbenchmark on the current CUDA device; returns the raw samples."""
    import torch

    from gpu import bench
    from gpu.model import SHAPES

    g = QUICK if quick else dict(prefill_new=PREFILL_NEW, prefill_hist=PREFILL_HIST,
                                 decode_batch=DECODE_BATCH, decode_ctx=DECODE_CTX)
    raw = {"device": torch.cuda.get_device_name(0),
           "measured_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": command, "torch": torch.__version__, "stack_layers": bench.STACK,
           "prefill_padding": {"new_tokens": list(PADDING.new_tokens), "context_multiple": PADDING.context_multiple}}
    log("gpu peaks ...")
    raw["gpu"] = bench.gpu_peaks()
    log(f"  {raw['gpu']['peak_bf16_flops'] / TFLOPS:.0f} TFLOP/s, {raw['gpu']['hbm_bw_gbps']:.0f} GB/s")
    log("host links ...")
    raw["links"] = bench.link_bandwidth(bench.LINK_CHUNKS[::4] if quick else bench.LINK_CHUNKS)
    for k, rows in raw["links"].items():
        log(f"  {k}: " + " ".join(f"{r['chunk_bytes'] >> 20}M:{r['gbps']:.1f}" for r in rows[::3]))
    log("ssd ...")
    # the executor-pattern reads first, before the sequential benchmark's GBs of writes (bench.settle)
    layer_reads = bench.ssd_layer_reads(ssd_dir, SHAPES[models[0]].kv_bytes_per_token_layer,
                                        SHAPES[models[0]].layers)
    raw["ssd"] = bench.ssd_bandwidth(ssd_dir, bench.SSD_CHUNKS[::3] if quick else bench.SSD_CHUNKS,
                                     min_bytes=(1 << 26) if quick else (1 << 28))
    raw["ssd"]["layer_reads"] = layer_reads
    raw["ssd"]["layer_writes"] = bench.ssd_layer_writes(ssd_dir, SHAPES[models[0]].kv_bytes_per_token_layer,
                                                        SHAPES[models[0]].layers)
    raw["ssd"]["read_under_write"] = bench.ssd_read_under_write(
        ssd_dir, SHAPES[models[0]].kv_bytes_per_token_layer, SHAPES[models[0]].layers)
    rw = raw["ssd"]["read_under_write"]
    fit = ssd_contention_fit(rw)
    for r, pred, fifo in zip(rw["rows"], fit["predicted_s"], fit["predicted_fifo_s"]):
        log(f"  read {r['read_tokens']} tok/layer under write {r['write_tokens']}: "
            f"{statistics.median(r['read_under_write_s']) / MS:.0f} ms; predicted "
            + ", ".join(f"{m} {v / MS:.0f}" for m, v in pred.items())
            + f", behind the writes {fifo / MS:.0f}")
    log(f"  contention: {fit['contention']} (mean error " + ", ".join(f"{m} {e:.0%}" for m, e in fit["mean_rel_error"].items()) + ")")
    for k in ("write", "read"):
        log(f"  {k} ({raw['ssd']['method']}): " + " ".join(f"{r['chunk_bytes'] >> 20}M:{r['gbps']:.2f}"
                                                          for r in raw["ssd"][k]))
    for k in ("layer_reads", "layer_writes"):
        log(f"  {k}: " + " ".join(f"{r['chunk_bytes'] >> 10}K:{r['gbps']:.2f}" for r in raw["ssd"][k]["rows"]))
    raw["models"] = {}
    for name in models:
        shape = SHAPES[name]
        log(f"{name} layers ...")
        m = {"prefill": bench.prefill_layer_grid(shape, g["prefill_new"], g["prefill_hist"]),
             "decode": bench.decode_layer_grid(shape, g["decode_batch"], g["decode_ctx"]),
             "head": bench.head_times(shape, g["prefill_new"], g["decode_batch"]),
             "serving": bench.serving_overheads(shape, reps=3 if quick else 7)}
        raw["models"][name] = m
        torch.cuda.empty_cache()
        log(f"  prefill n=512 h=2048: {next(r['ms'] for r in m['prefill']['rows'] if r['new_tokens'] == 512 and r['history_tokens'] == 2048):.3f} ms/layer"
            if not quick else "  done")
    return raw
