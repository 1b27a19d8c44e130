"""Hardware profiles for tests, as parsed dicts (no files, no GPU)."""


def small_profile() -> dict:
    """A complete hardware profile (the schema `kvsim gpu calibrate` writes) for llama2-7b, with round numbers:
    links 5 GB/s at 1 KiB and 25 GB/s at 1 MiB, SSD 3 / 2 GB/s read / write, small prefill/decode tables."""
    return {
        "schema": "kvsim-hardware-profile/1", "device": "test", "measured_at": "now",
        "gpu": {"hbm_bytes": 80e9, "peak_bf16_flops": 1e15, "hbm_bw_gbps": 3000},
        "links": {"h2d_pinned": {"chunk_bytes": [1024, 1048576], "gbps": [5.0, 25.0]},
                  "d2h_pinned": {"chunk_bytes": [1024, 1048576], "gbps": [5.0, 25.0]}},
        "ssd": {"read": {"chunk_bytes": [4096], "gbps": [3.0]}, "write": {"chunk_bytes": [4096], "gbps": [2.0]}},
        "models": {"llama2-7b": {
            "prefill_layer_ms": {"new_tokens": [1, 1000], "history_tokens": [0, 1000], "ms": [[0.1, 0.2], [2.0, 3.0]]},
            "decode_layer_ms": {"batch": [1, 8], "context_tokens": [100, 1000], "ms": [[0.3, 0.4], [0.5, 0.9]]},
            "head_ms": {"prefill": {"new_tokens": [1, 1000], "ms": [0.5, 0.5]},
                        "decode": {"batch": [1, 8], "ms": [0.4, 0.6]}}}},
    }
