"""Round Attention bookkeeping and selection on a tiny random Llama in plain torch (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from gpu.roundattn.conversations import ChatFormatter, Selection, dialogue, iter_elements
from gpu.roundattn.measure import (Variant, choose_rounds, evaluate_variants, full_pass, measure,
                                   summarise)
from gpu.roundattn.model import extend, full_logits, prefill, random_weights
from gpu.roundattn.rounds import Conversation, Round, history_positions, history_round_mass, round_of_token
from gpu.roundattn.topk import (dynamic_k_rounds, last_k_rounds, layer_visibility, residency, top_k_rounds)
from gpu.roundattn.watershed import adjacent_similarity, find_watershed, js_similarity
from sim.models import ModelShape

TINY = ModelShape("tiny-gqa", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=97,
                  max_context_tokens=512)


@pytest.fixture(scope="module")
def weights():
    return random_weights(TINY, seed=1)


def make_conv(round_sizes=((5, 4), (6, 3), (4, 5), (3, 6)), prefix=3, seed=0, conv_id="c") -> Conversation:
    """Rounds of (prompt, reply) token counts; the reply's last token stands for the template's newline."""
    g = torch.Generator().manual_seed(seed)
    n = prefix + sum(p + r for p, r in round_sizes)
    ids = tuple(int(x) for x in torch.randint(0, TINY.vocab, (n,), generator=g))
    rounds, edge = [], prefix
    for p, r in round_sizes:
        rounds.append(Round(edge, edge + p, edge + p + r - 1, edge + p + r))
        edge += p + r
    return Conversation(conv_id, ids, prefix, tuple(rounds))


def test_extend_over_a_prefilled_history_matches_one_causal_pass(weights):
    ids = torch.randint(0, TINY.vocab, (20,), generator=torch.Generator().manual_seed(3))
    cache = prefill(weights, ids[:12])
    res = extend(weights, cache, ids[12:], torch.arange(12, 20))
    assert torch.allclose(res.logits, full_logits(weights, ids)[12:], atol=1e-5)


def test_round_bookkeeping_maps_every_token_to_its_round():
    conv = make_conv()
    owner = round_of_token(conv).tolist()
    assert owner[:3] == [-1, -1, -1]
    assert owner[3:12] == [0] * 9 and owner[12:21] == [1] * 9 and owner[-9:] == [3] * 9
    assert conv.history_tokens == conv.current.start == 3 + 9 + 9 + 9
    assert history_positions(conv, (2, 0)).tolist() == [0, 1, 2] + list(range(3, 12)) + list(range(21, 30))
    assert conv.upto(2).current == conv.rounds[1]


def test_conversation_rejects_rounds_that_leave_a_gap():
    with pytest.raises(ValueError, match="tile"):
        Conversation("x", tuple(range(10)), 2, (Round(3, 5, 6, 10),))


def test_history_round_mass_sums_tokens_of_each_round_and_leaves_the_prefix_out():
    conv = make_conv(round_sizes=((1, 2), (1, 1), (2, 2)), prefix=2)  # history: prefix 2, rounds of 3 and 2
    key_mass = torch.tensor([[9.0, 9.0, 1.0, 1.0, 1.0, 0.5, 0.5]])  # one layer, 7 history tokens
    dist = history_round_mass(key_mass, conv)
    assert torch.allclose(dist, torch.tensor([[0.75, 0.25]]))


def test_top_k_with_all_rounds_reproduces_full_attention_exactly(weights):
    conv = make_conv()
    fp = full_pass(weights, conv)
    n = len(conv.history)
    for watershed in (0, 1, 2):
        # "all" on its own, so that its forward really runs (after "full" it would reuse full's logits)
        (full,) = evaluate_variants(weights, conv, fp, watershed, [Variant("full", "full")])
        (every,) = evaluate_variants(weights, conv, fp, watershed, [Variant("all", "topk", n)])
        assert every["rounds_kept"] == " ".join(map(str, range(n)))
        assert every["nll_sum"] == full["nll_sum"]  # exactly: the same operations on the same numbers
        assert every["agree_full"] == every["n_targets"] and every["saving"] == 0.0
    # the same through the raw forward: an explicit index of every history token == no restriction
    ids = conv.ids()[conv.current.start:]
    pos = torch.arange(conv.current.start, len(conv.token_ids))
    lower = extend(weights, fp.cache, ids, pos, stop_after=1)
    vis = layer_visibility(conv, TINY.layers, 1, tuple(range(n)))
    resumed = extend(weights, fp.cache, ids, pos, vis, start_layer=2, hidden=lower.hidden)
    assert torch.equal(resumed.logits, extend(weights, fp.cache, ids, pos).logits)


def test_keeping_fewer_rounds_changes_only_the_layers_above_the_watershed(weights):
    conv = make_conv()
    fp = full_pass(weights, conv)
    ids, pos = conv.ids()[conv.current.start:], torch.arange(conv.current.start, len(conv.token_ids))
    vis = layer_visibility(conv, TINY.layers, 1, (1,))
    probe = {"all": slice(0, ids.numel())}
    full = extend(weights, fp.cache, ids, pos, probes=probe)
    restricted = extend(weights, fp.cache, ids, pos, vis, probes=probe)
    assert torch.equal(full.key_mass["all"][:2], restricted.key_mass["all"][:2])
    dropped = torch.isin(round_of_token(conv)[: conv.history_tokens], torch.tensor([0, 2]))
    assert restricted.key_mass["all"][2:, dropped].abs().max() == 0
    assert not torch.allclose(full.logits, restricted.logits, atol=1e-4)


def test_top_k_picks_the_most_attended_rounds_and_dynamic_k_the_fewest_reaching_the_share():
    dist = torch.tensor([0.1, 0.45, 0.05, 0.4])
    assert top_k_rounds(dist, 2) == (1, 3)
    assert top_k_rounds(dist, 9) == (0, 1, 2, 3)
    assert dynamic_k_rounds(dist, 0.8) == (1, 3)
    assert dynamic_k_rounds(dist, 0.9) == (0, 1, 3)
    assert dynamic_k_rounds(dist, 0.3) == (1,)
    assert last_k_rounds(4, 2) == (2, 3) and last_k_rounds(2, 5) == (0, 1)
    assert choose_rounds(Variant("l", "lastk", share=0.8), dist) == (2, 3)  # as many as dynamic top-k


def test_js_similarity_is_one_for_equal_and_zero_for_disjoint_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(js_similarity(p, q), torch.tensor([1.0, 0.0]), atol=1e-6)
    half = js_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert 0.0 < float(half) < 1.0


def test_watershed_is_the_first_layer_from_which_adjacent_layers_stay_similar():
    sims = torch.tensor([0.9, 0.5, 0.95, 0.6, 0.8, 0.99, 0.75])  # pairs (0,1) .. (6,7)
    assert find_watershed(sims, 0.7) == 4
    assert find_watershed(sims, 0.5) == 0
    assert find_watershed(sims, 0.999) == 7  # never settles: the last layer
    dist = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.1, 0.9]])
    assert find_watershed(adjacent_similarity(dist), 0.7) == 1


def test_residency_counts_whole_history_up_to_the_watershed_and_kept_rounds_above():
    conv = make_conv(round_sizes=((3, 3), (2, 2), (4, 4), (5, 5)), prefix=2)  # history 2+6+4+8=20, current 10
    res = residency(conv, n_layers=4, watershed=1, upper_rounds=(1,))
    assert res.full_token_layers == 4 * 30
    assert res.kept_token_layers == 2 * 30 + 2 * (2 + 4 + 10)
    assert res.kept_history_fraction == pytest.approx(6 / 20)
    assert res.saving == pytest.approx(1 - 92 / 120)
    assert res.upper_history_token_layers == 2 * 6


def test_measure_on_a_tiny_model_fixes_a_watershed_and_full_agrees_with_itself(weights):
    convs = [make_conv(seed=s, conv_id=f"c{s}") for s in range(3)]
    out = measure(weights, convs[:1], convs[1:], ks=(1, 3), shares=(0.9,), threshold=0.5)
    assert 0 <= out.watershed < TINY.layers
    assert out.watershed == out.watershed_rows[0]["watershed_prompt"]
    summ = {r["variant"]: r for r in out.summary_rows}
    assert summ["full"]["top1_agreement_pct"] == 100.0 and summ["full"]["gpu_kv_saving_pct"] == 0.0
    assert summ["top3"]["reply_ppl"] == pytest.approx(summ["full"]["reply_ppl"], rel=1e-6)  # 3 = all rounds
    assert summ["top1"]["kept_fraction"] < 1.0 and summ["top1"]["gpu_kv_saving_pct"] > 0.0
    assert {"top_dyn90", "last_dyn90", "last1"} <= set(summ)
    assert len(out.dist_rows) == 3 * TINY.layers * 3


def test_summary_pools_perplexity_over_reply_tokens():
    rows = [{"variant": v, "k": 1, "kept_fraction": 1.0, "saving": 0.0, "resident_kv_bytes": 8,
             "full_kv_bytes": 8, "upper_history_loaded_bytes": 4, "nll_sum": nll, "n_targets": n, "agree_full": n, "correct": c}
            for v, nll, n, c in (("full", 2.0, 2, 1), ("full", 4.0, 2, 2), ("top1", 8.0, 4, 2))]
    s = {r["variant"]: r for r in summarise(rows)}
    assert s["full"]["reply_ppl"] == pytest.approx(torch.e ** 1.5)
    assert s["top1"]["ppl_change_pct"] == pytest.approx(100 * (torch.e ** 2 / torch.e ** 1.5 - 1))
    assert s["top1"]["acc_change_pp"] == pytest.approx(100 * (0.5 - 0.75))


class CharTokenizer:
    """Stand-in for the SmolLM2 tokenizer: ChatML special tokens are single ids, other text one id a char."""
    SPECIAL = ("<|im_start|>", "<|im_end|>")
    TEMPLATE_SYSTEM = "<|im_start|>system\nYou are a test<|im_end|>\n"

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for n, s in enumerate(self.SPECIAL):
                if text.startswith(s, i):
                    ids.append(1000 + n)
                    i += len(s)
                    break
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}

    def apply_chat_template(self, messages, tokenize=False):
        text = self.TEMPLATE_SYSTEM + "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self(text)["input_ids"] if tokenize else text


def test_chat_formatter_rounds_match_the_template_and_reply_spans_cover_content_and_end_token():
    tok = CharTokenizer()
    fmt = ChatFormatter(tok)
    pairs = [("hi", "hello"), ("q2", "a2"), ("q3", "abc"), ("q4", "xyz")]
    conv = fmt.conversation("t", pairs, Selection(min_rounds=4, max_tokens=10_000, max_message_tokens=100))
    msgs = [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    assert list(conv.token_ids) == tok.apply_chat_template(msgs, tokenize=True)
    assert conv.prefix_end == len(tok(CharTokenizer.TEMPLATE_SYSTEM)["input_ids"])
    r = conv.current
    assert [chr(t) for t in conv.token_ids[r.reply_start: r.reply_end - 1]] == list("xyz")
    assert conv.token_ids[r.reply_end - 1] == 1001 and conv.token_ids[r.end - 1] == ord("\n")
    capped = fmt.conversation("t", pairs, Selection(min_rounds=4, max_tokens=10_000, max_message_tokens=2))
    assert [chr(t) for t in capped.token_ids[capped.current.reply_start: capped.current.reply_end - 1]] == ["x", "y"]
    assert fmt.conversation("t", pairs, Selection(min_rounds=4, max_tokens=80)) is None  # too few rounds fit


def test_sharegpt_elements_are_read_one_by_one_up_to_a_cut_off_tail():
    good = {"id": "a", "conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "g"}]}
    odd = {"id": "b", "conversations": [{"from": "gpt", "value": "g"}, {"from": "human", "value": "u"}]}
    text = "[\n" + json.dumps(good) + ",\n" + json.dumps(odd) + ',\n{"id": "c", "conversations": [{"fr'
    els = list(iter_elements(text))
    assert [e["id"] for e in els] == ["a", "b"]
    assert dialogue(els[0]) == [("u", "g")] and dialogue(els[1]) is None


def test_report_writes_tables_plots_and_simulator_parameters(weights, tmp_path):
    from gpu.roundattn.report import RunInfo, write_measurement, write_sim_config

    convs = [make_conv(seed=s, conv_id=f"c{s}") for s in range(3)]
    out = measure(weights, convs[:1], convs[1:], ks=(1,), shares=(0.9,), threshold=0.5)
    info = RunInfo("kvsim roundattn measure", "2026-01-01 00:00", 1.0, "tiny", "1 + 2")
    write_measurement(out, tmp_path, info, TINY.layers)
    for f in ("summary.csv", "summary.md", "variants.csv", "watershed.csv", "layer_similarity.png",
              "round_distributions.png", "quality_vs_memory.png", "watershed_hist.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert not list(tmp_path.glob(".*tmp*"))
    cfg_path = tmp_path / "cfg.yaml"
    write_sim_config(out, cfg_path, info, "top1", TINY.layers, "tiny")
    doc = yaml.safe_load(cfg_path.read_text())
    ra = doc["policy"]["round_attention"]
    assert ra["watershed_layer"] == out.watershed + 1
    top1 = next(r for r in out.summary_rows if r["variant"] == "top1")
    assert ra["kept_fraction"] == pytest.approx(top1["kept_fraction"], abs=1e-4)
    assert doc["measured"]["watershed_depth_fraction"] == pytest.approx((out.watershed + 1) / TINY.layers, abs=1e-4)


def test_cli_rejects_a_bad_k_list_with_exit_code_2(capsys):
    from gpu.roundattn.cli import register
    import argparse

    p = argparse.ArgumentParser(prog="kvsim")
    register(p.add_subparsers())
    with pytest.raises(SystemExit) as e:
        p.parse_args(["roundattn", "measure", "--k", "1,zero"])
    assert e.value.code == 2
    assert "positive integers" in capsys.readouterr().err


def test_measure_writes_a_fresh_folder_by_default_and_the_committed_files_only_when_asked(tmp_path, monkeypatch):
    from datetime import datetime, timezone
    from pathlib import Path

    from gpu.roundattn.cli import output_paths

    monkeypatch.chdir(tmp_path)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    fresh = Path("results/round_attention_runs/20260102-030405")
    assert output_paths(None, False, now, None) == (fresh, fresh / "smollm2_measured.yaml")
    fresh.mkdir(parents=True)  # a run of the same second: the next one gets its own folder
    assert output_paths(None, False, now)[0] == fresh.with_name("20260102-030405-2")
    assert output_paths(None, True, now, None) == (Path("results/round_attention"),
                                                   Path("configs/round_attention/smollm2_measured.yaml"))
    assert output_paths("mine", False, now, "") == (Path("mine"), None)


@pytest.mark.parametrize("args, flag, committed", [
    (["measure"], None, None),
    (["measure", "--out", "results/round_attention/long"], "--out", "results/round_attention"),
    (["measure", "--out", "x", "--config-out", "configs/round_attention/smollm2_measured.yaml"], "--config-out",
     "configs/round_attention"),
    (["truncation", "--out", "./results/round_attention"], "--out", "results/round_attention"),
])
def test_measurements_refuse_to_write_over_the_committed_results_without_update_committed(
        args, flag, committed, tmp_path, monkeypatch, capsys):
    from sim.cli import main

    monkeypatch.chdir(tmp_path)
    if flag is None:  # the default writes elsewhere: what is refused here is a bad config variant
        args = args + ["--config-variant", "top7"]
    assert main(["roundattn", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "results").exists()
    if flag is None:
        assert err.startswith("kvsim: error: --config-variant: expected one of ['full', 'top1'")
    else:
        assert err.startswith(f"kvsim: error: {flag} ") and f"inside the committed {committed}/" in err
        assert "--update-committed" in err


def test_measurement_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from sim.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    assert main(["roundattn", "truncation", "--out", "a_file"]) == 2
    assert capsys.readouterr().err.strip() == ("kvsim: error: --out a_file: exists and is not a folder; expected a "
                                               "folder for the results")
    assert main(["roundattn", "measure", "--out", "o", "--config-out", "a_file/p.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("kvsim: error: --config-out a_file/p.yaml: a_file is a file, not a "
                                               "folder; expected a path in a writable folder")


def test_committed_simulator_parameters_match_the_committed_measurement_and_load_in_the_simulator():
    from pathlib import Path

    import pandas as pd

    from sim.config import load_config

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "configs/round_attention/smollm2_measured.yaml").read_text())
    summary = pd.read_csv(root / "results/round_attention/summary.csv").set_index("variant")
    ra, meas = doc["policy"]["round_attention"], doc["measured"]
    assert ra["kept_fraction"] == pytest.approx(summary.loc[meas["variant"], "kept_fraction"], abs=1e-4)
    assert ra["watershed_layer"] == meas["watershed_layer_index"] + 1
    assert meas["watershed_depth_fraction"] == pytest.approx(ra["watershed_layer"] / meas["n_layers"], abs=1e-4)
    cfg = load_config({"policy": doc["policy"], "model": "smollm2-135m"})
    assert cfg.policy.round_attention.watershed_layer == ra["watershed_layer"]
