"""``lorax_merge.merge`` and ``merge_many`` against the slow reference, and merge invariants.

``test_merge_matches_reference`` runs every strategy, dtype and edge density on fixed data
(explicit examples), then differential fuzzing: cases built to break kernels, with up to 64
tasks, 0-D to 4-D tensors with odd and empty dimensions, misaligned, strided, transposed and
broadcast (stride-0) views, densities at and past the edges, weights that are negative, zero or
huge, weight tensors of every dtype, values near the dtype's overflow and underflow limits,
tie-heavy data and data with NaN and Inf. Every result is compared with ``tests/reference.py``;
results written through ``out=`` must equal the returned ones bit for bit; ``merge_many`` must
equal the reference group by group; and where a GPU is visible the CUDA result must equal the
CPU result bit for bit. Small, tame cases check invariants the reference does not state:
finite inputs give finite outputs, power-of-two weights scale the result exactly, and repeated
calls give the same bits.

The example counts follow the hypothesis profile of ``conftest.py`` (``ci`` by default,
``HYPOTHESIS_PROFILE=nightly`` for thousands of examples): the main differential test runs
eight times the profile's count, the CUDA comparison twice, the others once.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import upstream
from helpers import (
    ALL_DTYPES,
    DENSITY,
    ELECTING_STRATEGIES,
    RANDOM_STRATEGIES,
    SEED,
    SHAPE,
    STRATEGIES,
    TIE_VALUES,
    WEIGHT,
    assert_same_bits,
    dare_masks,
    make_tasks,
    task_data,
    transposed,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import assert_matches, assert_merge_matches, reference_merge_detailed

import lorax_merge

CUDA_OK = torch.cuda.is_available() and bool(lorax_merge.build_info().get("cuda_compiled"))

#: examples of the main differential test: a multiple of the profile's count
_BASE_EXAMPLES = settings.default.max_examples
MAIN_EXAMPLES = 8 * _BASE_EXAMPLES

#: odd sizes around vector widths (4, 8, 16 lanes) and tails
DIM_SIZES = (0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65)
#: sizes of the occasional large case: around the 32K-element parallel chunk and past the
#: 2**18-element threshold of the parallel magnitude selection
LARGE_SIZES = (32767 * 7, 32769 * 7, 2**18 + 7 * 11, 300_007)
#: the most elements of one case, over all of its tasks (keeps the reference fast)
MAX_TOTAL_ELEMENTS = 6000

FUZZ_DENSITY = st.one_of(
    st.sampled_from([0.0, 1.0, 1.0000001, 1.5, 100.0, 1e-9, 0.999999, 0.5, 1 / 3]),
    st.floats(0.0, 1.0, exclude_max=True),
)
HUGE_WEIGHTS = (1e30, -1e30, 3.0e38, 65504.0, -65504.0, 1e300, -1e300)
FUZZ_WEIGHT = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.75, *HUGE_WEIGHTS]),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.floats(-1e-30, 1e-30, allow_nan=False, allow_infinity=False),
)
WEIGHT_FORMS = ("list", "float32", "float64", "float16", "bfloat16", "task dtype")
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "broadcast")
DATA_KINDS = ("normal", "tied", "special", "huge", "tiny", "mixed")


# ---------------------------------------------------------------------------- data builders


def _values(kind: str, numel: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``numel`` values of one kind, rounded to ``dtype`` (a 1-D CPU tensor)."""
    info = torch.finfo(dtype)
    if kind == "tied":
        values = torch.tensor(TIE_VALUES, dtype=torch.float64)
        return values[torch.randint(len(TIE_VALUES), (numel,), generator=gen)].to(dtype)
    if kind == "huge":  # products with weights overflow; sums of a few cancel or overflow
        x = (torch.rand(numel, generator=gen, dtype=torch.float64) * 2 - 1) * info.max
        return x.to(dtype)
    if kind == "tiny":  # subnormals and the smallest normals of the dtype
        x = torch.randn(numel, generator=gen, dtype=torch.float64) * info.smallest_normal
        return x.to(dtype)
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    if kind == "mixed":  # tie-heavy values among normal ones
        tied = torch.tensor(TIE_VALUES, dtype=torch.float64)
        pick = torch.rand(numel, generator=gen) < 0.5
        x = torch.where(pick, tied[torch.randint(len(TIE_VALUES), (numel,), generator=gen)], x)
    if kind in ("special", "mixed"):
        specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
        hit = torch.rand(numel, generator=gen) < 0.15
        x = torch.where(hit, specials[torch.randint(3, (numel,), generator=gen)], x)
    return x.to(dtype)


def _offset_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a buffer that starts one element into its storage (misaligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as every other element of the last dimension of a wider buffer."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), math.nan, dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical values as ``t`` in another memory layout."""
    if layout == "transposed" and t.dim() >= 2:
        return transposed(t)
    if layout == "strided" and t.dim() >= 1:
        return _strided(t)
    if layout == "offset":
        return _offset_view(t)
    return t


def _broadcast_tasks(
    n: int, shape: tuple[int, ...], dtype: torch.dtype, kind: str, gen: torch.Generator
) -> list[torch.Tensor]:
    """Tasks that are stride-0 expansions of a smaller tensor along the first dimension."""
    tasks = []
    for _ in range(n):
        row = _values(kind, math.prod(shape[1:]), dtype, gen).reshape((1, *shape[1:]))
        tasks.append(row.expand(shape))
    return tasks


@st.composite
def shapes(draw, max_numel: int) -> tuple[int, ...]:
    """0-D to 4-D shapes with odd and empty dimensions, at most ``max_numel`` elements."""
    ndim = draw(st.integers(0, 4))
    dims = [draw(st.sampled_from(DIM_SIZES)) for _ in range(ndim)]
    while math.prod(dims) > max_numel:
        largest = max(range(ndim), key=lambda i: dims[i])
        dims[largest] = max(1, dims[largest] // 2 - 1)
    return tuple(dims)


@st.composite
def merge_cases(draw, kinds=DATA_KINDS, max_tasks: int = 64):
    """One fuzz case: everything ``lorax_merge.merge`` takes, drawn adversarially."""
    strategy = draw(st.sampled_from(STRATEGIES))
    method = draw(st.sampled_from(["total", "frequency"]))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    if draw(st.integers(0, 9)) == 0:
        # now and then a large case: several parallel chunks, the parallel threshold selection
        n = draw(st.integers(1, 3))
        numel = draw(st.sampled_from(LARGE_SIZES))
        shape = draw(st.sampled_from([(numel,), (numel // 7, 7), (7, numel // 7)]))
    else:
        n = draw(st.one_of(st.integers(1, 4), st.integers(5, max_tasks)))
        shape = draw(shapes(max(1, MAX_TOTAL_ELEMENTS // n)))
    kind = draw(st.sampled_from(kinds))
    layout = draw(st.sampled_from(LAYOUTS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if layout == "broadcast" and len(shape) >= 1:
        tasks = _broadcast_tasks(n, shape, dtype, kind, gen)
    else:
        tasks = [
            _layout(_values(kind, math.prod(shape), dtype, gen).reshape(shape), layout)
            for _ in range(n)
        ]
    weights = draw(st.lists(FUZZ_WEIGHT, min_size=n, max_size=n))
    form = draw(st.sampled_from(WEIGHT_FORMS))
    if form != "list":
        wdtype = dtype if form == "task dtype" else getattr(torch, form)
        weights = torch.tensor(weights, dtype=torch.float64).to(wdtype)
    out_dtype = draw(st.one_of(st.none(), st.sampled_from(ALL_DTYPES)))
    density = draw(FUZZ_DENSITY)
    seed = draw(st.integers(0, 2**64 - 1))
    return {
        "strategy": strategy,
        "method": method,
        "tasks": tasks,
        "weights": weights,
        "density": density,
        "seed": seed,
        "out_dtype": out_dtype,
    }


def _describe(case: dict) -> str:
    t = case["tasks"][0]
    w = case["weights"]
    wd = w.dtype if isinstance(w, torch.Tensor) else "list"
    return (
        f"{case['strategy']}/{case['method']} {len(case['tasks'])} x {tuple(t.shape)} {t.dtype} "
        f"stride {t.stride()} weights {wd} density {case['density']!r} out {case['out_dtype']}"
    )


def _kwargs(case: dict) -> dict:
    kw = {
        "density": case["density"],
        "majority_sign_method": case["method"],
        "out_dtype": case["out_dtype"],
    }
    if case["strategy"] in RANDOM_STRATEGIES:
        kw["seed"] = case["seed"]
    return kw


def _merge(case: dict, tasks=None) -> torch.Tensor:
    return lorax_merge.merge(
        case["tasks"] if tasks is None else tasks,
        case["weights"],
        case["strategy"],
        **_kwargs(case),
    )


def _reference(case: dict, seed: int | None = None):
    strategy, density = case["strategy"], case["density"]
    masks = None
    if strategy in RANDOM_STRATEGIES and density < 1:
        masks = dare_masks(case["tasks"], density, case["seed"] if seed is None else seed)
    return reference_merge_detailed(
        case["tasks"],
        case["weights"],
        strategy,
        density,
        case["method"],
        masks,
        case["out_dtype"],
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` in logical order (tells -0 from +0 and NaN payloads apart)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().cpu().reshape(-1))
    return flat.view(torch.uint8)


def with_grid_examples(test):
    """Every strategy x dtype x edge density on fixed data, as explicit examples of ``test``."""
    densities = (0.0, 0.29, 0.5, 1.0, 1.7)
    for strategy, dtype, density in itertools.product(STRATEGIES, ALL_DTYPES, densities):
        case = {
            "strategy": strategy,
            "method": "total",
            "tasks": make_tasks(3, (10, 10), dtype, "normal", seed=1),
            "weights": [0.5, -1.25, 2.0],
            "density": density,
            "seed": 7,
            "out_dtype": None,
        }
        test = example(case=case)(test)
    return test


# ---------------------------------------------------------------------------------- the tests


@with_grid_examples
@settings(max_examples=MAIN_EXAMPLES)
@given(merge_cases())
def test_merge_matches_reference(case):
    snapshot = [_bits(t).clone() for t in case["tasks"]]
    got = _merge(case)
    ref = _reference(case)
    what = _describe(case)
    assert got.shape == case["tasks"][0].shape, what
    assert got.is_contiguous(), what
    assert_merge_matches(got, ref, what=what)
    for i, (before, t) in enumerate(zip(snapshot, case["tasks"])):
        assert torch.equal(before, _bits(t)), f"{what}: task {i} was modified"


@given(merge_cases(max_tasks=16), st.sampled_from(["contiguous", "transposed", "strided"]))
def test_out_equals_the_returned_result_bit_for_bit(case, out_layout):
    expected = _merge(case)
    base = torch.full(expected.shape, 7.0, dtype=expected.dtype)  # poison: must be overwritten
    out = _layout(base, out_layout) if expected.dim() else base
    kw = _kwargs(case)
    kw.pop("out_dtype")
    returned = lorax_merge.merge(case["tasks"], case["weights"], case["strategy"], out=out, **kw)
    assert returned is out
    assert out.dtype == expected.dtype
    assert torch.equal(_bits(out), _bits(expected)), _describe(case)


@given(st.lists(merge_cases(max_tasks=8), min_size=1, max_size=5), st.data())
def test_merge_many_matches_reference_group_by_group(cases, data):
    # one strategy, density, method, out_dtype and task dtype for all groups, as merge_many takes
    first = cases[0]
    dtype = first["tasks"][0].dtype
    groups = [[t.to(dtype) for t in c["tasks"]] for c in cases]
    weights = [c["weights"] for c in cases]
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    outs = lorax_merge.merge_many(
        groups,
        weights,
        strategy=first["strategy"],
        density=first["density"],
        majority_sign_method=first["method"],
        seed=seed,
        out_dtype=first["out_dtype"],
    )
    assert len(outs) == len(groups)
    for g, (tasks, w, got) in enumerate(zip(groups, weights, outs)):
        case = dict(first, tasks=tasks, weights=w, seed=lorax_merge.derive_group_seed(seed, g))
        assert_merge_matches(got, _reference(case), what=f"group {g}: {_describe(case)}")
        # and the batched path equals the single-call path bit for bit
        assert torch.equal(_bits(got), _bits(_merge(case))), f"group {g}: {_describe(case)}"


@pytest.mark.skipif(not CUDA_OK, reason="no CUDA device visible (or no CUDA kernels built)")
@settings(max_examples=2 * _BASE_EXAMPLES)
@given(merge_cases())
def test_cuda_equals_cpu_bit_for_bit(case):
    cpu = _merge(case)
    gpu_tasks = [t.cuda() for t in case["tasks"]]
    gpu = _merge(case, gpu_tasks)
    assert gpu.device.type == "cuda"
    assert_matches(gpu, cpu, 0.0, what=_describe(case))
    # the same bits: signs of zeros and NaNs (one canonical NaN per dtype) included
    assert torch.equal(_bits(gpu), _bits(cpu)), f"{_describe(case)}: the bits differ"


# ------------------------------------------------------------------------- invariants


@st.composite
def tame_cases(draw, kinds=("finite", "tied")):
    """A small merge of finite values and weights far from overflow and underflow."""
    strategy = draw(st.sampled_from(STRATEGIES))
    method = draw(st.sampled_from(["total", "frequency"]))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    n = draw(st.integers(1, 6))
    tasks = draw(task_data(n, draw(SHAPE), dtype, kinds))
    weights = draw(st.lists(WEIGHT, min_size=n, max_size=n))
    return {
        "strategy": strategy,
        "method": method,
        "tasks": tasks,
        "weights": weights,  # a list: float32 results, no 16-bit overflow
        "density": draw(DENSITY),
        "seed": draw(SEED),
        "out_dtype": None,
    }


@given(tame_cases())
def test_finite_inputs_give_finite_outputs(case):
    assert bool(torch.isfinite(_merge(case)).all()), _describe(case)


@given(tame_cases(), st.sampled_from([2.0, 0.5, -4.0]))
def test_scaling_weights_by_a_power_of_two_scales_the_result_exactly(case, factor):
    base = _merge(case)
    scaled = _merge(dict(case, weights=[w * factor for w in case["weights"]]))
    assert torch.equal(scaled, base * factor), _describe(case)


@given(tame_cases(kinds=("finite", "tied", "special")))
def test_repeated_calls_are_bit_identical(case):
    assert torch.equal(_bits(_merge(case)), _bits(_merge(case))), _describe(case)


@pytest.mark.parametrize("strategy", sorted(ELECTING_STRATEGIES))
def test_the_sign_vote_is_summed_in_the_task_dtype_whatever_the_result_dtype(device, strategy):
    """float64 weights or a float64 result widen the weighted sums, not the vote. The server
    sums the unweighted float32 stack in float32, where 1e8 + (-1) + (-1e8) is 0 (a positive
    majority: task 0 alone); float64 would make it -1 and merge tasks 1 and 2 instead."""
    values = ([1e8, 2.0], [-1.0, -3.0], [-1e8, 0.5])
    tasks = [torch.tensor(v, device=device) for v in values]
    w64 = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=device)
    expected = upstream.ties([t.cpu() for t in tasks], w64.cpu(), density=1.0)
    assert expected.tolist() == [1e8, -1.5]
    assert_same_bits(lorax_merge.merge(tasks, w64, strategy).cpu(), expected, "float64 weights")
    widened = lorax_merge.merge(tasks, w64.float(), strategy, out_dtype=torch.float64)
    assert_same_bits(widened.cpu(), expected, "float64 result")
    many = lorax_merge.merge_many([tasks, tasks], w64, strategy=strategy)
    for out in many:
        assert_same_bits(out.cpu(), expected, "merge_many")
