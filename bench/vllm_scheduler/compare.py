"""Replay a step-indexed request stream through kvsim's ChunkedScheduler exactly as drive_vllm.py
drives vLLM's V1 Scheduler, and compare the two step by step.

Needs no vLLM (the scheduler settings are read from the header of vLLM's per-step file):

    python bench/vllm_scheduler/compare.py results/scheduler/stream_high.jsonl \
        --vllm results/scheduler/vllm_high.steps.jsonl [--out kvsim_high.steps.jsonl] [--summary S.json]

kvsim's per-step lines have drive_vllm.py's format (README.md). Two steps are identical when every
field is: arrived, sched (ids, token counts, kinds, computed-before, in order), admitted (ids and
prefix-hit tokens), preempted, finished and free_blocks. Steps are matched by step index; a step
that only one side has (its runs diverged in time) counts as a difference. "Eventful" steps are
those where vLLM or kvsim admitted, preempted, ran a partial prefill chunk or finished a request:
most steps are plain decodes, and a difference would show in the others.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import stream as st  # noqa: E402
from sim.files import atomic_write_text  # noqa: E402
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest  # noqa: E402

FIELDS = ("arrived", "sched", "admitted", "preempted", "finished", "free_blocks")


def config_from_vllm(vllm_config: dict) -> ChunkedConfig:
    """The ChunkedScheduler settings that match a drive_vllm.py run (its header line)."""
    return ChunkedConfig(
        num_blocks=vllm_config["usable_blocks"],
        max_num_batched_tokens=vllm_config["max_num_scheduled_tokens"],
        max_num_seqs=vllm_config["max_num_seqs"], block_tokens=vllm_config["block_size"],
        long_prefill_token_threshold=vllm_config["long_prefill_token_threshold"],
        watermark=vllm_config["watermark"], max_model_len=vllm_config["max_model_len"])


def drive(header: st.StreamHeader, requests: list[st.StreamRequest], cfg: ChunkedConfig,
          max_steps: int = 2_000_000, segments: bool = True) -> tuple[list[dict], ChunkedScheduler]:
    """One row per non-idle step, as drive_vllm.py writes them. Keys go to the scheduler as chains
    (`segments`: the system prompt's whole blocks, then the session), as the simulator gives them,
    or as `stream.block_key` one block at a time."""
    sched = ChunkedScheduler(cfg)
    releases = st.Releases(requests)
    bs, n_sys = header.block_size, header.system_prompt_tokens
    rows: list[dict] = []
    step, done, live = 0, 0, 0
    while done < len(requests):
        if not live:
            nxt = releases.next_due_step()
            if nxt is None:
                raise RuntimeError(f"{len(requests) - done} requests never released")
            step = max(step, nxt)
        arrived = []
        for r in releases.due(step):
            if segments:
                nsys = n_sys // bs  # blocks wholly inside the system prompt (`stream.block_key`)
                segs = [(0, "system", 0), (nsys, r.session, nsys)] if nsys else [(0, r.session, 0)]
                sched.add_request(SeqRequest(r.id, r.prompt_tokens, r.max_tokens, segments=segs))
            else:
                sched.add_request(SeqRequest(r.id, r.prompt_tokens, r.max_tokens,
                                             lambda i, s=r.session: st.block_key(s, i, bs, n_sys)))
            arrived.append(r.id)
            live += 1
        plan = sched.schedule()
        sched_rows = [[s.req.id, s.num_new_tokens, "d" if s.is_decode else "p", s.req.num_computed_tokens]
                      for s in plan.scheduled]
        if not sched_rows and not plan.preempted:
            raise RuntimeError(f"step {step}: nothing scheduled with {live} requests live")
        finished = sched.update(plan)
        for req in finished:
            releases.finished(req.id, step)
        live -= len(finished)
        done += len(finished)
        rows.append({"step": step, "arrived": arrived, "sched": sched_rows,
                     "admitted": {r.id: hit for r, hit in plan.admitted.items()},
                     "preempted": sorted(r.id for r in plan.preempted),
                     "finished": [r.id for r in finished], "free_blocks": sched.free_blocks})
        step += 1
        if len(rows) > max_steps:
            raise RuntimeError(f"more than {max_steps} steps")
    return rows, sched


def compare(vllm_rows: list[dict], kvsim_rows: list[dict]) -> dict:
    by_step_v = {r["step"]: r for r in vllm_rows}
    by_step_k = {r["step"]: r for r in kvsim_rows}
    steps = sorted(by_step_v.keys() | by_step_k.keys())
    field_diffs = {f: 0 for f in FIELDS}
    only = {"vllm": 0, "kvsim": 0}
    same = same_eventful = n_eventful = 0
    first = None
    for s in steps:
        v, k = by_step_v.get(s), by_step_k.get(s)
        is_event = any(_is_event(r) for r in (v, k) if r is not None)
        n_eventful += is_event
        if v is None or k is None:
            only["kvsim" if v is None else "vllm"] += 1
            if first is None:
                first = {"step": s, "fields": ["missing"], "vllm": v, "kvsim": k}
            continue
        diff = [f for f in FIELDS if v[f] != k[f]]
        for f in diff:
            field_diffs[f] += 1
        if not diff:
            same += 1
            same_eventful += is_event
        elif first is None:
            first = {"step": s, "fields": diff, "vllm": v, "kvsim": k}
    pct = lambda a, b: round(100.0 * a / b, 3) if b else 100.0  # noqa: E731
    return {"steps": len(steps), "identical": same, "identical_pct": pct(same, len(steps)),
            "eventful_steps": n_eventful, "eventful_identical": same_eventful,
            "eventful_identical_pct": pct(same_eventful, n_eventful),
            "steps_only_in": only, "differing_fields": field_diffs, "first_difference": first}


def _is_event(row: dict) -> bool:
    if row["admitted"] or row["preempted"] or row["finished"]:
        return True
    # any prefill chunk: an admission's first, a running request's next, a resumed recompute
    return any(kind == "p" for _, _, kind, _ in row["sched"])


def totals(rows: list[dict], sched: ChunkedScheduler | None = None) -> dict:
    out = {"steps": len(rows), "last_step": rows[-1]["step"] if rows else None,
           "preemptions": sum(len(r["preempted"]) for r in rows),
           "hit_tokens": sum(sum(r["admitted"].values()) for r in rows),
           "prefill_tokens": sum(n for r in rows for _, n, kind, _ in r["sched"] if kind == "p"),
           "decode_tokens": sum(n for r in rows for _, n, kind, _ in r["sched"] if kind == "d")}
    if sched is not None:
        out["dropped_tokens"] = sched.stats.dropped_tokens
        out["recomputed_tokens"] = sched.stats.recomputed_tokens
    return out


def read_steps(path) -> tuple[dict, list[dict]]:
    lines = Path(path).read_text().splitlines()
    config = json.loads(lines[0])
    if config.get("kind") != "config":
        raise ValueError(f"{path}:1: expected the driver's config line")
    return config, [json.loads(line) for line in lines[1:] if line.strip()]


def run(stream_path, vllm_path, out=None) -> dict:
    header, requests = st.read_stream(stream_path)
    vllm_config, vllm_rows = read_steps(vllm_path)
    if vllm_config["stream_sha256"] != st.file_sha256(stream_path):
        raise ValueError(f"{vllm_path} was not made from {stream_path} (stream sha256 differs)")
    cfg = config_from_vllm(vllm_config)
    rows, sched = drive(header, requests, cfg)
    if out:
        head = {"kind": "config", "scheduler": "sim.scheduler.ChunkedScheduler",
                "stream": Path(stream_path).name, "stream_sha256": vllm_config["stream_sha256"],
                **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}}
        atomic_write_text(out, "\n".join([json.dumps(head)] + [json.dumps(r) for r in rows]) + "\n")
    return {"stream": Path(stream_path).name, "vllm": totals(vllm_rows), "kvsim": totals(rows, sched),
            **compare(vllm_rows, rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stream")
    ap.add_argument("--vllm", required=True, help="drive_vllm.py's per-step file for this stream")
    ap.add_argument("--out", help="also write kvsim's per-step lines here")
    ap.add_argument("--summary", help="write the comparison here (JSON)")
    a = ap.parse_args(argv)
    result = run(a.stream, a.vllm, a.out)
    if a.summary:
        atomic_write_text(a.summary, json.dumps(result, indent=2) + "\n")
    brief = {k: v for k, v in result.items() if k != "first_difference"}
    print(json.dumps(brief))
    if result["first_difference"] is not None:
        print("first difference:", json.dumps(result["first_difference"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
