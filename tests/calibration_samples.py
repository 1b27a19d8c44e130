"""Raw calibration samples of a made-up GPU, in the shape `gpu.calibrate.measure` returns them."""


def raw_samples(prefill=lambda n, h: 0.1 + 0.001 * n + 1e-6 * n * h):
    news, hists, batches, ctxs = [1, 64, 512], [0, 256, 1024], [1, 4], [256, 1024]
    link = [{"chunk_bytes": c, "ms": [1.0], "gbps": g} for c, g in ((1 << 18, 10.0), (1 << 24, 40.0), (1 << 30, 50.0))]
    return {
        "device": "test", "measured_at": "2026-11-23T00:00:00Z", "command": "test",
        "gpu": {"hbm_bytes": 80e9, "peak_bf16_flops": 7.5e14, "hbm_bw_gbps": 2900.0},
        "links": {k: link for k in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")},
        "ssd": {"method": "o_direct",
                "read": [{"chunk_bytes": 1 << 20, "gbps": 1.5}, {"chunk_bytes": 1 << 26, "gbps": 1.6}],
                "write": [{"chunk_bytes": 1 << 20, "gbps": 2.4}, {"chunk_bytes": 1 << 26, "gbps": 2.6}]},
        "models": {"llama2-7b": {
            "prefill": {"new_tokens": news, "history_tokens": hists,
                        "rows": [{"new_tokens": n, "history_tokens": h, "ms": prefill(n, h)} for n in news for h in hists]},
            "decode": {"batch": batches, "context_tokens": ctxs,
                       "rows": [{"batch": b, "context_tokens": c, "ms": 0.2 + 1e-5 * b * c} for b in batches for c in ctxs],
                       "head": [{"batch": b, "ms": 0.15 + 0.01 * b} for b in batches]},
            "head": {"prefill": [{"new_tokens": n, "ms": 0.3} for n in news]},
        }},
    }
