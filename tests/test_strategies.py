"""``lorax_merge.merge``, the strategy classes and ``merge_many`` on chosen cases.

Every strategy, dtype and edge density against the reference, and arbitrary inputs, are in
``test_merge_reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from helpers import (
    ALL_DTYPES,
    ELECTING_STRATEGIES,
    RANDOM_STRATEGIES,
    STRATEGIES,
    assert_same_bits,
    assert_unmodified,
    dare_masks,
    make_tasks,
    merge_kwargs,
    normal,
    snapshot,
    strided_slice,
    transposed,
)
from reference import (
    assert_merge_matches,
    reference_merge,
    reference_merge_detailed,
)

import lorax_merge
from lorax_merge import strategies

NAN, INF = math.nan, math.inf
WEIGHTS3 = [0.5, -1.25, 2.0]


def _reference(tasks, weights, strategy, density, method="total", seed=7, out_dtype=None):
    masks = None
    if strategy in RANDOM_STRATEGIES and density < 1:
        masks = dare_masks(tasks, density, seed)
    return reference_merge_detailed(tasks, weights, strategy, density, method, masks, out_dtype)


# --------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("weights_kind", ["list", "bf16 tensor"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tie_heavy_bf16(device, strategy, weights_kind, density, method):
    tasks = make_tasks(4, (48, 40), torch.bfloat16, "tie_heavy", seed=2, device=device)
    weights = [1.0, -0.5, 2.0, 0.25]
    if weights_kind == "bf16 tensor":
        weights = torch.tensor(weights, dtype=torch.bfloat16)
    kw = merge_kwargs(strategy, density, method)
    got = lorax_merge.merge(tasks, weights, strategy, **kw)
    ref = _reference(tasks, weights, strategy, density, method)
    assert got.dtype == ref.out.dtype
    assert_merge_matches(got, ref, what=f"{strategy} {method}")


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", sorted(ELECTING_STRATEGIES))
def test_sign_methods(device, strategy, dtype, method):
    tasks = make_tasks(5, (7, 13), dtype, "normal", seed=3, device=device)
    weights = [1.0, 0.5, -1.0, 2.0, 0.75]
    got = lorax_merge.merge(tasks, weights, strategy, **merge_kwargs(strategy, 0.6, method))
    assert_merge_matches(got, _reference(tasks, weights, strategy, 0.6, method), what=method)


@pytest.mark.parametrize("n_tasks", [1, 2, 17])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_task_counts(device, strategy, n_tasks):
    tasks = make_tasks(n_tasks, (9, 11), torch.float32, "tie_heavy", seed=4, device=device)
    weights = [((-1) ** i) * (0.25 + 0.125 * i) for i in range(n_tasks)]
    got = lorax_merge.merge(tasks, weights, strategy, **merge_kwargs(strategy, 0.45))
    assert_merge_matches(got, _reference(tasks, weights, strategy, 0.45), what=f"{n_tasks} tasks")


@pytest.mark.parametrize(
    "shape", [(), (1,), (5,), (2, 3, 4), (2, 1, 3, 2), (0,), (3, 0, 2)], ids=str
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes(device, strategy, shape):
    tasks = make_tasks(3, shape, torch.float32, "normal", seed=5, device=device)
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, 0.5))
    assert got.shape == torch.Size(shape)
    assert_merge_matches(got, _reference(tasks, WEIGHTS3, strategy, 0.5), what=str(shape))


@pytest.mark.parametrize("make_view", [transposed, strided_slice], ids=["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs(device, strategy, dtype, make_view):
    base = make_tasks(3, (12, 10), dtype, "tie_heavy", seed=6, device=device)
    views = [make_view(t) for t in base]
    kw = merge_kwargs(strategy, 0.4)
    got = lorax_merge.merge(views, WEIGHTS3, strategy, **kw)
    # logical (row-major) order decides tie-breaks and random masks, not memory order
    assert torch.equal(got, lorax_merge.merge(base, WEIGHTS3, strategy, **kw))
    assert_merge_matches(got, _reference(base, WEIGHTS3, strategy, 0.4), what="view")


def test_mixed_layouts_between_tasks(device):
    base = make_tasks(3, (8, 6), torch.float32, "tie_heavy", seed=7, device=device)
    mixed = [base[0], transposed(base[1]), strided_slice(base[2])]
    for strategy in STRATEGIES:
        kw = merge_kwargs(strategy, 0.5)
        assert torch.equal(
            lorax_merge.merge(mixed, WEIGHTS3, strategy, **kw),
            lorax_merge.merge(base, WEIGHTS3, strategy, **kw),
        ), strategy


# --------------------------------------------------------------------------- density


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_density_at_or_above_one_means_no_pruning(device, strategy):
    tasks = make_tasks(3, (16, 16), torch.float32, "normal", seed=8, device=device)
    at_one = lorax_merge.merge(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, 1.0))
    for density in (1.5, 7.0, math.inf):
        got = lorax_merge.merge(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, density))
        assert torch.equal(got, at_one)
    # with nothing pruned and no election, every strategy is the weighted sum
    if strategy not in ELECTING_STRATEGIES:
        assert torch.equal(at_one, lorax_merge.merge(tasks, WEIGHTS3, "linear"))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "linear"])
def test_density_zero_gives_zeros(device, strategy, dtype):
    tasks = make_tasks(3, (10, 10), dtype, "normal", seed=9, device=device)
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, 0.0))
    assert bool((got == 0).all()), "density 0 must give exact zeros (never NaN)"


def test_linear_ignores_density(device):
    tasks = make_tasks(3, (10, 10), torch.float32, "normal", seed=10, device=device)
    expected = lorax_merge.merge(tasks, WEIGHTS3, "linear")
    for density in (0.0, 0.3, 1.0, 2.0):
        assert torch.equal(lorax_merge.merge(tasks, WEIGHTS3, "linear", density=density), expected)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "task_dtype,weights,expected",
    [
        (torch.float32, [1.0, 2.0], torch.float32),
        (torch.bfloat16, [1.0, 2.0], torch.float32),
        (torch.float16, [1.0, 2.0], torch.float32),
        (torch.float64, [1.0, 2.0], torch.float64),
        (torch.bfloat16, torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.bfloat16),
        (torch.float16, torch.tensor([1.0, 2.0], dtype=torch.float16), torch.float16),
        (torch.bfloat16, torch.tensor([1.0, 2.0], dtype=torch.float16), torch.float32),
        (torch.float32, torch.tensor([1.0, 2.0], dtype=torch.float64), torch.float64),
        (torch.bfloat16, torch.tensor([1.0, 2.0], dtype=torch.float32), torch.float32),
        (torch.float16, torch.tensor([1.0, 2.0], dtype=torch.float64), torch.float64),
    ],
    ids=lambda v: str(v) if isinstance(v, torch.dtype) else None,
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_result_dtype_rules(device, strategy, task_dtype, weights, expected):
    tasks = make_tasks(2, (6, 5), task_dtype, "normal", seed=11, device=device)
    got = lorax_merge.merge(tasks, weights, strategy, **merge_kwargs(strategy, 0.5))
    assert got.dtype == expected
    assert_merge_matches(got, _reference(tasks, weights, strategy, 0.5), what=str(expected))


@pytest.mark.parametrize("out_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("task_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_dtype(device, strategy, task_dtype, out_dtype):
    tasks = make_tasks(3, (9, 7), task_dtype, "normal", seed=12, device=device)
    kw = merge_kwargs(strategy, 0.5)
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, out_dtype=out_dtype, **kw)
    assert got.dtype == out_dtype
    ref = _reference(tasks, WEIGHTS3, strategy, 0.5, out_dtype=out_dtype)
    assert_merge_matches(got, ref, what=f"out_dtype={out_dtype}")


@pytest.mark.parametrize("out_dtype", [None, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_buffer_is_written_and_returned(device, strategy, out_dtype):
    tasks = make_tasks(3, (9, 7), torch.float32, "normal", seed=13, device=device)
    kw = merge_kwargs(strategy, 0.5)
    buf = torch.full((9, 7), NAN, dtype=out_dtype or torch.float32, device=device)
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, out=buf, **kw)
    assert got is buf
    ref = _reference(tasks, WEIGHTS3, strategy, 0.5, out_dtype=buf.dtype)
    assert_merge_matches(buf, ref, what="out=")
    expected_plain = lorax_merge.merge(tasks, WEIGHTS3, strategy, out_dtype=buf.dtype, **kw)
    assert torch.equal(buf, expected_plain)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_may_be_one_of_the_tasks(device, strategy):
    """Merging into a task's own memory gives the bits of a merge into a new tensor."""
    tasks = make_tasks(3, (70, 130), torch.float32, "tie_heavy", seed=14, device=device)
    kw = merge_kwargs(strategy, 0.5)
    expected = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, out=tasks[1], **kw)
    assert got is tasks[1]
    assert_same_bits(got, expected, strategy)


def test_fp64_tasks_with_a_list_of_weights_use_float32_weights(device):
    # A sequence of floats is a float32 tensor (as upstream's torch.tensor(weights)):
    # 0.1 is rounded to float32 before it multiplies float64 tasks.
    tasks = [torch.ones(4, dtype=torch.float64, device=device)]
    got = lorax_merge.merge(tasks, [0.1], "linear")
    assert got.dtype == torch.float64
    expected = torch.full((4,), float(torch.tensor(0.1, dtype=torch.float32)), dtype=torch.float64)
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(got.cpu(), reference_merge([t.cpu() for t in tasks], [0.1]))


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "weights",
    [
        [0.5, -1.25, 2.0],
        (0.5, -1.25, 2.0),
        torch.tensor([0.5, -1.25, 2.0]),
        torch.tensor([-3.0, 0.0, -0.5], dtype=torch.float32),
        torch.tensor([0.5, -1.25, 2.0])[::1],
        torch.tensor([0.5, 0.0, -1.25, 0.0, 2.0, 0.0])[::2],
    ],
    ids=["list", "tuple", "tensor", "negative+zero", "view", "strided"],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weight_forms(device, strategy, weights):
    tasks = make_tasks(3, (6, 6), torch.float32, "normal", seed=14, device=device)
    before = snapshot([weights]) if isinstance(weights, torch.Tensor) else None
    got = lorax_merge.merge(tasks, weights, strategy, **merge_kwargs(strategy, 0.5))
    assert_merge_matches(got, _reference(tasks, weights, strategy, 0.5), what="weights")
    if before is not None:
        assert_unmodified(before, [weights])


@pytest.mark.parametrize("weights_device", DEVICES)
def test_weights_tensor_on_any_device(device, weights_device):
    tasks = make_tasks(3, (6, 6), torch.float32, "normal", seed=15, device=device)
    w = torch.tensor(WEIGHTS3, device=weights_device)
    for strategy in STRATEGIES:
        got = lorax_merge.merge(tasks, w, strategy, **merge_kwargs(strategy, 0.5))
        assert got.device == tasks[0].device
        assert_merge_matches(got, _reference(tasks, WEIGHTS3, strategy, 0.5), what=strategy)


def test_negative_weights_flip_the_linear_result_exactly(device):
    tasks = make_tasks(3, (20,), torch.float32, "normal", seed=16, device=device)
    for strategy in STRATEGIES:
        kw = merge_kwargs(strategy, 0.5)
        pos = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
        neg = lorax_merge.merge(tasks, [-w for w in WEIGHTS3], strategy, **kw)
        assert torch.equal(neg, -pos), strategy  # signs are elected on unweighted values


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("strategy", sorted(RANDOM_STRATEGIES))
def test_seed_selects_masks_by_stream(device, strategy):
    tasks = make_tasks(4, (33, 17), torch.float32, "normal", seed=17, device=device)
    weights = [1.0, -0.5, 0.75, 2.0]
    for seed in (0, 1, 2**31 + 5, 2**63 - 1):
        got = lorax_merge.merge(tasks, weights, strategy, density=0.4, seed=seed)
        masks = dare_masks(tasks, 0.4, seed)
        ref = reference_merge_detailed(tasks, weights, strategy, 0.4, "total", masks)
        assert_merge_matches(got, ref, what=f"seed {seed}")
        again = lorax_merge.merge(tasks, weights, strategy, density=0.4, seed=seed)
        assert torch.equal(got, again)


@pytest.mark.parametrize("strategy", sorted(RANDOM_STRATEGIES))
def test_different_seeds_give_different_merges(device, strategy):
    tasks = make_tasks(3, (64, 64), torch.float32, "normal", seed=18, device=device)
    a = lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5, seed=1)
    b = lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5, seed=2)
    assert float((a != b).float().mean()) > 0.3


def test_tasks_use_distinct_streams(device):
    # three identical tasks: with one stream per task their masks differ, so the
    # DARE result is not 3 * the single-task result
    t = normal((64, 64), torch.float32, seed=19).to(device)
    one = lorax_merge.merge([t], [1.0], "dare_linear", density=0.5, seed=3)
    three = lorax_merge.merge([t, t, t], [1.0, 1.0, 1.0], "dare_linear", density=0.5, seed=3)
    assert not torch.equal(three, 3 * one)
    masks = dare_masks([t, t, t], 0.5, 3)
    assert torch.equal(one != 0, masks[0] & (t != 0))


@pytest.mark.parametrize("strategy", sorted(RANDOM_STRATEGIES))
def test_seed_none_follows_torch_manual_seed(device, strategy):
    tasks = make_tasks(3, (64, 64), torch.float32, "normal", seed=20, device=device)
    torch.manual_seed(5)
    a = lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5)
    torch.manual_seed(5)
    b = lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5)
    c = lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_and_inf(device, strategy, density, dtype):
    tasks = make_tasks(3, (10, 10), dtype, "normal", seed=21)
    specials = [(0, 3, NAN), (0, 50, INF), (1, 50, -INF), (1, 7, NAN), (2, 7, INF), (2, 99, -INF)]
    specials += [(0, 61, INF), (1, 61, INF), (2, 62, -INF)]
    for task, index, value in specials:
        tasks[task].view(-1)[index] = value
    tasks = [t.to(device) for t in tasks]
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, density))
    ref = _reference(tasks, WEIGHTS3, strategy, density)
    assert_merge_matches(got, ref, what="nan/inf")
    all_finite = torch.stack([torch.isfinite(t.cpu()) for t in tasks]).all(0)
    assert bool(torch.isfinite(got.cpu()[all_finite]).all())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_weight_propagates(device, strategy):
    tasks = make_tasks(2, (5, 5), torch.float32, "normal", seed=22, device=device)
    got = lorax_merge.merge(tasks, [1.0, NAN], strategy, **merge_kwargs(strategy, 0.6))
    assert_merge_matches(got, _reference(tasks, [1.0, NAN], strategy, 0.6), what="nan weight")


# --------------------------------------------------------------------------- strategy classes


def test_registry_keys():
    assert set(strategies.strategy_registry) == {
        "linear",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
    }
    expected = {
        "linear": strategies.LinearMerge,
        "ties": strategies.TiesMerge,
        "dare_linear": strategies.DareLinearMerge,
        "dare_ties": strategies.DareTiesMerge,
        "magnitude_prune": strategies.MagnitudePruneMerge,
    }
    for name, cls in expected.items():
        assert strategies.strategy_registry[name] is cls
        assert issubclass(cls, strategies.MergeStrategy)


def test_merge_strategy_is_abstract():
    with pytest.raises(TypeError):
        strategies.MergeStrategy()


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_objects_match_merge(device, strategy, method):
    # built the way the server builds them: density= and majority_sign_method=
    # for every strategy, plus an option the strategy does not know
    tasks = make_tasks(3, (12, 12), torch.bfloat16, "tie_heavy", seed=23, device=device)
    weights = torch.tensor(WEIGHTS3)
    config = {"density": 0.4, "majority_sign_method": method, "unknown_option": object()}
    if strategy in RANDOM_STRATEGIES:
        config["seed"] = 11
    obj = strategies.strategy_registry[strategy](**config)
    before = snapshot([*tasks, weights])
    got = obj.merge(tasks, weights)
    expected = lorax_merge.merge(
        tasks, weights, strategy, **merge_kwargs(strategy, 0.4, method, seed=11)
    )
    assert torch.equal(got, expected)
    assert_merge_matches(got, _reference(tasks, WEIGHTS3, strategy, 0.4, method, seed=11))
    assert_unmodified(before, [*tasks, weights])
    assert torch.equal(obj.merge(tasks, weights), got)  # reusable, same seed every call


def test_strategy_constructor_defaults(device):
    # total and frequency elect different signs on this data: the default must be total
    tasks = [
        torch.tensor([3.0, -1.0, 1.0], device=device),
        torch.tensor([-1.0, -1.0, 1.0], device=device),
        torch.tensor([-1.0, 4.0, -3.0], device=device),
    ]
    weights = torch.tensor([1.0, 1.0, 1.0])
    for cls, name in ((strategies.TiesMerge, "ties"), (strategies.DareTiesMerge, "dare_ties")):
        total = lorax_merge.merge(tasks, weights, name, density=1.0, majority_sign_method="total")
        freq = lorax_merge.merge(
            tasks, weights, name, density=1.0, majority_sign_method="frequency"
        )
        assert not torch.equal(total, freq)
        assert torch.equal(cls(1.0).merge(tasks, weights), total)
        assert torch.equal(cls(density=1.0, foo="bar").merge(tasks, weights), total)
    linear = lorax_merge.merge(tasks, weights, "linear")
    assert torch.equal(strategies.LinearMerge().merge(tasks, weights), linear)
    assert torch.equal(
        strategies.MagnitudePruneMerge(1.0, whatever=1).merge(tasks, weights), linear
    )
    assert torch.equal(strategies.DareLinearMerge(1.0).merge(tasks, weights), linear)


def test_dare_objects_without_seed_follow_torch_manual_seed(device):
    tasks = make_tasks(3, (32, 32), torch.float32, "normal", seed=24, device=device)
    obj = strategies.DareLinearMerge(0.5)
    torch.manual_seed(9)
    a = obj.merge(tasks, torch.tensor(WEIGHTS3))
    torch.manual_seed(9)
    b = obj.merge(tasks, torch.tensor(WEIGHTS3))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- merge_many


def test_merge_many_matches_single_merges(device):
    groups = [
        make_tasks(3, (5, 7), torch.float32, "normal", seed=25, device=device),
        make_tasks(3, (4,), torch.bfloat16, "tie_heavy", seed=26, device=device),
        make_tasks(3, (2, 3, 2), torch.float64, "normal", seed=27, device=device),
    ]
    for strategy in STRATEGIES:
        seeds = [5, 6, 7]
        kw = {"density": 0.5, "majority_sign_method": "frequency"}
        got = lorax_merge.merge_many(groups, WEIGHTS3, strategy=strategy, seed=seeds, **kw)
        assert len(got) == len(groups)
        for g, (tasks, out) in enumerate(zip(groups, got)):
            expected = lorax_merge.merge(tasks, WEIGHTS3, strategy, seed=seeds[g], **kw)
            assert torch.equal(out, expected), (strategy, g)


def test_merge_many_per_group_weights_and_derived_seeds(device):
    groups = [
        make_tasks(2, (6, 6), torch.float32, "normal", seed=28, device=device),
        make_tasks(3, (6, 6), torch.float32, "normal", seed=29, device=device),
    ]
    weights = [[1.0, -2.0], [0.5, 0.5, 0.25]]
    for strategy in STRATEGIES:
        got = lorax_merge.merge_many(groups, weights, strategy=strategy, density=0.5, seed=123)
        for g, (tasks, out) in enumerate(zip(groups, got)):
            seed = lorax_merge.derive_group_seed(123, g)
            expected = lorax_merge.merge(tasks, weights[g], strategy, density=0.5, seed=seed)
            assert torch.equal(out, expected), (strategy, g)
    assert lorax_merge.derive_group_seed(123, 0) != lorax_merge.derive_group_seed(123, 1)


# --------------------------------------------------------------------------- build info


def test_build_info():
    info = lorax_merge.build_info()
    assert {"version", "torch_version", "cuda_compiled", "cuda_archs", "num_threads"} <= set(info)
    assert info["version"] == lorax_merge.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert all(isinstance(a, str) for a in info["cuda_archs"])
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


# --------------------------------------------------------------------------- larger inputs


@pytest.mark.parametrize("kind", ["normal", "tie_heavy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_many_chunks_match_reference(device, strategy, dtype, kind):
    # large enough that the kernels split the work over threads and chunks
    tasks = make_tasks(3, (512, 601), dtype, kind, seed=30, device=device)
    kw = merge_kwargs(strategy, 0.37)
    got = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
    assert_merge_matches(got, _reference(tasks, WEIGHTS3, strategy, 0.37), what="large")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_result_does_not_depend_on_thread_count(strategy):
    tasks = make_tasks(3, (700, 513), torch.bfloat16, "tie_heavy", seed=31)
    kw = merge_kwargs(strategy, 0.41, "frequency")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
        torch.set_num_threads(max(threads, 2))
        multi = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.view(torch.int32), multi.view(torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapter_sized_tensors_match_reference(device, strategy, dtype):
    tasks = make_tasks(4, (2048, 2048), dtype, "normal", seed=32, device=device)
    weights = [0.4, -0.3, 0.2, 0.7]
    kw = merge_kwargs(strategy, 0.5)
    got = lorax_merge.merge(tasks, weights, strategy, **kw)
    assert_merge_matches(got, _reference(tasks, weights, strategy, 0.5), what="2048x2048")
