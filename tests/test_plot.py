"""Figures drawn from a fixture points table shaped like the one `kvsim sweep` writes."""
import itertools

import pandas as pd
import pytest

from sim.errors import KvsimError
from sim.plot import plot_sweep, sweep_dirs
from sim.report import write_report

GB = 1e9


def _fixture_points(path, rows):
    df = pd.DataFrame(rows)
    path.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path / "points.parquet", index=False)
    return path


def _row(i, **kw):
    dram = kw.get("host.dram_bytes", 64 * GB)
    kind = kw.get("policy.kind", "attentionstore")
    hit = 0.0 if kind == "recompute" else min(0.9, dram / (256 * GB))
    ttft = 0.05 + 0.5 * (1 - hit) + 0.01 * kw.get("seed", 0)
    base = {"sweep": "fixture", "point": i, "key": f"k{i:04d}", "variant": None, "status": "ok", "error": None,
            "seed": 0, "model": "llama2-13b", "gpu.name": "a100-80gb", "gpu.count": 2, "host.dram_bytes": dram,
            "ssd.bytes": 2000 * GB, "workload.session_rate_per_s": 1.0, "policy.kind": kind,
            "policy.eviction": "scheduler_aware", "ttft_mean_s": ttft, "ttft_p50_s": ttft * 0.8,
            "ttft_p99_s": ttft * 3, "prefill_tokens_per_s": 1e4 / ttft, "hit_rate_hbm": 0.05,
            "hit_rate_dram": hit * 0.7, "hit_rate_ssd": hit * 0.3, "miss_rate": 1 - hit - 0.05,
            "cost_per_1k_turns_usd": 2.0 * ttft, "turns": 600, "sessions": 200, "reused_token_fraction": hit,
            "gpu_busy_s": 100 * ttft, "gpu_prefill_s": 50 * ttft, "makespan_s": 400.0, "gpu_cost_usd": 1.2 * ttft,
            "storage_cost_usd": 0.0 if kind == "recompute" else 0.01, "cost_usd": 1.2 * ttft + 0.01 * (kind != "recompute")}
    base.update(kw)
    return base


def test_capacity_sweep_draws_ttft_hit_rate_and_cost_figures_as_png_and_pdf(tmp_path):
    rows = [_row(i, **{"host.dram_bytes": d * GB, "policy.kind": k, "seed": s})
            for i, (d, k, s) in enumerate(itertools.product([32, 64, 128, 256], ["recompute", "attentionstore"], [0, 1]))]
    rows.append(_row(99, status="error", error="boom", ttft_p99_s=None, **{"host.dram_bytes": 512 * GB}))
    d = _fixture_points(tmp_path / "cap", rows)
    paths = plot_sweep(d)
    names = {p.name for p in paths}
    for fig in ("ttft_vs_dram", "hit_rate_vs_dram", "cost_per_config"):
        assert {f"{fig}.png", f"{fig}.pdf"} <= names
    # SSD and rate do not vary in this sweep, so their figures are not drawn
    assert not any(n.startswith(("ttft_vs_ssd", "prefill_vs_rate", "ablation", "eviction")) for n in names)
    png = (d / "plots" / "ttft_vs_dram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (d / "plots" / "ttft_vs_dram.pdf").read_bytes()[:5] == b"%PDF-"


def test_ablation_eviction_and_rate_sweeps_under_one_root_each_get_their_figures(tmp_path):
    variants = ["full", "no_layerwise_preload", "no_async_save", "no_sched_fetch", "no_sched_evict", "invalidate"]
    _fixture_points(tmp_path / "paper" / "ablation",
                    [_row(i, variant=v, ttft_mean_s=0.1 + 0.02 * i) for i, v in enumerate(variants)])
    _fixture_points(tmp_path / "paper" / "eviction",
                    [_row(i, **{"policy.eviction": e, "host.dram_bytes": d * GB})
                     for i, (e, d) in enumerate(itertools.product(["scheduler_aware", "lru", "fifo"], [32, 128]))])
    _fixture_points(tmp_path / "paper" / "rate",
                    [_row(i, **{"workload.session_rate_per_s": r, "policy.kind": k})
                     for i, (r, k) in enumerate(itertools.product([0.5, 1, 2], ["recompute", "attentionstore"]))])
    assert [p.name for p in sweep_dirs(tmp_path / "paper")] == ["ablation", "eviction", "rate"]
    names = {p.relative_to(tmp_path).as_posix() for p in plot_sweep(tmp_path / "paper")}
    assert "paper/ablation/plots/ablation.png" in names
    assert "paper/eviction/plots/eviction.pdf" in names
    assert "paper/rate/plots/prefill_vs_rate.png" in names


def test_an_axis_that_rides_along_with_the_model_gets_no_curve_of_its_own(tmp_path):
    # as in paper/models: DRAM and GPU count are zipped with the model, policy is a grid axis
    zipped = [("llama2-7b", 1, 128), ("llama2-13b", 1, 128), ("llama2-70b", 4, 512)]
    _fixture_points(tmp_path / "models", [
        _row(i, model=m, **{"gpu.count": g, "host.dram_bytes": d * GB, "policy.kind": k})
        for i, ((m, g, d), k) in enumerate(itertools.product(zipped, ["recompute", "attentionstore"]))])
    names = {p.name for p in plot_sweep(tmp_path / "models")}
    assert "policy_by_model.png" in names and "cost_per_config.png" in names
    assert not any(n.startswith(("ttft_vs_dram", "hit_rate_vs_dram")) for n in names)


def test_plot_of_a_directory_without_results_is_a_user_error(tmp_path):
    with pytest.raises(KvsimError, match="no points.parquet"):
        plot_sweep(tmp_path)


def test_report_puts_reproduced_numbers_beside_the_papers_claims(tmp_path):
    models = ["llama2-7b", "llama2-13b"]
    _fixture_points(tmp_path / "models", [
        _row(i, model=m, **{"policy.kind": k, "host.dram_bytes": 128 * GB})
        for i, (m, k) in enumerate(itertools.product(models, ["recompute", "attentionstore"]))])
    _fixture_points(tmp_path / "rate", [
        _row(i, **{"workload.session_rate_per_s": r, "policy.kind": k})
        for i, (r, k) in enumerate(itertools.product([0.5, 2.0], ["recompute", "attentionstore"]))])
    report = write_report(tmp_path).read_text()
    # fixture: TTFT 0.3 s recompute vs 0.05 + 0.5 * 0.5 = 0.3 -> at 128 GB hit = 0.5: 0.3 vs 0.55 -> -45%
    assert "| TTFT (mean), vs recompute | up to −87% | **−45%** (llama2-7b) |" in report
    assert "up to 7.8×" in report and "up to −70%" in report
    assert "![models: policy_by_model](models/plots/policy_by_model.png)" in report
    assert (tmp_path / "models" / "plots" / "policy_by_model.png").is_file()
    assert "−45%** (llama2-7b) | −45% … −45% | same direction, smaller |" in report
    assert "**TTFT (mean), vs recompute: kvsim's best is −45% (llama2-7b), the paper's up to −87%.**" in report


# ---------------------------------------------------------------- figures that never mislead

@pytest.fixture
def figures(monkeypatch):
    """The figures plot_sweep draws, by name, kept open instead of saved."""
    import sim.plot

    drawn = {}

    def keep(fig, out_dir, name):
        drawn[name] = fig
        return []
    monkeypatch.setattr(sim.plot, "_save", keep)
    yield drawn
    import matplotlib.pyplot as plt

    plt.close("all")


def _capacity_rows(drams, seeds=(0,), failed=()):
    rows = []
    for i, (d, k, s) in enumerate(itertools.product(drams, ["recompute", "attentionstore"], seeds)):
        r = _row(i, **{"host.dram_bytes": d * GB, "policy.kind": k, "seed": s, "gpu.count": 1})
        if (d, k) in failed:
            r.update(status="error", error="worker process died",
                     **{m: None for m in ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "cost_per_1k_turns_usd")})
        rows.append(r)
    return rows


def test_a_failed_point_breaks_its_line_and_is_marked(tmp_path, figures):
    d = _fixture_points(tmp_path / "cap", _capacity_rows([8, 16, 32, 64], failed={(32, "attentionstore")}))
    plot_sweep(d)
    ax = figures["ttft_vs_dram"].axes[1]  # TTFT p99
    store = next(c for c in ax.containers if c.get_label() == "attentionstore")
    x, y = store.lines[0].get_data()
    assert list(x) == [8, 16, 32, 64] and pd.isna(y[2])
    assert not pd.isna(y[[0, 1, 3]]).any()  # the line stops at 32 GB instead of running across it
    marks = [ln for ln in ax.lines if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert [list(m.get_xdata()) for m in marks] == [[32]]
    assert "no result (failed or not run)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_failed_configuration_bar_says_no_result_instead_of_a_blank(tmp_path, figures):
    d = _fixture_points(tmp_path / "cap", _capacity_rows([8, 16], failed={(16, "recompute")}))
    plot_sweep(d)
    ax = figures["cost_per_config"].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    texts = [(t.get_text(), t.get_position()[0]) for t in ax.texts]
    assert texts == [("no result", labels.index("DRAM 16 GB, recompute"))]


def test_geometric_ladders_are_drawn_on_log_axes_and_linear_steps_are_not(tmp_path, figures):
    plot_sweep(_fixture_points(tmp_path / "dram", _capacity_rows([8, 16, 32, 64, 128, 256])))
    ax = figures["ttft_vs_dram"].axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32", "64", "128", "256"]
    ssd = [_row(i, **{"ssd.bytes": s * GB, "gpu.count": 1}) for i, s in enumerate([0, 50, 100, 250, 500, 2500])]
    plot_sweep(_fixture_points(tmp_path / "ssd", ssd))
    assert figures["ttft_vs_ssd"].axes[0].get_xscale() == "symlog"  # 0 is on the ladder
    plot_sweep(_fixture_points(tmp_path / "lin", _capacity_rows(list(range(16, 257, 16)))))
    assert figures["ttft_vs_dram"].axes[0].get_xscale() == "linear"


def test_error_bars_span_seeds_only_where_there_are_several(tmp_path, figures):
    plot_sweep(_fixture_points(tmp_path / "one", _capacity_rows([8, 64])))
    ax = figures["ttft_vs_dram"].axes[0]
    assert all(len(c.lines[2]) == 0 for c in ax.containers)  # no zero-width min-max bars
    assert "seeds" not in figures["ttft_vs_dram"]._suptitle.get_text()
    plot_sweep(_fixture_points(tmp_path / "two", _capacity_rows([8, 64], seeds=(0, 1))))
    ax = figures["ttft_vs_dram"].axes[0]
    assert all(len(c.lines[2]) == 1 for c in ax.containers)
    assert "mean of 2 seeds, bars min–max" in figures["ttft_vs_dram"]._suptitle.get_text()


def test_committed_report_is_what_kvsim_report_makes_from_the_committed_points():
    from pathlib import Path

    from sim.report import render_report

    root = Path(__file__).resolve().parent.parent / "results" / "paper"
    assert render_report(root) == (root / "REPORT.md").read_text()


def test_report_and_plot_refuse_an_unwritable_output_before_writing(tmp_path, capsys):
    from sim.cli import main

    d = _fixture_points(tmp_path / "cap", _capacity_rows([8, 64]))
    (d / "plots").write_text("a file where the figures go")
    assert main(["plot", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plots: exists and is not a folder" in err
