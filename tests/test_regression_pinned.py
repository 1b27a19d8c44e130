"""Per-turn output of small runs, pinned to a committed file (tests/data/pinned_turns.csv).

Runs of `configs/default.yaml` cut to its first 20 sessions (the committed ShareGPT slice,
LLaMA-2-13B on an A100-80GB), chosen so that between them they go through every mechanism of the
serving loop: AttentionStore with a 4 GB DRAM and a 6 GB SSD (DRAM victims demoted to SSD, SSD
victims dropped, scheduler-aware fetch and eviction, truncation with decoupled positions), the same
with synchronous saves, LRU, no prefetch and invalidated truncated histories, the HBM-only prefix
cache in a 40 GB GPU (HBM eviction), and recompute, in the prefill-first engine; and in the chunked one
(the default), AttentionStore with fetch, a prefix cache in a GPU small enough to preempt, recompute.

Any change that moves a simulated number fails here. When a change is *meant* to move numbers,
regenerate the file and commit it with the change, saying why the numbers moved:

    python tests/test_regression_pinned.py        # rewrites tests/data/pinned_turns.csv
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.config import load_config  # noqa: E402
from sim.files import atomic_write_text  # noqa: E402
from sim.runner import run_simulation  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "pinned_turns.csv"
BASE = {"workload.max_sessions": 20}
PF = {"scheduler.kind": "prefill_first"}
RUNS = {
    "attentionstore": {**PF, "host.dram_bytes": "4GB", "ssd.bytes": "6GB"},
    "attentionstore_sync_lru_invalidate": {
        **PF, "host.dram_bytes": "4GB", "ssd.bytes": "6GB", "policy.async_save": False, "policy.eviction": "lru",
        "policy.scheduler_aware_fetch": False, "policy.truncation": "invalidate"},
    "hbm_prefix": {**PF, "policy.kind": "hbm_prefix", "gpu.hbm_bytes": "40GB"},
    "recompute": {**PF, "policy.kind": "recompute"},
    # the chunked engine (the default): the host tiers with fetch, and a GPU small enough to preempt
    "chunked_attentionstore": {"host.dram_bytes": "4GB", "ssd.bytes": "6GB"},
    "chunked_hbm_prefix_preempting": {"policy.kind": "hbm_prefix", "gpu.hbm_bytes": "34GB",
                                      "workload.session_rate_per_s": 5.0},
    "chunked_recompute": {"policy.kind": "recompute"},
}


def simulate() -> pd.DataFrame:
    frames = []
    for name, over in RUNS.items():
        cfg = load_config(ROOT / "configs" / "default.yaml", {**BASE, **over})
        t = run_simulation(cfg).turns
        t.insert(0, "run", name)
        frames.append(t)
    df = pd.concat(frames, ignore_index=True)
    df["hit_tier"] = df["hit_tier"].astype(str)
    return df


def read_fixture() -> pd.DataFrame:
    # floats are written as repr and read back to the same double; ids are text even if they look
    # like numbers or "NA"
    return pd.read_csv(FIXTURE, dtype={"run": str, "session_id": str, "hit_tier": str},
                       keep_default_na=False, na_values=[""])


def test_fixture_covers_every_mechanism_it_claims():
    """Guards a fixture (or a config default) drifting so that the pinned runs stop exercising
    SSD demotion and eviction, HBM eviction, misses, truncation and synchronous saves."""
    df = read_fixture()
    assert list(df["run"].unique()) == list(RUNS) and 600 <= len(df) <= 1200
    tiers = df.groupby("run")["hit_tier"].agg(set)
    assert {"dram", "ssd", "miss"} <= tiers["attentionstore"]
    assert {"hbm", "miss"} <= tiers["hbm_prefix"]
    assert tiers["recompute"] <= {"none", "miss"}
    assert df["truncated"].any()
    sync = df[df["run"] == "attentionstore_sync_lru_invalidate"]
    assert (sync.loc[sync["truncated"], "hit_tokens"] == 0).all()
    assert {"dram", "ssd"} <= tiers["chunked_attentionstore"]
    assert df.loc[df["run"] == "chunked_hbm_prefix_preempting", "preemptions"].sum() > 0


def test_small_runs_reproduce_the_pinned_per_turn_output():
    """Guards every simulated number of the per-turn table: strings, integers and booleans exactly,
    floats to 1e-12 relative (any real change moves them far more; a libm ulp does not). A column
    added to the table later is not pinned until the file is regenerated; one removed fails."""
    want = read_fixture()
    got = simulate()
    assert [c for c in want.columns if c not in got.columns] == []
    assert len(got) == len(want)
    for col in want.columns:
        w, g = want[col].to_numpy(), got[col].to_numpy()
        if want[col].dtype.kind == "f":
            same = np.isclose(g.astype(float), w, rtol=1e-12, atol=0.0, equal_nan=True)
        else:
            same = g.astype(w.dtype) == w
        if not same.all():
            r = int(np.flatnonzero(~same)[0])
            raise AssertionError(
                f"{col}: {int((~same).sum())} of {len(w)} rows differ; first at row {r} "
                f"(run {want['run'][r]}, session {want['session_id'][r]}, turn {want['turn'][r]}): "
                f"pinned {w[r]!r}, now {g[r]!r}. If the change is meant to move numbers, regenerate: "
                f"python tests/test_regression_pinned.py")


if __name__ == "__main__":
    df = simulate()
    atomic_write_text(FIXTURE, df.to_csv(index=False))
    print(f"wrote {FIXTURE.relative_to(ROOT)}: {len(df)} rows")
