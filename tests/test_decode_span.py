"""The engine's decode-span closed form (`Replica._decode_span`) against a per-iteration loop.

A span is k iterations of a batch of B sequences holding S context tokens: iteration j costs
`cost.decode_step_s(B, S + B j)`. The engine sums them in closed form (iteration times linear in j,
the line through the first and the last iteration) and, when a waiting job could join, cuts the
span at the fewest iterations whose summed time reaches the cut. The method runs on a tiny harness
holding only the replica state it reads (no SimPy, no workload), so the reference is a plain loop
over the cost model's public `decode_step_s`.

Where the step is linear in context the closed form is exact. Both back ends have kinks: the
constant-efficiency roofline's max(compute, memory) turns from compute- to memory-bound (with batches above ~110 on an
A100, ~220 on an H100, at a few tens to a couple of hundred tokens per sequence), and a measured
profile interpolates between its context grid points. `test_print_worst_errors` prints the figures
(`pytest tests/test_decode_span.py -s`).
"""

import math
import random
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sim.config import load_config
from sim.costmodel import CostModel, build_cost_model
from sim.engine import Replica
from sim.metrics import Recorder
from sim.models import MODELS

PROFILE = Path(__file__).resolve().parent.parent / "configs" / "hardware" / "h100.yaml"
ROOFLINES = [(m, g) for m in ("llama2-7b", "llama2-13b") for g in ("a100-80gb", "h100-80gb")]
PROFILED = ["llama2-7b", "llama2-13b"]
MAX_CTX = 4096  # tokens per sequence (the models' window)


def _span(cost, B, S, kmax, *, now=10.0, arrival=math.inf, queued=False, release=None, max_batch=None,
          iter_count=7):
    """(total, k, busy_decode_s) of `Replica._decode_span` on a replica holding just this state."""
    h = SimpleNamespace(
        n_running=B, ctx_sum=S, running=[(iter_count + kmax, 0, None)], iter_count=iter_count, cost=cost,
        sched=SimpleNamespace(queue=deque(["waiting job"] if queued else [])),
        source=SimpleNamespace(pending=[(arrival, 0)] if arrival != math.inf else []),  # the heap head is the next arrival
        max_batch=B + 1 if max_batch is None else max_batch,
        store=SimpleNamespace(releases=[(release, 0, 0.0)] if release is not None else []),
        busy_decode_s=0.0, rec=Recorder(0), decode_extra_left=0, decode_extra_s=0.0)
    total, k = Replica._decode_span(h, now)
    return total, k, h.busy_decode_s


def _loop(cost, B, S, k):
    return math.fsum(cost.decode_step_s(B, S + B * j) for j in range(k))


def _fewest(cost, B, S, kmax, cut):
    """The fewest iterations (at least 1, at most kmax) whose summed time reaches `cut`."""
    acc = 0.0
    for j in range(kmax):
        acc += cost.decode_step_s(B, S + B * j)
        if acc >= cut:
            return j + 1
    return kmax


def _roofline_kink(cost, B):
    """Total context where a roofline step turns from compute- to memory-bound, from the public
    decode_step_s alone: the step is linear on each side, so intersect the line through its first
    two tokens with the line far past any window. None when the two slopes agree (no kink)."""
    f = lambda c: cost.decode_step_s(B, c)
    s1, s2 = f(1.0) - f(0.0), f(1e9 + 1) - f(1e9)
    if abs(s1 - s2) <= 1e-3 * abs(s2):
        return None
    return (f(1e9) - s2 * 1e9 - f(0.0)) / (s1 - s2)


# ---- the cases ----------------------------------------------------------------------------------

def _cases():
    """~220 spans: random ones for every cost model, plus roofline spans built to cross the kink."""
    rng = random.Random(20240607)
    out = []  # (label, cost, B, S, kmax, crosses a kink)
    for m, g in ROOFLINES:
        # gpu.efficiency constant: the roofline whose one max(compute, memory) per layer has the kink
        cost = build_cost_model(load_config({}, {"model": m, "gpu.name": g, "gpu.efficiency": "constant"}))
        # measured efficiencies price attention apart from the GEMMs: linear in the context, no kink
        measured = build_cost_model(load_config({}, {"model": m, "gpu.name": g}))
        for _ in range(10):
            B = rng.randint(1, 512)
            c0 = rng.uniform(1, MAX_CTX - 2)
            kmax = rng.randint(1, min(1000, int(MAX_CTX - c0)))
            out.append((f"{m}/{g}/measured", measured, B, int(B * c0), kmax, False))
        for _ in range(30):
            B = rng.randint(1, 512)
            c0 = rng.uniform(1, MAX_CTX - 2)
            kmax = rng.randint(1, min(1000, int(MAX_CTX - c0)))
            S = int(B * c0)
            C = _roofline_kink(cost, B)
            out.append((f"{m}/{g}", cost, B, S, kmax, C is not None and S < C < S + B * (kmax - 1)))
        for _ in range(10):  # on purpose: start below the kink, end above it
            B = rng.randint(300, 512)
            C = _roofline_kink(cost, B)
            S = max(B, int(C - B * rng.uniform(1, min(200, C / B))))
            kmax = rng.randint(int((C - S) / B) + 2, min(1000, int(MAX_CTX - S / B)))
            out.append((f"{m}/{g}", cost, B, S, kmax, True))
    grid_of = yaml.safe_load(PROFILE.read_text())["models"]
    for m in PROFILED:
        cost = build_cost_model(load_config({}, {"model": m, "gpu.name": "h100-80gb",
                                                 "hardware_profile": str(PROFILE)}))
        grid = grid_of[m]["decode_layer_ms"]["context_tokens"]
        for _ in range(30):
            B = rng.randint(1, 64)
            c0 = rng.uniform(1, MAX_CTX - 2)
            kmax = rng.randint(1, min(1000, int(MAX_CTX - c0)))
            S = int(B * c0)
            lo, hi = S / B, (S + B * (kmax - 1)) / B   # tokens per sequence: the table's axis
            out.append((f"{m}/profile", cost, B, S, kmax, any(lo < x < hi for x in grid)))
    return out


CASES = _cases()
LINEAR = [c for c in CASES if not c[5]]
ROOF_KINK = [c for c in CASES if c[5] and "profile" not in c[0]]
PROF_KINK = [c for c in CASES if c[5] and "profile" in c[0]]


def _worst(cases):
    worst = (0.0, None)
    for label, cost, B, S, kmax, _ in cases:
        total, _, _ = _span(cost, B, S, kmax)
        ref = _loop(cost, B, S, kmax)
        err = abs(total - ref) / ref
        if err > worst[0]:
            worst = (err, (label, B, S, kmax))
    return worst


def test_the_cases_cover_linear_and_kink_crossing_spans():
    """Guards a case generator that silently stops crossing kinks (the exactness tests below would
    then pass without testing the pieces)."""
    assert len(CASES) >= 200
    assert len(LINEAR) >= 100 and len(ROOF_KINK) >= 40 and len(PROF_KINK) >= 20
    assert {c[0] for c in ROOF_KINK} == {f"{m}/{g}" for m, g in ROOFLINES}


def test_print_worst_errors():
    """Prints the worst relative error of the closed form with and without a kink (run with -s)."""
    for name, cases in (("no kink", LINEAR), ("roofline kink", ROOF_KINK), ("profile grid kink", PROF_KINK)):
        err, where = _worst(cases)
        print(f"decode span, {name}: {len(cases)} cases, worst relative error {err:.3g} at {where}")
    assert _worst(LINEAR)[0] < 1e-9


# ---- exactness ---------------------------------------------------------------------------------

def test_decode_span_equals_the_per_iteration_sum_when_no_kink_is_crossed():
    """Guards the closed form itself (an off-by-one in the arithmetic series, the slope taken at the
    wrong iteration, a span that stops short): exact to 1e-9 wherever steps are linear in context."""
    for label, cost, B, S, kmax, _ in LINEAR:
        total, k, busy = _span(cost, B, S, kmax)
        assert k == kmax, (label, B, S, kmax)
        assert total == pytest.approx(_loop(cost, B, S, kmax), rel=1e-9, abs=0), (label, B, S, kmax)
        assert busy == total


def test_decode_span_is_exact_across_the_roofline_kink():
    """Guards the roofline's decode time for large batches of short contexts: a single chord through a
    span crossing the compute/memory kink was up to 13% off."""
    for label, cost, B, S, kmax, _ in ROOF_KINK:
        total, _, _ = _span(cost, B, S, kmax)
        assert total == pytest.approx(_loop(cost, B, S, kmax), rel=1e-9, abs=0), (label, B, S, kmax)


def test_decode_span_is_exact_across_profile_grid_points():
    """Guards the profile's decode time (exact once the sum is taken per table segment)."""
    for label, cost, B, S, kmax, _ in PROF_KINK:
        total, _, _ = _span(cost, B, S, kmax)
        assert total == pytest.approx(_loop(cost, B, S, kmax), rel=1e-9, abs=0), (label, B, S, kmax)


# ---- the cut ---------------------------------------------------------------------------------

def test_a_cut_span_is_the_fewest_iterations_whose_time_reaches_the_cut():
    """Guards the inverse of the closed form (a span one iteration short of an arrival, or one too
    long), on every linear case with a random arrival inside the span."""
    rng = random.Random(7)
    now = 10.0
    for label, cost, B, S, kmax, _ in LINEAR:
        if kmax < 2:
            continue
        full = _loop(cost, B, S, kmax)
        cut = rng.uniform(0.0, full)
        total, k, busy = _span(cost, B, S, kmax, now=now, arrival=now + cut)
        assert k == _fewest(cost, B, S, kmax, cut), (label, B, S, kmax, cut)
        assert total == pytest.approx(_loop(cost, B, S, k), rel=1e-9, abs=0)
        assert busy == total


class LinearStep(CostModel):
    """A decode step of 1 s + 1 ms per context token: hand-computable spans. A CostModel, so that
    whatever the engine asks of a cost model beyond the step comes from the real base class."""

    def __init__(self):
        super().__init__(MODELS["llama2-7b"], layer_copy_overhead_s=0.0, layer_gate_s=0.0, host_turn_s=0.0,
                         host_next_turn_s=0.0, measured_contention=None)

    def decode_step_s(self, batch, context_tokens):
        return 1.0 + 1e-3 * context_tokens

    def _unused(self, *args):
        raise AssertionError("a decode span needs only the decode step")

    prefill_layer_s = prefill_head_s = decode_head_s = h2d_bw = d2h_bw = ssd_read_bw = ssd_write_bw = _unused


# B = 2, S = 100, 10 iterations: t_j = 1.1 + 0.002 j; cumulative 1.1, 2.202, 3.306, ...; all 11.09
@pytest.mark.parametrize("kw, k, total", [
    (dict(), 10, 11.09),                                       # nobody can join: the whole span
    (dict(arrival=13.0), 3, 3.306),                            # arrival 3 s in: 3 iterations reach it
    (dict(arrival=12.202 + 1e-9), 3, 3.306),                   # just past the 2nd iteration's end
    (dict(arrival=5.0), 1, 1.1),                               # an arrival already due: one iteration
    (dict(arrival=100.0), 10, 11.09),                          # after the span: no cut
    (dict(arrival=13.0, max_batch=2), 10, 11.09),              # batch full: the arrival cannot join
    (dict(arrival=13.0, queued=True), 10, 11.09),              # behind a queued job (FCFS): no cut
    (dict(arrival=13.0, queued=True, release=12.5), 3, 3.306),  # a write-back end frees HBM at 2.5 s
    (dict(release=12.5), 10, 11.09),                           # a release with nobody queued: no cut
])
def test_what_cuts_a_span_hand_computed(kw, k, total):
    """Guards which events end a span early: an arrival that could be admitted at once, or a write-back
    end while a job waits; nothing else."""
    got_total, got_k, _ = _span(LinearStep(), 2, 100, 10, now=10.0, **kw)
    assert got_k == k
    assert got_total == pytest.approx(total, rel=1e-12)
