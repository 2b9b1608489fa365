"""The primitives of ``lorax_merge.utils`` against the reference semantics.

Chosen cases first, then arbitrary small ones drawn by hypothesis (the number of examples comes
from the hypothesis profile, see conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CUDA_AVAILABLE
from helpers import (
    ALL_DTYPES,
    DENSITY,
    SEED,
    SHAPE,
    assert_unmodified,
    normal,
    random_mask,
    snapshot,
    strided_slice,
    task_data,
    tie_free,
    tie_heavy,
    transposed,
)
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    assert_matches,
    disjoint_result_dtype,
    magnitude_keep_count,
    reference_disjoint_merge,
    reference_prune_magnitude,
    reference_prune_random,
    reference_sign_mask,
    rescale,
)

from lorax_merge import utils

SHAPES = [(100,), (10, 10), (3, 4, 5), (), (0,), (4, 0, 3)]
DENSITIES = [0.0, 0.29, 0.5, 0.9, 1.0, 1.5]
NAN, INF = math.nan, math.inf


def _disjoint_tolerance(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rounding bound of a masked mean: accumulation error plus one ulp of the dtype."""
    x = stacked.detach().to("cpu").to(torch.float64)
    m = mask.to("cpu")
    abs_sum = torch.where(m, x.abs(), torch.zeros_like(x)).sum(0)
    count = torch.clamp(m.sum(0), min=1)
    acc = torch.float64 if stacked.dtype == torch.float64 else torch.float32
    n = max(stacked.shape[0], 1)
    bound = 2 * n * torch.finfo(acc).eps * abs_sum / count
    return bound + torch.finfo(acc).eps * (abs_sum / count + bound)


# --------------------------------------------------------------------------- magnitude


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_prune_magnitude_matches_reference(device, dtype, density, shape):
    x = normal(shape, dtype, seed=3).to(device)  # fp16/bf16 normals contain ties
    before = snapshot([x])
    got = utils.prune(x, density, "magnitude")
    assert got.device == x.device and got.dtype == dtype and got.shape == x.shape
    assert_matches(got, reference_prune_magnitude(x, density), what="prune magnitude")
    assert_unmodified(before, [x])


@pytest.mark.parametrize(
    "density,k",
    [(0.29, 28), (0.57, 56), (0.58, 57), (0.07, 7), (0.5, 50), (0.01, 1), (0.009, 0), (0.999, 99)],
)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_magnitude_keeps_int_of_density_times_numel(device, dtype, density, k):
    # int(0.29 * 100) == 28 in double precision (29 if computed in float32).
    assert magnitude_keep_count(100, density) == k
    x = tie_free((100,), dtype, seed=5).to(device)
    got = utils.prune(x, density, "magnitude").cpu()
    kept = got != 0
    assert int(kept.sum()) == k
    assert torch.equal(got[kept], x.cpu()[kept])
    if 0 < k < 100:
        assert x.cpu()[kept].abs().min() > x.cpu()[~kept].abs().max()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_magnitude_equal_magnitudes_keep_lower_flat_index(device, dtype):
    x = torch.tensor([1.0, -2.0, 2.0, -1.0, 2.0, 0.5, -0.5, 3.0], dtype=dtype, device=device)
    # stable descending order of |x|: 7, 1, 2, 4, 0, 3, 5, 6
    expected_kept = {
        4: [7, 1, 2, 4],
        5: [7, 1, 2, 4, 0],
        6: [7, 1, 2, 4, 0, 3],
        7: [7, 1, 2, 4, 0, 3, 5],
    }
    for k, kept in expected_kept.items():
        got = utils.prune(x, k / 8, "magnitude").cpu()
        expected = torch.zeros(8, dtype=dtype)
        expected[kept] = x.cpu()[kept]
        assert torch.equal(got, expected), (k, got)
    # 2-D: the tie-break follows the row-major index, also for a transposed view
    m = torch.tensor([[1.0, 5.0], [1.0, 1.0]], dtype=dtype, device=device)
    for view in (m, transposed(m)):
        got = utils.prune(view, 0.5, "magnitude").cpu()
        assert torch.equal(got, torch.tensor([[1.0, 5.0], [0.0, 0.0]], dtype=dtype))
    got = utils.prune(m.t(), 0.5, "magnitude").cpu()  # logical [[1, 1], [5, 1]]
    assert torch.equal(got, torch.tensor([[1.0, 0.0], [5.0, 0.0]], dtype=dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_magnitude_zero_signs_are_equal_and_nan_ranks_above_inf(device, dtype):
    x = torch.tensor([-0.0, 1.0, 0.5, -0.0, 0.0], dtype=dtype, device=device)
    got = utils.prune(x, 0.4, "magnitude").cpu()  # k = 2: a signed zero never outranks 0.5
    assert torch.equal(got, torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0], dtype=dtype))

    x = torch.tensor([1.0, INF, NAN, -INF, 2.0], dtype=dtype, device=device)
    got = utils.prune(x, 0.4, "magnitude")  # k = 2: NaN, +Inf; dropped -Inf * 0 is NaN
    assert_matches(got, torch.tensor([0.0, INF, NAN, NAN, 0.0], dtype=dtype), what="k=2")
    got = utils.prune(x, 0.6, "magnitude")  # k = 3: NaN, +Inf, -Inf (lower index first)
    assert_matches(got, torch.tensor([0.0, INF, NAN, -INF, 0.0], dtype=dtype), what="k=3")
    got = utils.prune(x, 0.2, "magnitude")  # k = 1: only the NaN
    assert_matches(got, torch.tensor([0.0, NAN, NAN, NAN, 0.0], dtype=dtype), what="k=1")


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_magnitude_tie_heavy_16bit(device, dtype, density):
    x = tie_heavy((37, 29), dtype, seed=11).to(device)
    got = utils.prune(x, density, "magnitude")
    assert_matches(got, reference_prune_magnitude(x, density), what="tie-heavy")


@pytest.mark.parametrize("make_view", [transposed, strided_slice], ids=["transposed", "sliced"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_magnitude_non_contiguous(device, dtype, make_view):
    base = tie_heavy((12, 9), dtype, seed=2).to(device)
    view = make_view(base)
    assert not view.is_contiguous()
    got = utils.prune(view, 0.37, "magnitude")
    assert_matches(got, reference_prune_magnitude(base, 0.37), what="view")
    assert torch.equal(got.cpu(), utils.prune(base, 0.37, "magnitude").cpu())


def test_magnitude_ignores_rescale(device):
    x = normal((50,), torch.float32, seed=4).to(device)
    assert torch.equal(
        utils.prune(x, 0.4, "magnitude", rescale=True).cpu(), utils.prune(x, 0.4, "magnitude").cpu()
    )


# --------------------------------------------------------------------------- random


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rescale_kept", [False, True])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_prune_random_matches_reference(device, dtype, density, rescale_kept, shape):
    x = normal(shape, dtype, seed=8).to(device)
    before = snapshot([x])
    mask = random_mask(shape, density, seed=21, stream=3, device=device)
    got = utils.prune(x, density, "random", rescale=rescale_kept, seed=21, stream=3)
    assert got.device == x.device and got.dtype == dtype and got.shape == x.shape
    expected = reference_prune_random(x, density, rescale_kept, mask)
    assert_matches(got, expected, what="prune random")
    assert_unmodified(before, [x])
    if density == 0:
        assert not bool(mask.any())
    if density >= 1:
        assert bool(mask.all())


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 0.999])
def test_random_keep_fraction_is_density(device, density):
    n = 200_000
    kept = int(random_mask((n,), density, seed=5, stream=0, device=device).sum())
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 6 * sd + 1, (kept, n * density)


def test_random_mask_depends_only_on_seed_stream_and_flat_index(device):
    ref = random_mask((1000,), 0.5, seed=99, stream=4, device=device).cpu()
    for dtype in ALL_DTYPES:
        for shape in [(1000,), (10, 100), (5, 20, 10)]:
            x = torch.ones(shape, dtype=dtype, device=device)
            got = utils.prune(x, 0.5, "random", seed=99, stream=4).cpu() != 0
            assert torch.equal(got.reshape(-1), ref), (dtype, shape)
        # a transposed view is pruned in its logical (row-major) order
        view = torch.ones((100, 10), dtype=dtype, device=device).t()
        got = utils.prune(view, 0.5, "random", seed=99, stream=4).cpu() != 0
        assert torch.equal(got.reshape(-1), ref), dtype
    # a shorter tensor sees the prefix of the same stream
    short = random_mask((317,), 0.5, seed=99, stream=4, device=device).cpu()
    assert torch.equal(short, ref[:317])


def test_random_masks_differ_between_seeds_and_streams(device):
    a = random_mask((4096,), 0.5, seed=1, stream=0, device=device)
    assert torch.equal(a, random_mask((4096,), 0.5, seed=1, stream=0, device=device))
    for other in (
        random_mask((4096,), 0.5, seed=2, stream=0, device=device),
        random_mask((4096,), 0.5, seed=1, stream=1, device=device),
    ):
        agree = float((a == other).float().mean())
        assert 0.4 < agree < 0.6, agree  # independent masks agree about half the time


def test_random_masks_are_nested_in_density(device):
    masks = [random_mask((5000,), d, seed=3, stream=2, device=device) for d in (0.1, 0.3, 0.5, 0.8)]
    for small, large in zip(masks, masks[1:]):
        assert not bool((small & ~large).any())
        assert int(small.sum()) < int(large.sum())


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device visible")
def test_random_masks_are_the_same_on_cpu_and_cuda():
    for seed, stream in [(0, 0), (5, 3), (2**63 - 1, 7), (123456789, 2**31 - 1)]:
        cpu = random_mask((30001,), 0.37, seed, stream)
        cuda = random_mask((30001,), 0.37, seed, stream, device="cuda").cpu()
        assert torch.equal(cpu, cuda), (seed, stream)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.29, 0.5, 0.7, 0.123])
def test_random_rescale_is_torch_division(device, dtype, density):
    x = normal((2000,), dtype, seed=12).to(device)
    got = utils.prune(x, density, "random", rescale=True, seed=4, stream=1).cpu()
    kept = random_mask((2000,), density, seed=4, stream=1, device=device).cpu()
    assert torch.equal(got[kept], (x.cpu() / density)[kept])
    assert torch.equal(got[kept], rescale(x.cpu(), density)[kept])
    assert bool((got[~kept] == 0).all())


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_density_zero_drops_everything_and_one_keeps_everything(device, method):
    x = torch.tensor([1.0, -2.0, INF, -INF, NAN, 0.0, 3.5], device=device)
    got0 = utils.prune(x, 0.0, method, rescale=True, seed=1)
    assert_matches(got0, torch.tensor([0.0, 0.0, NAN, NAN, NAN, 0.0, 0.0]), what="density 0")
    for density in (1.0, 1.25, 10.0):
        got = utils.prune(x, density, method, rescale=True, seed=1)
        assert_matches(got, x, what=f"density {density}")


def test_random_seed_none_follows_torch_manual_seed(device):
    x = normal((4096,), torch.float32, seed=1).to(device)
    torch.manual_seed(77)
    a = utils.prune(x, 0.5, "random")
    torch.manual_seed(77)
    b = utils.prune(x, 0.5, "random")
    c = utils.prune(x, 0.5, "random")
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


# --------------------------------------------------------------------------- sign mask


STACKED_SHAPES = [(3, 100), (1, 7), (17, 5, 4), (4,), (2, 0), (5, 3, 0, 2)]


@pytest.mark.parametrize("kind", ["normal", "tie_heavy"])
@pytest.mark.parametrize("shape", STACKED_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sign_mask_matches_reference(device, dtype, method, shape, kind):
    make = normal if kind == "normal" else tie_heavy
    stacked = make(shape, dtype, seed=6).to(device)
    before = snapshot([stacked])
    got = utils.calculate_majority_sign_mask(stacked, method)
    assert got.dtype == torch.bool and got.shape == stacked.shape and got.device == stacked.device
    assert torch.equal(got.cpu(), reference_sign_mask(stacked, method))
    assert_unmodified(before, [stacked])


def test_sign_mask_hand_computed(device):
    stacked = torch.tensor(
        [[1.0, -1.0, 0.0, 2.0], [-1.0, -1.0, 0.0, -3.0], [1.0, 2.0, 0.0, 0.0]], device=device
    )
    # total: S = [1, 0, 0, -1] -> majority [+, +, +, -]; zeros never match
    total = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    # frequency: S = [1, -1, 0, 0] -> majority [+, -, +, +]
    freq = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(utils.calculate_majority_sign_mask(stacked).cpu(), total)
    assert torch.equal(utils.calculate_majority_sign_mask(stacked, "total").cpu(), total)
    assert torch.equal(utils.calculate_majority_sign_mask(stacked, "frequency").cpu(), freq)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sign_mask_nan_and_inf(device, dtype, method):
    stacked = torch.tensor(
        [
            [NAN, 1.0, INF, -INF, INF, 2.0],
            [1.0, NAN, 1.0, 1.0, -INF, -1.0],
            [2.0, 3.0, -1.0, 1.0, 1.0, -1.0],
        ],
        dtype=dtype,
        device=device,
    )
    got = utils.calculate_majority_sign_mask(stacked, method).cpu()
    assert torch.equal(got, reference_sign_mask(stacked, method))
    assert not bool(got[0, 0]) and not bool(got[1, 1])  # NaN never agrees


# --------------------------------------------------------------------------- disjoint merge


@pytest.mark.parametrize("mask_kind", ["sign", "random"])
@pytest.mark.parametrize("shape", STACKED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_disjoint_merge_matches_reference(device, dtype, shape, mask_kind):
    stacked = normal(shape, dtype, seed=9).to(device)
    if mask_kind == "sign":
        mask = reference_sign_mask(stacked).to(device)
    else:
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)).to(device) < 0.4
    before = snapshot([stacked, mask])
    got = utils.disjoint_merge(stacked, mask)
    assert got.dtype == disjoint_result_dtype(dtype)
    assert got.shape == stacked.shape[1:] and got.device == stacked.device
    expected = reference_disjoint_merge(stacked, mask)
    assert_matches(got, expected, _disjoint_tolerance(stacked, mask), what="disjoint_merge")
    assert_unmodified(before, [stacked, mask])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_disjoint_merge_hand_computed(device, dtype):
    stacked = torch.tensor(
        [[2.0, 4.0, 5.0, INF], [4.0, -4.0, 7.0, 1.0]], dtype=dtype, device=device
    )
    mask = torch.tensor([[True, True, False, False], [True, False, False, True]], device=device)
    got = utils.disjoint_merge(stacked, mask)
    # column 2: nobody agrees -> 0; column 3: the masked-out Inf contributes Inf * 0 = NaN
    expected = torch.tensor([3.0, 4.0, 0.0, NAN], dtype=disjoint_result_dtype(dtype))
    assert_matches(got, expected, what="hand")


def test_disjoint_merge_of_tie_heavy_bf16_is_exact(device):
    stacked = tie_heavy((6, 40, 40), torch.bfloat16, seed=13).to(device)
    mask = utils.calculate_majority_sign_mask(stacked, "frequency")
    got = utils.disjoint_merge(stacked, mask).cpu()
    assert torch.equal(got, reference_disjoint_merge(stacked.cpu(), mask.cpu()))
    assert not bool(torch.isnan(got).any())


def test_tie_free_reference_data_is_tie_free():
    for dtype in ALL_DTYPES:
        x = tie_free((1000,), dtype, seed=1)
        assert torch.unique(x.abs().to(torch.float64)).numel() == 1000


# --------------------------------------------------------------------------- arbitrary inputs


@given(st.sampled_from(ALL_DTYPES), SHAPE, DENSITY, st.data())
def test_any_prune_magnitude_matches_reference(dtype, shape, density, data):
    (x,) = data.draw(task_data(1, shape, dtype))
    got = utils.prune(x, density, "magnitude")
    assert_matches(got, reference_prune_magnitude(x, density), what="prune magnitude")
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
def test_any_prune_random_matches_reference(
    dtype, shape, density, rescale_kept, seed, stream, data
):
    (x,) = data.draw(task_data(1, shape, dtype))
    mask = random_mask(shape, density, seed, stream)
    got = utils.prune(x, density, "random", rescale=rescale_kept, seed=seed, stream=stream)
    expected = reference_prune_random(x, density, rescale_kept, mask)
    assert_matches(got, expected, what="prune random")


@given(
    st.sampled_from(ALL_DTYPES),
    st.integers(1, 7),
    SHAPE,
    st.sampled_from(["total", "frequency"]),
    st.data(),
)
def test_any_sign_mask_and_disjoint_merge_match_reference(dtype, n, shape, method, data):
    stacked = torch.stack(data.draw(task_data(n, shape, dtype)))
    mask = utils.calculate_majority_sign_mask(stacked, method)
    assert torch.equal(mask, reference_sign_mask(stacked, method))
    got = utils.disjoint_merge(stacked, mask)
    tol = torch.nan_to_num(_disjoint_tolerance(stacked, mask), nan=0.0, posinf=0.0)
    assert_matches(got, reference_disjoint_merge(stacked, mask), tol, what="disjoint_merge")
