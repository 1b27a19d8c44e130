"""Round Attention (arXiv 2502.15294) and CachedAttention's KV truncation (arXiv 2403.19708, §3.4) checked on
a real model (SmolLM2-135M-Instruct) and real conversations (ShareGPT), on CPU."""
