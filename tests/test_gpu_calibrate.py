"""The calibration writes exactly the cost model's profile schema (sim/costmodel.py is the one source)."""
import math

import pytest
import yaml

from gpu.calibrate import profile_from_raw, write_profile
from sim.costmodel import load_profile
from sim.errors import KvsimError


def _raw(prefill=lambda n, h: 0.1 + 0.001 * n + 1e-6 * n * h):
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


def test_profile_round_trips_through_the_cost_models_loader(tmp_path):
    out = tmp_path / "p.yaml"
    write_profile(_raw(), out, tmp_path / "raw.json")
    prof = load_profile(out)
    m = prof.models["llama2-7b"]
    # grid cells come back exactly; between cells the loader interpolates bilinearly, which is exact
    # for a function bilinear in (n, h)
    assert m.prefill_layer_ms(64, 256) == pytest.approx(0.1 + 0.064 + 1e-6 * 64 * 256, abs=1e-5)
    assert m.prefill_layer_ms(300, 600) == pytest.approx(0.1 + 0.3 + 1e-6 * 300 * 600, abs=1e-5)
    assert m.decode_layer_ms(4, 1024) == pytest.approx(0.2 + 1e-5 * 4 * 1024, abs=1e-5)
    assert m.head_decode_ms(4) == pytest.approx(0.19)
    assert prof.links["h2d_pinned"](1 << 24) == pytest.approx(40.0)
    assert prof.ssd_read(1 << 26) == pytest.approx(1.6)
    assert yaml.safe_load(out.read_text())["ssd"]["method"] == "o_direct"
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_measurement_is_refused_before_anything_is_written(tmp_path):
    raw = _raw(prefill=lambda n, h: math.nan if n == 64 else 0.5)
    out = tmp_path / "p.yaml"
    with pytest.raises(KvsimError, match="prefill_layer_ms"):
        write_profile(raw, out)
    assert not out.exists()


def test_table_rows_follow_new_tokens_and_columns_history():
    prof = profile_from_raw(_raw())
    t = prof["models"]["llama2-7b"]["prefill_layer_ms"]
    assert len(t["ms"]) == len(t["new_tokens"]) and all(len(r) == len(t["history_tokens"]) for r in t["ms"])
    assert t["ms"][2][0] == pytest.approx(0.1 + 0.512)
