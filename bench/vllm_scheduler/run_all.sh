#!/usr/bin/env bash
# The reference runs: three 1,000-request ShareGPT streams (low / mid / high load) through vLLM's V1
# scheduler, plus the small CI fixture. Streams and summaries are committed; the per-step files
# (tens of MB) are regenerated here. About a minute of CPU in all after the venv exists.
#
#   bash bench/vllm_scheduler/run_all.sh [VENV_DIR]      (default /work/.venv-vllm; setup_env.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/../.."
VPY="${1:-/work/.venv-vllm}/bin/python"
OUT=results/scheduler
BLOCKS=1500   # 24,000 tokens of KV: small enough that the high load preempts (README.md)
mkdir -p "$OUT"
for load in low:400 mid:60 high:10; do
  name="${load%%:*}"; gap="${load##*:}"
  python bench/vllm_scheduler/stream.py --requests 1000 --session-gap-steps "$gap" --seed 0 \
    --out "$OUT/stream_$name.jsonl"
  "$VPY" bench/vllm_scheduler/drive_vllm.py "$OUT/stream_$name.jsonl" --num-gpu-blocks "$BLOCKS" \
    --out "$OUT/vllm_$name.steps.jsonl" --summary "$OUT/vllm_$name.summary.json" > /dev/null
done
# CI fixture: ~50 requests, 512-token budget (chunking), 160 blocks (preemptions), short replies.
python bench/vllm_scheduler/stream.py --requests 50 --session-gap-steps 2 --max-reply-tokens 48 \
  --think-scale 0.005 --max-model-len 2048 --seed 1 --out tests/data/vllm_stream_small.jsonl
"$VPY" bench/vllm_scheduler/drive_vllm.py tests/data/vllm_stream_small.jsonl --num-gpu-blocks 160 \
  --max-num-batched-tokens 512 --max-num-seqs 128 --out tests/data/vllm_steps_small.jsonl > /dev/null
python - <<'PY'
import json
for name in ("low", "mid", "high"):
    s = json.load(open(f"results/scheduler/vllm_{name}.summary.json"))
    print(name, {k: s[k] for k in ("steps", "last_step", "preemptions", "hit_tokens", "prefill_tokens", "decode_tokens", "wall_s")})
PY
