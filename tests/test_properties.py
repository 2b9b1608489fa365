"""Property-based tests: arbitrary inputs against the reference, and invariants.

The number of examples comes from the hypothesis profile (see conftest.py):
``HYPOTHESIS_PROFILE=nightly`` runs thousands.
"""

from __future__ import annotations

import math

import torch
from helpers import (
    ALL_DTYPES,
    RANDOM_STRATEGIES,
    STRATEGIES,
    TIE_VALUES,
    dare_masks,
    random_mask,
    transposed,
)
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    assert_matches,
    assert_merge_matches,
    magnitude_keep_count,
    reference_disjoint_merge,
    reference_merge_detailed,
    reference_prune_magnitude,
    reference_prune_random,
    reference_sign_mask,
)

import lorax_merge
from lorax_merge import utils

SPECIALS = (math.nan, math.inf, -math.inf)
MAX_ABS = 100.0


def _flush_tiny(v: float) -> float:
    # keep products and quotients away from subnormals so that exact properties hold
    return 0.0 if abs(v) < 1e-3 else v


FINITE = st.floats(-MAX_ABS, MAX_ABS, allow_nan=False, width=32).map(_flush_tiny)
TIED = st.sampled_from(TIE_VALUES)
SPECIAL = st.sampled_from(SPECIALS)
DENSITY = st.one_of(
    st.sampled_from([0.0, 1.0, 1.5, 0.29, 0.5]),
    st.floats(0.01, 0.99),
)
WEIGHT = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.25, -3.5]),
    st.floats(-10, 10, width=32).map(_flush_tiny),
)
SHAPE = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
SEED = st.integers(0, 2**63 - 1)


@st.composite
def task_data(
    draw, n: int, shape: tuple[int, ...], dtype: torch.dtype, kinds=("finite", "tied", "special")
):
    """``n`` tensors of ``shape``: finite values, tie-heavy values, or either with NaN/Inf."""
    kind = draw(st.sampled_from(kinds))
    numel = math.prod(shape)
    if kind == "finite":
        elem = FINITE
    elif kind == "tied":
        elem = TIED
    else:
        elem = st.one_of(FINITE, TIED, SPECIAL)
    tasks = []
    for _ in range(n):
        values = draw(st.lists(elem, min_size=numel, max_size=numel))
        tasks.append(torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape))
    if len(shape) >= 2 and draw(st.booleans()):
        tasks = [transposed(t) for t in tasks]  # same values, column-major memory
    return tasks


@st.composite
def merge_case(draw, kinds=("finite", "tied", "special")):
    strategy = draw(st.sampled_from(STRATEGIES))
    method = draw(st.sampled_from(["total", "frequency"]))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = draw(SHAPE)
    n = draw(st.integers(1, 6))
    tasks = draw(task_data(n, shape, dtype, kinds))
    weights = draw(st.lists(WEIGHT, min_size=n, max_size=n))
    weights_form = draw(st.sampled_from(["list", "float32", "task dtype"]))
    if weights_form == "float32":
        weights = torch.tensor(weights, dtype=torch.float32)
    elif weights_form == "task dtype":
        weights = torch.tensor(weights, dtype=dtype)
    density = draw(DENSITY)
    seed = draw(SEED)
    return strategy, method, tasks, weights, density, seed


def _run(strategy, method, tasks, weights, density, seed):
    kw = {"density": density, "majority_sign_method": method}
    if strategy in RANDOM_STRATEGIES:
        kw["seed"] = seed
    return lorax_merge.merge(tasks, weights, strategy, **kw)


def _reference(strategy, method, tasks, weights, density, seed):
    masks = (
        dare_masks(tasks, density, seed) if strategy in RANDOM_STRATEGIES and density < 1 else None
    )
    return reference_merge_detailed(tasks, weights, strategy, density, method, masks)


@given(merge_case())
def test_merge_matches_reference(case):
    got = _run(*case)
    ref = _reference(*case)
    assert got.shape == ref.out.shape
    assert_merge_matches(got, ref, what=f"{case[0]} {case[1]}")


@given(merge_case(kinds=("finite", "tied")))
def test_finite_inputs_give_finite_outputs(case):
    strategy, method, tasks, weights, density, seed = case
    weights = [float(w) for w in weights]  # float32 result: no 16-bit overflow
    got = _run(strategy, method, tasks, weights, density, seed)
    assert bool(torch.isfinite(got).all())


@given(merge_case(kinds=("finite", "tied")), st.sampled_from([2.0, 0.5, -4.0]))
def test_scaling_weights_by_a_power_of_two_scales_the_result_exactly(case, factor):
    strategy, method, tasks, weights, density, seed = case
    weights = [float(w) for w in weights]
    base = _run(strategy, method, tasks, weights, density, seed)
    scaled = _run(strategy, method, tasks, [w * factor for w in weights], density, seed)
    assert torch.equal(scaled, base * factor)


@given(merge_case())
def test_repeated_calls_are_bit_identical(case):
    a = _run(*case)
    b = _run(*case)
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@given(
    st.sampled_from(ALL_DTYPES),
    SHAPE,
    DENSITY,
    st.data(),
)
def test_prune_magnitude_matches_reference(dtype, shape, density, data):
    (x,) = data.draw(task_data(1, shape, dtype))
    got = utils.prune(x, density, "magnitude")
    expected = reference_prune_magnitude(x, density)
    assert_matches(got, expected, what="prune magnitude")
    finite_nonzero = torch.isfinite(x) & (x != 0)
    k = magnitude_keep_count(x.numel(), density)
    # at most k entries survive, and the survivors are the entries of x
    survivors = (got != 0) & finite_nonzero
    assert int(survivors.sum()) <= k
    assert torch.equal(got[survivors], x[survivors])


@given(
    st.sampled_from(ALL_DTYPES),
    SHAPE,
    DENSITY,
    st.booleans(),
    SEED,
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_prune_random_matches_reference(dtype, shape, density, rescale, seed, stream, data):
    (x,) = data.draw(task_data(1, shape, dtype))
    mask = random_mask(shape, density, seed, stream)
    got = utils.prune(x, density, "random", rescale=rescale, seed=seed, stream=stream)
    assert_matches(got, reference_prune_random(x, density, rescale, mask), what="prune random")


@given(
    st.sampled_from(ALL_DTYPES),
    st.integers(1, 7),
    SHAPE,
    st.sampled_from(["total", "frequency"]),
    st.data(),
)
def test_sign_mask_and_disjoint_merge_match_reference(dtype, n, shape, method, data):
    tasks = data.draw(task_data(n, shape, dtype))
    stacked = torch.stack(tasks)
    mask = utils.calculate_majority_sign_mask(stacked, method)
    assert torch.equal(mask, reference_sign_mask(stacked, method))
    got = utils.disjoint_merge(stacked, mask)
    expected = reference_disjoint_merge(stacked, mask)
    x = stacked.to(torch.float64)
    abs_sum = torch.where(mask, x.abs(), torch.zeros_like(x)).sum(0)
    count = torch.clamp(mask.sum(0), min=1)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    bound = 2 * n * acc_eps * abs_sum / count
    tol = bound + acc_eps * (abs_sum / count + bound)
    assert_matches(got, expected, torch.nan_to_num(tol, nan=0.0, posinf=0.0), what="disjoint_merge")
