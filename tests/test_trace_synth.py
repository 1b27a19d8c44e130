"""Synthetic traces: schema, fitted distributions, determinism, spec files."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from sim.errors import KvsimError
from sim.trace import read_trace, validate_trace, write_trace
from sim.trace_synth import DEFAULT_SPEC_PATH, SynthSpec, fit, generate, load_spec, save_spec


def _real_like_trace(n_sessions=400, seed=3):
    """A multi-turn trace with known shape: 1-4 turns, long first prompts, short follow-ups."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        for t in range(int(rng.integers(1, 5))):
            rows.append(dict(session_id=f"c{s}", turn=t, arrival_s=s * 2.0 if t == 0 else np.nan,
                             think_s=np.nan if t == 0 else 30.0,
                             prompt_tokens=int(rng.integers(500, 1000) if t == 0 else rng.integers(10, 50)),
                             output_tokens=int(rng.integers(100, 300)), prefix_hashes=None))
    return validate_trace(pd.DataFrame(rows))


def test_generated_trace_passes_canonical_validation():
    spec = fit(_real_like_trace())
    df = generate(dataclasses.replace(spec, n_sessions=300), seed=1)
    out = validate_trace(df)
    assert out["session_id"].nunique() == 300
    assert (out["prompt_tokens"] >= 1).all() and (out["output_tokens"] >= 1).all()


def test_fit_recovers_turns_rate_and_think_time():
    spec = fit(_real_like_trace())
    assert spec.turns_values == (1, 2, 3, 4)
    assert spec.session_rate_per_s == pytest.approx(0.5)
    assert spec.think_time_mean_s == pytest.approx(30.0)
    assert spec.prompt_first_q[0] >= 500 and spec.prompt_first_q[-1] < 1000
    assert spec.prompt_later_q[-1] < 50


def test_generated_lengths_follow_the_fitted_distributions():
    spec = dataclasses.replace(fit(_real_like_trace()), n_sessions=20000)
    df = generate(spec, seed=7)
    first = df["turn"] == 0
    assert df.loc[first, "prompt_tokens"].between(500, 1000).all()
    assert df.loc[~first, "prompt_tokens"].between(10, 50).all()
    turns = df.groupby("session_id").size()
    assert turns.mean() == pytest.approx(spec.mean_turns(), rel=0.02)
    assert df["think_s"].mean() == pytest.approx(30.0, rel=0.05)
    gaps = np.diff(np.sort(df.loc[first, "arrival_s"].to_numpy()))
    assert gaps.mean() == pytest.approx(2.0, rel=0.05)


def test_scales_stretch_lengths_for_length_sweeps():
    spec = dataclasses.replace(fit(_real_like_trace()), n_sessions=2000)
    base = generate(spec, seed=5)
    long = generate(dataclasses.replace(spec, prompt_scale=2.0, output_scale=3.0), seed=5)
    assert long["prompt_tokens"].sum() == pytest.approx(2 * base["prompt_tokens"].sum(), rel=0.01)
    assert long["output_tokens"].sum() == pytest.approx(3 * base["output_tokens"].sum(), rel=0.01)


def test_generation_is_deterministic_per_seed():
    spec = dataclasses.replace(fit(_real_like_trace()), n_sessions=50)
    pd.testing.assert_frame_equal(generate(spec, 11), generate(spec, 11))
    assert not generate(spec, 11).equals(generate(spec, 12))


def test_spec_yaml_round_trip_and_trace_file_round_trip(tmp_path):
    spec = fit(_real_like_trace(), source="unit test")
    assert load_spec(save_spec(spec, tmp_path / "s.yaml")) == spec
    df = generate(dataclasses.replace(spec, n_sessions=40), seed=2)
    back = read_trace(write_trace(df, tmp_path / "t.parquet"))
    pd.testing.assert_frame_equal(back, validate_trace(df))


def test_bad_spec_file_names_file_and_key(tmp_path):
    spec = fit(_real_like_trace())
    path = save_spec(spec, tmp_path / "s.yaml")
    path.write_text(path.read_text().replace("session_rate_per_s:", "session_rate_per_s: -1\nx_old:", 1))
    with pytest.raises(KvsimError, match=r"s\.yaml: x_old: unknown key"):
        load_spec(path)
    save_spec(dataclasses.replace(spec), path)
    path.write_text(path.read_text().replace(f"n_sessions: {spec.n_sessions}", "n_sessions: lots"))
    with pytest.raises(KvsimError, match=r"s\.yaml: n_sessions: expected a number"):
        load_spec(path)
    with pytest.raises(KvsimError, match="session_rate_per_s"):
        dataclasses.replace(spec, session_rate_per_s=0.0)


@pytest.mark.skipif(not DEFAULT_SPEC_PATH.exists(), reason="traces/synth_default.yaml not built yet")
def test_default_spec_is_fitted_to_the_committed_sharegpt_slice():
    slice_path = DEFAULT_SPEC_PATH.parent / "sharegpt_small.parquet"
    assert SynthSpec.default() == fit(read_trace(slice_path), source=SynthSpec.default().source)


def test_a_scale_that_would_draw_more_than_a_billion_tokens_is_refused():
    from sim.trace import MAX_TOKENS

    spec = SynthSpec.default()
    top = spec.prompt_first_q[-1]
    with pytest.raises(KvsimError, match=r"prompt_first_q: the longest draw would be .* expected at most 1,000,000,000"):
        dataclasses.replace(spec, prompt_scale=2 * MAX_TOKENS / top)
    dataclasses.replace(spec, prompt_scale=MAX_TOKENS / max(spec.prompt_first_q[-1], spec.prompt_later_q[-1]) / 2)
