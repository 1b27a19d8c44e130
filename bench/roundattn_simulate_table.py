"""The Round Attention simulator table of results/round_attention/README.md, as the code makes it now.

    python bench/roundattn_simulate_table.py [--out results/round_attention/simulate.md]

Each row is `kvsim roundattn simulate configs/default.yaml [flags]` (`gpu.roundattn.simulate`): the
attentionstore policy without and with the measured Round Attention parameters.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu.roundattn.cli import COMMITTED_PARAMS  # noqa: E402
from gpu.roundattn.simulate import compare_with_and_without  # noqa: E402
from sim.config import parse_overrides  # noqa: E402
from sim.files import atomic_write_text  # noqa: E402
from sim.units import GB  # noqa: E402

ROWS = [("(no flag: top_dyn90)", None, []), ("`--variant top2`", "top2", []), ("`--variant top1`", "top1", []),
        ("`--set workload.max_sessions=50`", None, ["workload.max_sessions=50"]),
        ("`--set model=smollm2-135m`", None, ["model=smollm2-135m"])]


def row(label, variant, sets) -> str:
    doc = compare_with_and_without(ROOT / "configs/default.yaml", parse_overrides(sets), COMMITTED_PARAMS,
                                   variant, None, sets).doc
    w, r, ra = doc["without"], doc["with"], doc["round_attention"]
    def pair(k, fmt, scale=1.0):
        a, b = w[k] * scale, r[k] * scale
        ch = f" ({b / a - 1:+.1%})" if a else ""
        return f"{fmt.format(a)} → {fmt.format(b)}{ch}"
    return (f"| {label} | {ra['watershed_layer']} | {ra['kept_fraction']:.4f} | {pair('bytes_loaded', '{:,.1f} GB', 1 / GB)}"
            f" | {pair('peak_hbm_bytes', '{:,.2f} GB', 1 / GB)} | {pair('ttft_mean_s', '{:.3f} s')}"
            f" | {pair('ttft_p99_s', '{:.3f} s')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results/round_attention/simulate.md"))
    a = ap.parse_args()
    lines = ["| `kvsim roundattn simulate configs/default.yaml ...` | watershed layer | kept | bytes loaded to HBM, "
             "without → with | peak HBM KV | TTFT mean | TTFT p99 |", "|---|---|---|---|---|---|---|"]
    lines += [row(*r) for r in ROWS]
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(a.out), text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
