"""Drive vLLM's own V1 scheduler with a step-indexed request stream and no model.

Runs in vLLM's environment (bench/vllm_scheduler/setup_env.sh), never in CI:

    /work/.venv-vllm/bin/python bench/vllm_scheduler/drive_vllm.py STREAM.jsonl --num-gpu-blocks N \
        --out results/scheduler/vllm_<load>.jsonl

Each step: add the requests due (stream.Releases), call `Scheduler.schedule()`, fabricate the model
output (one sampled token for every request whose scheduled tokens reach the end of its known tokens:
a decode, or the prefill chunk that completes its prompt; none for a partial prefill chunk, as
vLLM's model runner returns), and feed it to `Scheduler.update_from_output`. The sampled token is the
session's next token (stream.reply_token_ids), so a finished turn's blocks are exactly the next
turn's history.

Output JSONL: a header line {"kind": "config", ...} with everything the scheduler was built with,
then one line per non-idle step:
  step         the step index (idle steps, with nothing waiting or running, are skipped, not recorded)
  arrived      ids added to the scheduler before this step's schedule()
  sched        [[id, tokens, kind, computed_before], ...] in vLLM's order (running queue first, then
               admissions from the waiting queue); kind "d" = decode (the request has output and
               only its last sampled token is left to compute), "p" = prefill chunk (prompt, or the
               recompute of prompt + output after a preemption)
  admitted     {id: prefix-cache hit tokens} for requests taken from the waiting queue this step
               (new, or resumed after a preemption): their num_computed_tokens at admission
  preempted    ids preempted in this step
  finished     ids whose last reply token this step produced
  free_blocks  block pool's free count (includes cached blocks that are eviction candidates)
               after update_from_output
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import stream as st  # noqa: E402
from sim.files import atomic_write_text  # noqa: E402

# vLLM's defaults for an OpenAI-compatible server on an H100/H200 (>= 70 GiB, not A100):
# EngineArgs.get_batch_defaults in vllm/engine/arg_utils.py gives
# max_num_batched_tokens=8192 and max_num_seqs=1024 for UsageContext.OPENAI_API_SERVER.
GPU_SERVER_MAX_NUM_BATCHED_TOKENS = 8192
GPU_SERVER_MAX_NUM_SEQS = 1024

# A LLaMA-2-13B-shaped config.json (the simulator's default model) with a 16k window. The scheduler
# reads only max_model_len from it; the shape sets nothing else here (the block count is given).
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
    "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 40, "vocab_size": 32000, "rms_norm_eps": 1e-05,
    "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
}


def build_scheduler(model_dir: Path, *, max_model_len: int, block_size: int, num_gpu_blocks: int,
                    max_num_batched_tokens: int, max_num_seqs: int, long_prefill_token_threshold: int,
                    watermark: float):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(MODEL_CONFIG, max_position_embeddings=max_model_len)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model_config = ModelConfig(model=str(model_dir), skip_tokenizer_init=True,
                               max_model_len=max_model_len, dtype="float16")
    # async_scheduling=False: the synchronous Scheduler (vLLM's GPU default is the AsyncScheduler
    # subclass, which overlaps scheduling with execution; see README.md).
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        max_model_len=max_model_len, is_encoder_decoder=False, enable_chunked_prefill=True,
        long_prefill_token_threshold=long_prefill_token_threshold, watermark=watermark,
        async_scheduling=False)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = num_gpu_blocks
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                             cache_config=cache_config)
    hf = model_config.hf_config
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=hf.num_key_value_heads,
                             head_size=hf.hidden_size // hf.num_attention_heads, dtype=torch.float16)
    kv_cache_config = KVCacheConfig(num_blocks=num_gpu_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layers"], spec)])
    sched = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                      structured_output_manager=StructuredOutputManager(vllm_config),
                      block_size=block_size, log_stats=False)
    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(block_size, hash_fn)
    sc = vllm_config.scheduler_config
    used = {
        "vllm_scheduler": f"{Scheduler.__module__}.{Scheduler.__qualname__}",
        "max_model_len": vllm_config.model_config.max_model_len,
        "block_size": block_size, "num_gpu_blocks": num_gpu_blocks,
        "usable_blocks": sched.kv_cache_manager.block_pool.get_num_free_blocks(),
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_scheduled_tokens": sched.max_num_scheduled_tokens,
        "max_num_seqs": sc.max_num_seqs, "enable_chunked_prefill": sc.enable_chunked_prefill,
        "enable_prefix_caching": vllm_config.cache_config.enable_prefix_caching,
        "prefix_caching_hash_algo": vllm_config.cache_config.prefix_caching_hash_algo,
        "long_prefill_token_threshold": sc.long_prefill_token_threshold,
        "watermark": sc.watermark, "watermark_blocks": sched.kv_cache_manager.watermark_blocks,
        "scheduler_reserve_full_isl": sc.scheduler_reserve_full_isl, "policy": sc.policy,
        "async_scheduling": sc.async_scheduling, "preemption": "recompute (the only V1 mode)",
    }
    return sched, hasher, used


def drive(stream_path: Path, out: Path, *, num_gpu_blocks: int, max_num_batched_tokens: int,
          max_num_seqs: int, long_prefill_token_threshold: int = 0, watermark: float = 0.0,
          max_steps: int = 2_000_000) -> dict:
    import vllm
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus

    header, requests = st.read_stream(stream_path)
    sched, hasher, used = build_scheduler(
        Path(tempfile.mkdtemp(prefix="vllm_model_")), max_model_len=header.max_model_len, block_size=header.block_size,
        num_gpu_blocks=num_gpu_blocks, max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs, long_prefill_token_threshold=long_prefill_token_threshold,
        watermark=watermark)
    config = {"kind": "config", "vllm_version": vllm.__version__, "stream": stream_path.name,
              "stream_sha256": st.file_sha256(stream_path), **used}
    releases = st.Releases(requests)
    replies: dict[str, list[int]] = {}
    live: dict[str, Request] = {}
    rows = [json.dumps(config)]
    step, done = 0, 0
    totals = {"steps": 0, "preemptions": 0, "hit_tokens": 0, "prefill_tokens": 0, "decode_tokens": 0}
    t0 = time.perf_counter()
    while done < len(requests):
        if not live:
            nxt = releases.next_due_step()
            if nxt is None:
                raise RuntimeError(f"{stream_path}: {len(requests) - done} requests never released")
            step = max(step, nxt)
        arrived = []
        for r in releases.due(step):
            sp = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)
            req = Request(r.id, st.prompt_token_ids(r, header), sp, None, arrival_time=float(step),
                          block_hasher=hasher)
            sched.add_request(req)
            live[r.id] = req
            replies[r.id] = st.reply_token_ids(r, header)
            arrived.append(r.id)
        waiting_before = {i for i, q in live.items() if q.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)}
        out_s = sched.schedule()
        sched_rows, admitted, sampled, ids = [], {}, [], []
        for rid, n in out_s.num_scheduled_tokens.items():
            q = live[rid]
            before = q.num_computed_tokens - n  # schedule() already advanced it
            # A decode computes only the last sampled token; a prompt (or a recompute after a
            # preemption) that the prefix cache covers up to one token is still a prefill.
            kind = "d" if q.num_output_tokens > 0 and before == q.num_tokens - 1 else "p"
            sched_rows.append([rid, n, kind, before])
            if rid in waiting_before:
                admitted[rid] = before
            totals["decode_tokens" if kind == "d" else "prefill_tokens"] += n
            ids.append(rid)
            # A token is sampled once the scheduled tokens reach the end of the known tokens.
            reaches_end = q.num_computed_tokens >= q.num_tokens
            sampled.append([replies[rid][q.num_output_tokens]] if reaches_end else [])
        preempted = sorted(out_s.preempted_req_ids or ())
        if not ids and not preempted:
            raise RuntimeError(f"step {step}: nothing scheduled with {len(live)} requests live "
                               f"(a request larger than the KV cache?)")
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=sampled)
        sched.update_from_output(out_s, mro)
        finished = [rid for rid in ids if live[rid].is_finished()]
        for rid in finished:
            releases.finished(rid, step)
            del live[rid]
        done += len(finished)
        totals["steps"] += 1
        totals["preemptions"] += len(preempted)
        totals["hit_tokens"] += sum(admitted.values())
        rows.append(json.dumps({
            "step": step, "arrived": arrived, "sched": sched_rows, "admitted": admitted,
            "preempted": preempted, "finished": finished,
            "free_blocks": sched.kv_cache_manager.block_pool.get_num_free_blocks()}))
        step += 1
        if totals["steps"] > max_steps:
            raise RuntimeError(f"{stream_path}: more than {max_steps} steps")
    totals["last_step"] = step - 1
    totals["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out, "\n".join(rows) + "\n")
    return {**config, **totals}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stream")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-gpu-blocks", type=int, required=True)
    ap.add_argument("--max-num-batched-tokens", type=int, default=GPU_SERVER_MAX_NUM_BATCHED_TOKENS)
    ap.add_argument("--max-num-seqs", type=int, default=GPU_SERVER_MAX_NUM_SEQS)
    ap.add_argument("--long-prefill-token-threshold", type=int, default=0)
    ap.add_argument("--watermark", type=float, default=0.0)
    ap.add_argument("--summary", help="also write the config and totals here (JSON)")
    a = ap.parse_args(argv)
    summary = drive(Path(a.stream), Path(a.out), num_gpu_blocks=a.num_gpu_blocks,
                    max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
                    long_prefill_token_threshold=a.long_prefill_token_threshold, watermark=a.watermark)
    if a.summary:
        atomic_write_text(a.summary, json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
