"""The GPU validation slice is a valid canonical trace that both executor and simulator can replay."""
from gpu.trace_slice import make_slice, sharegpt_like


def test_slice_caps_replies_and_session_length_and_keeps_multi_turn_sessions():
    src = sharegpt_like(n_sessions=60, seed=1)
    s = make_slice(src, n_sessions=20, max_turns=3, output_cap=16, max_session_tokens=1500, seed=2)
    assert s.session_id.nunique() == 20
    assert s.output_tokens.max() <= 16
    per = s.groupby("session_id").apply(lambda g: (g.prompt_tokens + g.output_tokens).sum())
    assert per.max() <= 1500
    assert s.groupby("session_id").turn.max().max() <= 2
    firsts = s[s.turn == 0].sort_values("session_id")
    assert firsts.arrival_s.is_monotonic_increasing and s[s.turn > 0].think_s.notna().all()


def test_slice_is_deterministic_for_a_seed():
    src = sharegpt_like(n_sessions=40, seed=0)
    a = make_slice(src, n_sessions=10, seed=5)
    b = make_slice(src, n_sessions=10, seed=5)
    assert a.drop(columns="prefix_hashes").equals(b.drop(columns="prefix_hashes"))
