"""A profile's measured whole steps of the batched executor (`models.<name>.iteration`): the reduction
from raw samples (gpu.calibrate.iteration_from_raw) and the cost model that charges them."""
import copy

import pytest

from gpu.calibrate import iteration_from_raw
from sim.costmodel import ProfileCost, parse_profile
from sim.errors import KvsimError
from sim.models import MODELS

from profiles import small_profile

ITERATION = {
    "decode_ms": {"batch": [1, 4], "context_tokens": [100, 500], "ms": [[10.0, 12.0], [14.0, 20.0]]},
    "chunk_ms": {"new_tokens": [16, 1024], "history_tokens": [0, 1024], "ms": [[11.0, 12.0], [30.0, 40.0]]},
    "shared_ms": 8.0,
}


def _cost(iteration=ITERATION):
    raw = small_profile()
    if iteration is not None:
        raw["models"]["llama2-7b"]["iteration"] = copy.deepcopy(iteration)
    return ProfileCost(MODELS["llama2-7b"], parse_profile(raw, "p.yaml"))


def test_a_decode_step_is_the_measured_step_at_the_context_per_sequence():
    # batch 4 holding 1200 tokens: 300 each, halfway between 14 and 20 ms
    assert _cost().decode_step_s(4, 1200) == pytest.approx(17e-3)
    # the span of 3 steps: 300, 301, 302 tokens each -> 17 + 17.015 + 17.03 ms
    assert _cost().decode_span(4, 1200, 3)[0] == pytest.approx(51.045e-3)


def test_a_mixed_step_pays_each_part_less_the_shared_cost_per_extra_part():
    c = _cost()
    # chunk (1024, 0) 30 ms + decode batch 17 ms - 8 ms shared once
    assert c.iteration([(1024, 0)], 4, 1200).total_s == pytest.approx(39e-3)
    # two chunks and no decode: 11 + 12 - 8
    assert c.iteration([(16, 0), (16, 1024)], 0, 0).total_s == pytest.approx(15e-3)
    # one chunk alone is its table cell
    assert c.iteration([(16, 1024)], 0, 0).total_s == pytest.approx(12e-3)


def test_a_mixed_step_never_costs_less_than_its_largest_part():
    it = dict(ITERATION, shared_ms=20.0)
    # 11 + 10 - 20 = 1 ms < 11 ms
    assert _cost(it).iteration([(16, 0)], 1, 100).total_s == pytest.approx(11e-3)


def test_history_loads_overlap_the_measured_step_layer_by_layer():
    # 32 layers of 39/32 ms compute, 0.5 ms load per layer, double buffer: compute-bound after the
    # first layer's load: 0.5 + 39 ms
    it = _cost().iteration([(1024, 0)], 4, 1200, load_layer_s=0.5e-3, buffer_layers=2, layerwise=True)
    assert it.total_s == pytest.approx(39.5e-3)
    assert it.load_s == pytest.approx(32 * 0.5e-3)


def test_a_profile_without_iteration_composes_its_layer_tables_as_before():
    c = _cost(None)
    base = super(ProfileCost, c).iteration([(512, 100)], 2, 400)
    assert c.iteration([(512, 100)], 2, 400).total_s == base.total_s
    L = c.shape.layers
    # the per-layer decode table at 200 tokens per sequence, times the layers, plus the head
    assert c.decode_step_s(2, 400) == pytest.approx((L * c.m.decode_layer_ms(2, 200) + c.m.head_decode_ms(2)) * 1e-3)


@pytest.mark.parametrize("key, value, msg", [
    ("shared_ms", -1.0, "models.llama2-7b.iteration.shared_ms: expected a number >= 0"),
    ("bogus", 1.0, "models.llama2-7b.iteration.bogus: unknown key"),
])
def test_a_bad_iteration_key_is_one_line_naming_it(key, value, msg):
    with pytest.raises(KvsimError, match=msg.replace(".", r"\.")):
        _cost(dict(ITERATION, **{key: value}))


def test_a_missing_iteration_table_names_it():
    it = {k: v for k, v in ITERATION.items() if k != "chunk_ms"}
    with pytest.raises(KvsimError, match=r"models\.llama2-7b\.iteration\.chunk_ms: missing"):
        _cost(it)


# ---- the reduction ------------------------------------------------------------------------------------

def _samples():
    """Steps paying a known cost: 5 ms per step, 0.1 ms per decoding sequence, 1 us per decoded token
    of context, 0.02 ms per chunk token and 10 ns per (chunk token x cached token); a mixed step pays
    the per-step 5 ms once."""
    def dec(b, c):
        return 0.1 * b + 1e-3 * b * c

    def chunk(n, h):
        return 0.02 * n + 1e-5 * n * h
    rows = [{"kind": "decode", "batch": b, "context_tokens": c, "ms": 5 + dec(b, c)}
            for b in (1, 8) for c in (100, 1000, 2000) if (b, c) != (8, 2000)]   # (8, 2000): over the cache
    rows += [{"kind": "chunk", "new_tokens": n, "history_tokens": h, "ms": 5 + chunk(n, h)}
             for n in (64, 1024) for h in (0, 1000)]
    rows += [{"kind": "mixed", "batch": b, "context_tokens": c, "new_tokens": n, "history_tokens": h,
              "ms": 5 + dec(b, c) + chunk(n, h)} for b, c, n, h in ((4, 500, 256, 0), (8, 1000, 64, 1000))]
    return rows


def test_the_reduction_fills_the_tables_and_finds_the_shared_per_step_cost():
    it = iteration_from_raw(_samples())
    assert it["decode_ms"]["batch"] == [1, 8] and it["decode_ms"]["context_tokens"] == [100, 1000, 2000]
    # measured cells as they are: batch 1 at 100 tokens 5 + 0.1 + 0.1
    assert it["decode_ms"]["ms"][0] == pytest.approx([5.2, 6.1, 7.1])
    # (8, 2000) extrapolated from (8, 100) = 6.6 and (8, 1000) = 13.8: 13.8 + 7.2 * 1000 / 900 = 21.8
    assert it["decode_ms"]["ms"][1] == pytest.approx([6.6, 13.8, 21.8])
    assert it["chunk_ms"]["ms"][0] == pytest.approx([6.28, 6.92]) and it["chunk_ms"]["ms"][1] == pytest.approx([25.48, 35.72])
    # decode part + chunk part - mixed step = the per-step 5 ms
    assert it["shared_ms"] == pytest.approx(5.0)
    # and the cost model charges the mixed steps their own measured time
    raw = small_profile()
    raw["models"]["llama2-7b"]["iteration"] = it
    c = ProfileCost(MODELS["llama2-7b"], parse_profile(raw, "p.yaml"))
    assert c.iteration([(256, 0)], 4, 2000).total_s == pytest.approx((5 + 0.4 + 2.0 + 5.12) * 1e-3, rel=1e-3)


def test_the_reduction_without_mixed_samples_shares_nothing():
    rows = [r for r in _samples() if r["kind"] != "mixed"]
    assert iteration_from_raw(rows)["shared_ms"] == 0.0


def test_the_reduction_needs_both_kinds_of_pure_step():
    with pytest.raises(ValueError, match="no chunk rows"):
        iteration_from_raw([r for r in _samples() if r["kind"] == "decode"])
