"""The step-indexed request stream and the committed fixture of vLLM's V1 scheduler decisions
(bench/vllm_scheduler: README.md there says how both were made). kvsim's chunked scheduler is
replayed against this fixture; these tests pin what the fixture and the stream rules promise."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "vllm_scheduler"))
import stream as st  # noqa: E402

DATA = ROOT / "tests" / "data"
STREAM = DATA / "vllm_stream_small.jsonl"
STEPS = DATA / "vllm_steps_small.jsonl"


@pytest.fixture(scope="module")
def small():
    header, reqs = st.read_stream(STREAM)
    lines = STEPS.read_text().splitlines()
    config = json.loads(lines[0])
    steps = [json.loads(line) for line in lines[1:]]
    return header, reqs, config, steps


def test_next_turn_prompt_starts_with_previous_prompt_and_reply(small):
    header, reqs, _, _ = small
    pairs = [(a, b) for a, b in zip(reqs, reqs[1:]) if a.session == b.session]
    assert pairs
    for a, b in pairs:
        history = st.prompt_token_ids(a, header) + st.reply_token_ids(a, header)
        prompt = st.prompt_token_ids(b, header)
        assert b.prompt_tokens == a.prompt_tokens + a.max_tokens + b.new_tokens
        assert prompt[: len(history)] == history


def test_only_whole_system_prompt_blocks_are_shared_across_sessions():
    header = st.StreamHeader(st.FORMAT, 16, 120, 4096, "", 0, 1.0, 0.03, 1.0, None)
    # 120 system tokens: blocks 0..6 (positions 0..111) are all system prompt; block 7 holds
    # positions 112..119 of the system prompt and 120..127 of the conversation.
    a = st.StreamRequest("a", 3, 0, 160, 40, 8, 0, None)
    b = st.StreamRequest("b", 5, 0, 160, 40, 8, 0, None)
    ta, tb = st.prompt_token_ids(a, header), st.prompt_token_ids(b, header)
    assert ta[:112] == tb[:112]
    assert ta[112:120] == tb[112:120]
    assert all(x != y for x, y in zip(ta[120:], tb[120:]))
    assert st.block_key(3, 6, 16, 120) == st.block_key(5, 6, 16, 120) == ("system", 6)
    assert st.block_key(3, 7, 16, 120) == (3, 7) != st.block_key(5, 7, 16, 120)


def test_next_turn_is_released_think_steps_after_the_finishing_step():
    reqs = [st.StreamRequest("s0-t0", 0, 0, 130, 10, 4, 5, None),
            st.StreamRequest("s0-t1", 0, 1, 150, 6, 4, None, 7),
            st.StreamRequest("s1-t0", 1, 0, 130, 10, 4, 2, None)]
    rel = st.Releases(reqs)
    assert [r.id for r in rel.due(4)] == ["s1-t0"]
    assert [r.id for r in rel.due(5)] == ["s0-t0"]
    assert rel.next_due_step() is None
    rel.finished("s0-t0", 20)
    assert rel.next_due_step() == 27
    assert rel.due(26) == []
    assert [r.id for r in rel.due(27)] == ["s0-t1"]


def test_fixture_was_made_from_the_committed_stream(small):
    _, _, config, _ = small
    assert config["stream_sha256"] == st.file_sha256(STREAM)
    assert config["vllm_scheduler"] == "vllm.v1.core.sched.scheduler.Scheduler"


def test_fixture_arrivals_follow_the_release_rule(small):
    _, reqs, _, steps = small
    rel = st.Releases(reqs)
    for row in steps:
        expected = [r.id for r in rel.due(row["step"])]
        assert row["arrived"] == expected, row["step"]
        for rid in row["finished"]:
            rel.finished(rid, row["step"])
    assert rel.released == len(reqs)


def test_fixture_keeps_vllm_budgets_and_block_aligned_hits(small):
    header, reqs, config, steps = small
    prompt = {r.id: r.prompt_tokens for r in reqs}
    for row in steps:
        assert sum(n for _, n, _, _ in row["sched"]) <= config["max_num_batched_tokens"]
        assert len(row["sched"]) <= config["max_num_seqs"]
        assert 0 <= row["free_blocks"] <= config["usable_blocks"]
        for rid, hit in row["admitted"].items():
            assert hit % header.block_size == 0
            assert hit < prompt[rid] or rid in {p for r in steps for p in r["preempted"]}


def test_every_request_decodes_its_reply_once_prefilled(small):
    # Output tokens = decode steps + the token sampled by each prefill that completed the prompt
    # (or a recompute after preemption), which produces one token without counting as a decode.
    _, reqs, _, steps = small
    decodes = {r.id: 0 for r in reqs}
    for row in steps:
        for rid, _, kind, _ in row["sched"]:
            decodes[rid] += kind == "d"
    preempted = {p for row in steps for p in row["preempted"]}
    for r in reqs:
        assert decodes[r.id] == r.max_tokens - 1 or r.id in preempted, r.id


def test_fixture_exercises_chunking_preemption_and_prefix_hits(small):
    _, reqs, _, steps = small
    prompt = {r.id: r.prompt_tokens for r in reqs}
    chunks = [e for row in steps for e in row["sched"]
              if e[2] == "p" and e[3] + e[1] < prompt[e[0]]]
    assert chunks, "no prefill was split into chunks"
    assert sum(len(row["preempted"]) for row in steps) >= 1
    hits = [h for row in steps for h in row["admitted"].values()]
    assert any(h > 112 for h in hits), "no hit beyond the shared system prompt"
    assert 112 in hits, "no hit on the shared system prompt alone"
