"""Planner comparison (issue 16, item 4): a MoE model on one 8-GPU replica served tensor-parallel vs with
data-parallel attention and expert parallelism (`gpu.expert_parallel`), on the default workload.

    PYTHONPATH=. python bench/ep_vs_tp.py [--models deepseek-v3 qwen3-235b-a22b] [--gpu h200] [--rates 1 4 16]
                                          [--synthetic 4000] [--steps]

Every run is configs/default.yaml (the committed ShareGPT slice, chunked vLLM-V1 scheduler, AttentionStore
policy) with configs/sweeps/tp_models.yaml's 8-GPU settings: host links 38 / 34 GB/s per GPU, 1 TB DRAM and
20 TB SSD per replica, TP's all-reduces a ring over 337 GB/s with 16.5 us a call (run 13's TP 4 NCCL table
extrapolated); EP's all-to-alls go over the same link at the same fixed time a call (none measured). Prints,
per model, deployment and session rate: the HBM left for KV, TTFT and TPOT (p50, p99), and the cost per
1,000 turns (GPU-busy: the replica's hourly rate over its busy hours; provisioned: over the makespan).
Roofline only (gpu.efficiency measured: the H100 GEMM and attention shares): no MoE layer or all-to-all has
been measured, so these are the model's figures, not a validated prediction.
"""
import argparse
import time

from sim.config import load_config
from sim.costmodel import build_cost_model
from sim.runner import run_simulation

EIGHT_GPUS = {
    "gpu.count": 8,
    "host.h2d_gbps": 38,
    "host.d2h_gbps": 34,
    "host.dram_bytes": "1TB",
    "ssd.bytes": "20TB",
    "gpu.allreduce": "ring",
    "gpu.nvlink_gbps": 337,
    "gpu.allreduce_latency_us": 16.5,
}


def decode_steps(models, gpu):
    """One decode step (ms) at batch x context per sequence under each deployment, and whether that
    batch's KV fits the HBM each leaves for KV: where the step, not the workload, favours EP."""
    print(f"\nDecode step on 8 x {gpu} (ms; '-' where the batch's KV does not fit the deployment's HBM):\n")
    print("| model | batch | context / seq | TP 8 ms | EP 8 ms | EP / TP |")
    print("|---|---|---|---|---|---|")
    for model in models:
        tp, ep = (build_cost_model(load_config("configs/default.yaml", {
            **EIGHT_GPUS, "model": model, "gpu.name": gpu, "gpu.expert_parallel": e})) for e in (False, True))
        for batch in (1, 16, 64, 256):
            for ctx in (2048, 16384, 65536):
                kv = tp.shape.kv_bytes(ctx) * batch
                t = [c.decode_step_s(batch, batch * ctx) * 1e3 if kv <= c.hbm_kv_bytes else None for c in (tp, ep)]
                ratio = f"{t[1] / t[0]:.2f}" if None not in t else ""
                cells = " | ".join(f"{x:.1f}" if x is not None else "-" for x in t)
                print(f"| {model} | {batch} | {ctx} | {cells} | {ratio} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deepseek-v3", "qwen3-235b-a22b"])
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--rates", nargs="+", type=float, default=[1.0, 4.0, 16.0],
                    help="workload.session_rate_per_s values")
    ap.add_argument("--sessions", type=int, default=0, help="cap the trace's sessions (0: all; a quick look)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="the built-in generator's N sessions in place of the trace (a load the slice cannot make)")
    ap.add_argument("--steps", action="store_true", help="also print single decode steps TP vs EP")
    args = ap.parse_args()
    work = f"synthetic generator, {args.synthetic} sessions" if args.synthetic else "the trace"
    print(f"configs/default.yaml ({work}) on 8 x {args.gpu}, {', '.join(f'{k}={v}' for k, v in EIGHT_GPUS.items())}\n")
    print("| model | deployment | KV room GB | sessions/s | turns | TTFT p50 s | TTFT p99 s | TPOT p50 ms | "
          "TPOT p99 ms | turns/s | USD / 1k turns (busy) | USD / 1k turns (provisioned) | sim s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for ep in (False, True):
            for rate in args.rates:
                over = {**EIGHT_GPUS, "model": model, "gpu.name": args.gpu, "gpu.expert_parallel": ep,
                        "workload.session_rate_per_s": rate}
                if args.sessions:
                    over["workload.max_sessions"] = args.sessions
                if args.synthetic:
                    over.update({"workload.trace": None, "workload.synthetic.n_sessions": args.synthetic})
                cfg = load_config("configs/default.yaml", over)
                room = build_cost_model(cfg).hbm_kv_bytes
                t0 = time.process_time()
                s = run_simulation(cfg).summary
                dt = time.process_time() - t0
                print(f"| {model} | {'EP 8 (DP attention)' if ep else 'TP 8'} | {room / 1e9:.0f} | {rate:g} | "
                      f"{s['turns']} | {s['ttft_p50_s']:.3f} | {s['ttft_p99_s']:.3f} | {1e3 * s['tpot_p50_s']:.1f} | "
                      f"{1e3 * s['tpot_p99_s']:.1f} | {s['throughput_turns_per_s']:.2f} | {s['cost_per_1k_turns_usd']:.2f} | "
                      f"{1000.0 * s['provisioned_cost_usd'] / s['turns']:.2f} | {dt:.0f} |", flush=True)
    if args.steps:
        decode_steps(args.models, args.gpu)


if __name__ == "__main__":
    main()
