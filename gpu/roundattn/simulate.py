"""Round Attention in the simulator, its parameters taken from a measurement (`kvsim roundattn simulate`).

The measurement (`kvsim roundattn measure`) writes the watershed layer and the kept fraction of history
KV above it (Round Attention, arXiv 2502.15294, §3); here they become the simulator's
`policy.round_attention` block, and one config is simulated with and without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sim.config import Overrides, load_config
from sim.errors import KvsimError
from sim.files import atomic_write_text
from sim.runner import SimResult, run_simulation, write_results


def measured_round_attention(params_path, n_layers: int, variant: str | None = None) -> tuple[dict, str]:
    """policy.round_attention for a model of ``n_layers`` from a file written by ``kvsim roundattn measure``,
    and a line saying where each number came from. On the measured model the watershed is the measured
    layer; on a model of another depth it keeps the measured depth fraction (an extrapolation, said so)."""
    from sim.errors import read_yaml

    doc = read_yaml(params_path, "round-attention parameters", " (written by `kvsim roundattn measure`)")
    try:
        ra, meas = doc["policy"]["round_attention"], doc["measured"]
        kept = (ra["kept_fraction"] if variant is None else meas["kept_fraction_by_variant"][variant])
        measured_layers, watershed, depth = int(meas["n_layers"]), int(ra["watershed_layer"]), float(meas["watershed_depth_fraction"])
    except KeyError as exc:
        what = f"measured.kept_fraction_by_variant.{variant}" if variant else str(exc).strip("'")
        raise KvsimError(f"{params_path}: {what}: missing, expected the keys `kvsim roundattn measure` writes") from None
    except TypeError:
        raise KvsimError(f"{params_path}: expected policy.round_attention and measured mappings") from None
    if n_layers != measured_layers:
        watershed = min(max(round(depth * n_layers), 0), n_layers - 1)
        how = (f"watershed {watershed} of {n_layers} layers = depth fraction {depth} measured on "
               f"{meas.get('model', 'the measured model')} ({measured_layers} layers; extrapolated to this model)")
    else:
        how = f"watershed {watershed} of {n_layers} layers as measured on {meas.get('model', 'the measured model')}"
    label = variant or meas.get("variant", "?")
    return ({"enabled": True, "watershed_layer": watershed, "kept_fraction": float(kept)},
            f"{how}; kept_fraction {float(kept):.4f} ({label}) from {params_path}")


@dataclass(frozen=True)
class Comparison:
    """One config simulated without and with Round Attention."""
    doc: dict            # what comparison.json holds: the block used, where its numbers came from, both summaries
    without: SimResult
    with_ra: SimResult


def compare_with_and_without(config, overrides: Overrides, params, variant: str | None = None, out=None,
                             set_items=()) -> Comparison:
    """Simulate `config` (as `attentionstore`) without and with Round Attention, its parameters from the
    measurement file `params`. The comparison's summaries add the bytes loaded to HBM from DRAM and SSD
    (`bytes_loaded`, summed over turns); with `out`, both runs' results and comparison.json are written there."""
    overrides = overrides.merged({"policy.kind": "attentionstore"})
    if load_config(config, overrides).scheduler.kind != "prefill_first":
        # the prefill-first engine models both halves of Round Attention's saving (loads and the HBM a
        # turn holds); the chunked one models the loads only (its paged blocks hold every layer): the
        # comparison runs under prefill-first and says so in comparison.json
        overrides = overrides.merged({"scheduler.kind": "prefill_first"})
    base = load_config(config, overrides)
    ra, how = measured_round_attention(params, base.shape().layers, variant)
    results, summaries = {}, {}
    for name, extra in (("without", {"policy.round_attention.enabled": False}),
                        ("with", {f"policy.round_attention.{k}": v for k, v in ra.items()})):
        res = results[name] = run_simulation(load_config(config, overrides.merged(extra)))
        summaries[name] = {**res.summary, "bytes_loaded": float(res.turns["bytes_loaded"].sum())}
        if out:
            write_results(res, Path(out) / name)
    doc = {"config": str(config), "set": list(set_items), "scheduler": base.scheduler.kind,
           "round_attention": ra, "source": how,
           "without": summaries["without"], "with": summaries["with"]}
    if out:
        atomic_write_text(Path(out) / "comparison.json", json.dumps(doc, indent=2))
    return Comparison(doc, results["without"], results["with"])
