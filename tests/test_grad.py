"""Gradients: every op differentiates like the upstream expressions, with the masks constant.

* ``gradcheck`` in float64 on tie-free inputs (the masks are locally constant there);
* the gradients equal those of the eager upstream expression (``grad_reference.py``) with our
  masks, in every dtype: task gradients bit for bit, weight gradients up to the order of one sum;
  NaN and Inf as the expression gives them;
* the same bits from two backward passes and for any thread count;
* ``opcheck`` with its autograd-registration test for every op;
* clear refusals where no gradient is defined.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU_CAPABILITIES, DEVICES
from grad_reference import reference_gradients, weight_gradient_tolerance
from helpers import (
    ALL_DTYPES,
    CANONICAL_NAN_BITS,
    ELECTING_STRATEGIES,
    RANDOM_STRATEGIES,
    STRATEGIES,
    assert_same_bits,
    bits,
    make_tasks,
    merge_kwargs,
    tie_free,
    unsigned_bits,
)
from reference import magnitude_keep_mask
from torch.autograd import forward_ad

import lorax_merge
from lorax_merge import _C, strategy_registry, utils

ops = torch.ops.lorax_merge
SEED = 7


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with every NaN made one pattern (a NaN's sign and payload are not promised)."""
    t = t.detach().cpu().contiguous()
    t = torch.where(torch.isnan(t), torch.full_like(t, math.nan), t)
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.view(view)


def assert_same_bits_any_nan(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same bits, except that any NaN matches any NaN: for comparisons with torch's own
    arithmetic, whose NaNs keep x86's signs and payloads (the kernels write one NaN per dtype,
    which assert_same_bits checks between the kernels' results)."""
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    differ = _bits(got) != _bits(expected)
    if bool(differ.any()):
        i = int(torch.nonzero(differ.reshape(-1))[0])
        g, e = (
            got.detach().cpu().reshape(-1)[i].item(),
            expected.detach().cpu().reshape(-1)[i].item(),
        )
        raise AssertionError(
            f"{what}: {int(differ.sum())} elements differ, first [{i}]: {g!r} != {e!r}"
        )


def assert_close_nan_aware(got, expected, tol, what=""):
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{what}: NaN positions differ"
    inf = torch.isinf(expected)
    assert torch.equal(got[inf], expected[inf]), f"{what}: infinities differ"
    finite = torch.isfinite(expected)
    diff = (got - expected).abs()[finite]
    assert bool((diff <= tol.cpu().double()[finite]).all()), (
        f"{what}: {got} != {expected} (tol {tol})"
    )


def _merge_grads(tasks, weights, grad_out, strategy, density, method="total", **kw):
    tasks, w = _leaves(tasks), weights.detach().clone().requires_grad_(True)
    out = lorax_merge.merge(tasks, w, strategy, **merge_kwargs(strategy, density, method), **kw)
    out.backward(grad_out.to(out.dtype))
    return [t.grad for t in tasks], w.grad, out


# ------------------------------------------------------------------------------------- gradcheck
def _tie_free_tasks(n=3, shape=(4, 5), seed=0):
    return [
        tie_free(shape, torch.float64, seed=seed * 10 + i).requires_grad_(True) for i in range(n)
    ]


def _gradcheck_methods(strategy):
    return ["total", "frequency"] if strategy in ELECTING_STRATEGIES else ["total"]


@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize(
    "strategy, method", [(s, m) for s in STRATEGIES for m in _gradcheck_methods(s)]
)
def test_gradcheck_merge(strategy, method, density):
    tasks = _tie_free_tasks()
    w = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64, requires_grad=True)
    kw = merge_kwargs(strategy, density, method, seed=SEED)

    def merged(*args):
        return lorax_merge.merge(list(args[:-1]), args[-1], strategy, **kw)

    assert torch.autograd.gradcheck(merged, (*tasks, w))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_raw_op_and_strategy_classes(strategy):
    """The op called directly (its backward selects the thresholds again) and the classes."""
    tasks = _tie_free_tasks(seed=1)
    w = torch.tensor([0.5, 1.5, -0.75], dtype=torch.float64, requires_grad=True)
    strategy_obj = strategy_registry[strategy](density=0.4, seed=SEED)
    plan = lorax_merge.strategy_table.STRATEGIES[strategy]
    election = "total" if plan.elects_sign else "none"

    def raw(*args):
        return ops.merge(
            list(args[:-1]),
            args[-1],
            plan.pruning,
            election,
            0.4,
            plan.rescale,
            SEED,
            torch.float64,
        )

    assert torch.autograd.gradcheck(raw, (*tasks, w))
    assert torch.autograd.gradcheck(lambda *a: strategy_obj.merge(list(a[:-1]), a[-1]), (*tasks, w))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_merge_many(strategy):
    groups = [_tie_free_tasks(2, (3, 4), seed=2), _tie_free_tasks(3, (7,), seed=3)]
    shared = torch.tensor([0.9, -0.4], dtype=torch.float64, requires_grad=True)
    per_group = torch.tensor([0.3, 1.1, -0.6], dtype=torch.float64, requires_grad=True)
    kw = merge_kwargs(strategy, 0.5, seed=SEED)

    def merged(a0, a1, b0, b1, b2, w_shared, w_group):
        first = lorax_merge.merge_many([[a0, a1]], w_shared, strategy=strategy, **kw)
        both = lorax_merge.merge_many(
            [[a0, a1], [b0, b1, b2]], [w_shared, w_group], strategy=strategy, **kw
        )
        return first[0], both[0], both[1]

    assert torch.autograd.gradcheck(merged, (*groups[0], *groups[1], shared, per_group))


def test_gradcheck_utils():
    x = tie_free((5, 6), torch.float64, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: utils.prune(t, 0.4, "magnitude"), (x,))
    assert torch.autograd.gradcheck(
        lambda t: utils.prune(t, 0.4, "random", rescale=True, seed=3, stream=2), (x,)
    )
    stacked = torch.stack(_tie_free_tasks(4, (3, 5), seed=5)).detach().requires_grad_(True)
    mask = utils.calculate_majority_sign_mask(stacked.detach())
    assert torch.autograd.gradcheck(lambda s: utils.disjoint_merge(s, mask), (stacked,))
    assert torch.autograd.gradgradcheck(lambda s: utils.disjoint_merge(s, mask), (stacked,))


# ------------------------------------------------------------------------ the eager reference
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradients_equal_the_upstream_expression(device, strategy, dtype, density):
    tasks = make_tasks(3, (9, 14), dtype, "normal", seed=11, device=device)
    weights = torch.tensor([0.8, -1.7, 0.35], device=device)
    grad_out = torch.randn(9, 14, generator=torch.Generator().manual_seed(3)).to(device)
    kw = merge_kwargs(strategy, density, seed=SEED)
    task_grads, w_grad, _ = _merge_grads(tasks, weights, grad_out, strategy, density)
    ref_tasks, ref_w = reference_gradients(
        tasks, weights, grad_out, strategy, density, seed=kw.get("seed")
    )
    for i, (got, ref) in enumerate(zip(task_grads, ref_tasks)):
        assert_same_bits_any_nan(got, ref, f"{strategy} {dtype} task {i}")
    tol = weight_gradient_tolerance(tasks, weights, grad_out, strategy, density, kw.get("seed"))
    assert_close_nan_aware(w_grad, ref_w, tol, f"{strategy} {dtype} weights")


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("strategy", sorted(ELECTING_STRATEGIES))
def test_elected_gradients_with_ties_and_float64_weights(device, strategy, method):
    """Tie-heavy bf16 values (sign sums of zero, equal magnitudes) and float64 weights."""
    tasks = make_tasks(5, (16, 24), torch.bfloat16, "tie_heavy", seed=12, device=device)
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.5], dtype=torch.float64, device=device)
    grad_out = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    task_grads, w_grad, out = _merge_grads(
        tasks, weights, grad_out.to(device), strategy, 0.6, method
    )
    assert out.dtype == torch.float64
    ref_tasks, ref_w = reference_gradients(
        tasks, weights, grad_out.to(device), strategy, 0.6, method, seed=SEED
    )
    for got, ref in zip(task_grads, ref_tasks):
        assert_same_bits_any_nan(got, ref, f"{strategy} {method}")
    tol = weight_gradient_tolerance(tasks, weights, grad_out, strategy, 0.6, SEED)
    assert_close_nan_aware(w_grad, ref_w, tol, f"{strategy} {method} weights")


@pytest.mark.parametrize("strategy", sorted(ELECTING_STRATEGIES))
def test_the_backward_votes_in_the_task_dtype_with_float64_weights(device, strategy):
    """The backward recomputes the forward's vote in the tasks' float32, as the server sums the
    unweighted stack: 1e8 + (-1) + (-1e8) is 0 there (task 0 alone is elected), not -1."""
    tasks = [torch.tensor(v, device=device) for v in ([1e8, 2.0], [-1.0, -3.0], [-1e8, 0.5])]
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=device)
    grad_out = torch.ones(2, dtype=torch.float64, device=device)
    task_grads, w_grad, _ = _merge_grads(tasks, weights, grad_out, strategy, 1.0)
    assert [g.tolist() for g in task_grads] == [[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]
    assert w_grad.tolist() == [1e8, -3.0, 0.0]
    ref_tasks, _ = reference_gradients(tasks, weights, grad_out, strategy, 1.0)
    for i, (got, ref) in enumerate(zip(task_grads, ref_tasks)):
        assert_same_bits_any_nan(got, ref, f"{strategy} task {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_a_dropped_entry_whose_rescaled_gradient_overflows_is_nan(device, dtype):
    """The gradient of (t * mask) / d divides before the mask multiplies: where the rounded
    grad / d overflows, a dropped entry's gradient is Inf * 0 = NaN (the canonical one), in a
    merge and in utils.prune, as autograd of the upstream expression gives."""
    density, big = 0.3, (3e4 if dtype == torch.float16 else 2e38)  # big / density overflows
    x = make_tasks(1, (8, 16), dtype, "normal", seed=31, device=device)[0]
    grad_out = torch.full((8, 16), big, device=device)  # the merge's float32 result
    (task_grad,), _, _ = _merge_grads([x], torch.tensor([1.0]), grad_out, "dare_linear", density)
    (ref,), _ = reference_gradients(
        [x], torch.tensor([1.0]), grad_out, "dare_linear", density, seed=SEED
    )
    assert_same_bits_any_nan(task_grad, ref, "merge")
    y = x.detach().clone().requires_grad_(True)
    g = grad_out.to(dtype)
    utils.prune(y, density, "random", rescale=True, seed=9, stream=4).backward(g)
    mask = (utils.prune(torch.ones_like(y), density, "random", seed=9, stream=4) != 0).cpu()
    assert_same_bits_any_nan(y.grad.cpu(), (g.cpu() / density) * mask.to(dtype), "prune")
    for grad in (task_grad, y.grad):
        assert bool(grad.isnan().any()) and bool(grad.isinf().any()), "drops and keeps"
        nan_bits = set(unsigned_bits(grad[torch.isnan(grad)]))
        assert nan_bits == {CANONICAL_NAN_BITS[dtype]}


@pytest.mark.parametrize("strategy", sorted(RANDOM_STRATEGIES))
def test_dare_at_density_0_has_zero_task_gradients(device, strategy):
    """At density 0 every entry is dropped and none divided: the result is zeros for finite
    inputs, and the task gradients are grad * 0, not the 1 / 0 of a rescale."""
    tasks = make_tasks(2, (5, 7), torch.float32, "normal", seed=33, device=device)
    grad_out = torch.randn(5, 7, generator=torch.Generator().manual_seed(8)).to(device)
    task_grads, w_grad, out = _merge_grads(
        tasks, torch.tensor([1.5, -2.0]), grad_out, strategy, 0.0
    )
    assert not bool(out.any())
    for grad in task_grads:
        assert torch.equal(grad, torch.zeros_like(grad)) and not bool(grad.isnan().any())
    assert torch.equal(w_grad, torch.zeros(2))
    y = tasks[0].detach().clone().requires_grad_(True)
    utils.prune(y, 0.0, "random", rescale=True, seed=9).backward(grad_out)
    assert torch.equal(y.grad, torch.zeros_like(y)) and not bool(y.grad.isnan().any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_density_below_the_op_math_range_divides_by_zero_as_autograd_does(device, dtype):
    """1e-50 is positive as a Python float and 0 in float32: kept entries do not exist, and a
    dropped one gets r(g / 0) * 0 = NaN, zeros included (0 / 0), in utils.prune and a merge."""
    density = 1e-50
    g = torch.tensor([0.0, 1.0, -2.0, 0.0, 3.0], device=device).to(dtype)
    y = torch.zeros(5, dtype=dtype, device=device, requires_grad=True)
    utils.prune(y, density, "random", rescale=True, seed=1).backward(g)
    leaf = torch.zeros(5, dtype=dtype, requires_grad=True)
    mask = (utils.prune(torch.ones(5), density, "random", seed=1) != 0).to(dtype)
    (expected,) = torch.autograd.grad((leaf * mask) / density, leaf, g.cpu())
    assert bool(expected.isnan().all())
    assert_same_bits_any_nan(y.grad.cpu(), expected, "prune")
    (task_grad,), _, _ = _merge_grads(
        [y.detach()], torch.tensor([1.0]), g.float(), "dare_linear", density
    )
    assert bool(task_grad.isnan().all()), "merge"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_and_inf_as_the_upstream_expression(device, strategy, dtype):
    tasks = make_tasks(3, (6, 8), dtype, "normal", seed=13, device=device)
    tasks[0][0, 0], tasks[1][0, 1], tasks[2][2, 3] = math.inf, -math.inf, math.nan
    tasks[1][5, 7] = math.nan
    weights = torch.tensor([0.5, 1.25, -2.0], device=device)
    grad_out = torch.randn(6, 8, generator=torch.Generator().manual_seed(5)).to(device)
    grad_out[3, 3] = math.inf
    task_grads, w_grad, _ = _merge_grads(tasks, weights, grad_out, strategy, 0.5)
    ref_tasks, ref_w = reference_gradients(tasks, weights, grad_out, strategy, 0.5, seed=SEED)
    for i, (got, ref) in enumerate(zip(task_grads, ref_tasks)):
        assert_same_bits_any_nan(got, ref, f"{strategy} task {i}")
    tol = weight_gradient_tolerance(
        tasks, weights, grad_out.nan_to_num(posinf=0.0), strategy, 0.5, SEED
    )
    assert_close_nan_aware(w_grad, ref_w, tol, f"{strategy} weights")
    assert bool(torch.isnan(ref_w).any()), "the case should make a weight gradient NaN"


@pytest.mark.parametrize("weights_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties", "ties"])
def test_nan_gradients_are_the_canonical_nan(device, strategy, weights_dtype):
    """A NaN gradient (here Inf * 0 from a dropped or pruned Inf) has the one NaN pattern of
    its dtype, so that the CPU and the GPU give the same bits (x86 gives a negative NaN)."""
    tasks = make_tasks(3, (40, 33), torch.float32, "normal", seed=16, device=device)
    tasks[1][5, 5], tasks[2][7, 1] = -math.inf, math.nan
    weights = torch.tensor([0.8, -1.7, 0.35], dtype=weights_dtype, device=device)
    grad_out = torch.randn(40, 33, generator=torch.Generator().manual_seed(6)).to(device)
    grad_out[0, 0] = math.inf
    task_grads, w_grad, _ = _merge_grads(tasks, weights, grad_out, strategy, 0.3)
    assert w_grad.dtype == weights_dtype
    for what, grad in [("weights", w_grad)] + [(f"task {i}", g) for i, g in enumerate(task_grads)]:
        nan_bits = set(unsigned_bits(grad[torch.isnan(grad)]))
        assert nan_bits <= {CANONICAL_NAN_BITS[grad.dtype]}, f"{strategy} {what}: {nan_bits}"
    assert bool(torch.isnan(w_grad[1:]).all()), "the case should make weight gradients NaN"


_WEIGHT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _groups_with_opposite_infinite_gradients(device):
    """Six groups of three tasks (of several lengths) and their result gradients, where the
    gradients of groups 1 and 3 are +Inf and -Inf at an entry every strategy keeps and elects:
    each weight's gradient is NaN in their sum."""
    groups, grads = [], []
    for g in range(6):
        tasks = make_tasks(3, (50 + 7 * g,), torch.float32, "normal", seed=40 + g, device=device)
        for t in tasks:
            t[0] = 3.0
        grad = torch.randn(50 + 7 * g, generator=torch.Generator().manual_seed(g)).to(device)
        grad[0] = {1: math.inf, 3: -math.inf}.get(g, grad[0].item())
        groups.append(tasks)
        grads.append(grad)
    return groups, grads


def _backward_of_outputs(outs, grads):
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()  # each output's gradient is g


@pytest.mark.parametrize("weights_dtype", _WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_ties"])
def test_merge_many_shared_weights_sum_the_groups_in_order(device, strategy, weights_dtype):
    """A weight vector shared by every group gets the groups' float64 gradients summed one group
    after another, converted once, with its dtype's one NaN: the same bits on every device."""
    groups, grads = _groups_with_opposite_infinite_gradients(device)
    _check_shared_weight_gradients(groups, grads, weights_dtype, strategy, device)


@pytest.mark.parametrize("weights_dtype", _WEIGHT_DTYPES, ids=str)
def test_merge_many_shared_weights_over_groups_of_several_result_dtypes(device, weights_dtype):
    """Groups whose results differ in dtype are merged in one op call per dtype; the shared
    weights' gradient is still the groups' float64 sum in group order, converted once: the
    +Inf and -Inf of groups 1 and 3 (in different calls) meet in float64, as one NaN."""
    groups, grads = _groups_with_opposite_infinite_gradients(device)
    groups = [
        [t.to(torch.float64) for t in g] if i in (1, 2, 5) else g for i, g in enumerate(groups)
    ]
    _check_shared_weight_gradients(groups, grads, weights_dtype, "ties", device)
    # Finite gradients: one rounding to the weights' dtype, not one per call.
    gen = torch.Generator().manual_seed(21)
    groups = [
        [
            torch.randn(300, generator=gen).to(torch.float32 if i % 2 else torch.bfloat16)
            for _ in "abc"
        ]
        for i in range(4)
    ]
    grads = [torch.randn(300, generator=gen) for _ in groups]
    groups = [[t.to(device) for t in g] for g in groups]
    _check_shared_weight_gradients(
        groups, [g.to(device) for g in grads], weights_dtype, "linear", device
    )


def _check_shared_weight_gradients(groups, grads, weights_dtype, strategy, device):
    weights = torch.tensor([0.8, -1.7, 0.35], dtype=weights_dtype, device=device)
    kw = merge_kwargs(strategy, 0.4, seed=SEED)
    shared = weights.detach().clone().requires_grad_(True)
    outs = lorax_merge.merge_many(groups, shared, strategy=strategy, **kw)
    _backward_of_outputs(outs, grads)
    total = None
    for i, (group, grad) in enumerate(zip(groups, grads)):
        # The group's own merge with the same float64 weights and result dtype.
        w64 = weights.detach().to(torch.float64).requires_grad_(True)
        seed = {"seed": lorax_merge.derive_group_seed(SEED, i)} if "seed" in kw else {}
        other = {k: v for k, v in kw.items() if k != "seed"}
        out = lorax_merge.merge(group, w64, strategy, out_dtype=outs[i].dtype, **other, **seed)
        out.backward(grad.to(out.dtype))
        total = w64.grad if total is None else total + w64.grad
    expected = total.to(weights_dtype)
    as_int = bits(expected).dtype
    expected.view(as_int).masked_fill_(expected.isnan(), CANONICAL_NAN_BITS[weights_dtype])
    if any(bool(g.isinf().any()) for g in grads):
        assert bool(expected.isnan().all()), "the case should make every weight gradient NaN"
    assert_same_bits(shared.grad, expected, f"{strategy} {weights_dtype}")


@pytest.mark.parametrize("weights_dtype", _WEIGHT_DTYPES, ids=str)
def test_merge_many_per_group_weights_get_their_groups_gradients(device, weights_dtype):
    groups, grads = _groups_with_opposite_infinite_gradients(device)
    groups[2][2][5] = math.nan  # the gradient of group 2's third weight is NaN
    base = torch.tensor([0.8, -1.7, 0.35], dtype=weights_dtype, device=device)
    per_group = [(base * (i + 1)).requires_grad_(True) for i in range(len(groups))]
    outs = lorax_merge.merge_many(groups, per_group, strategy="ties", density=0.4)
    _backward_of_outputs(outs, grads)
    for i, (group, grad, w) in enumerate(zip(groups, grads, per_group)):
        alone = w.detach().clone().requires_grad_(True)
        lorax_merge.merge(group, alone, "ties", density=0.4).backward(grad)
        assert_same_bits(w.grad, alone.grad, f"group {i}")
        nan_bits = set(unsigned_bits(w.grad[torch.isnan(w.grad)]))
        assert nan_bits <= {CANONICAL_NAN_BITS[weights_dtype]}, f"group {i}: {nan_bits}"
    assert bool(per_group[2].grad[2].isnan()), "the case should make a weight gradient NaN"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_the_weights_or_only_the_tasks(strategy):
    tasks = make_tasks(3, (20, 30), torch.float32, "normal", seed=14)
    weights = torch.tensor([0.3, 0.9, -0.2])
    grad_out = torch.randn(20, 30)
    all_tasks, all_w, _ = _merge_grads(tasks, weights, grad_out, strategy, 0.5)
    w = weights.clone().requires_grad_(True)
    lorax_merge.merge(tasks, w, strategy, **merge_kwargs(strategy, 0.5)).backward(grad_out)
    assert_same_bits(w.grad, all_w)
    leaves = _leaves(tasks)
    lorax_merge.merge(
        [leaves[0], tasks[1], leaves[2]], weights, strategy, **merge_kwargs(strategy, 0.5)
    ).backward(grad_out)
    assert tasks[1].grad is None
    assert_same_bits(leaves[0].grad, all_tasks[0])
    assert_same_bits(leaves[2].grad, all_tasks[2])


def test_weights_on_another_device_and_dtype():
    tasks = _leaves(make_tasks(2, (5, 5), torch.float16, seed=15))
    w = torch.tensor([0.5, -0.25], dtype=torch.bfloat16, requires_grad=True)
    out = lorax_merge.merge(tasks, w, "ties", density=0.6)
    out.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and tasks[0].grad.dtype == torch.float16


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_many_gradients_equal_per_group_merges(strategy):
    groups = [
        make_tasks(2, (40, 8), torch.float32, seed=16),
        make_tasks(3, (333,), torch.bfloat16, seed=17),
    ]
    w = [torch.tensor([0.4, 1.2]), torch.tensor([0.7, -0.1, 0.5])]
    kw = merge_kwargs(strategy, 0.5)
    many_groups = [_leaves(g) for g in groups]
    many_w = [x.clone().requires_grad_(True) for x in w]
    outs = lorax_merge.merge_many(
        many_groups,
        many_w,
        strategy=strategy,
        out_dtype=torch.float32,
        seed=[SEED, SEED + 1] if "seed" in kw else None,
        density=kw["density"],
    )
    (outs[0].sum() * 2 + outs[1].square().sum()).backward()
    for g, (group, weights) in enumerate(zip(groups, w)):
        leaves, wl = _leaves(group), weights.clone().requires_grad_(True)
        extra = {"seed": SEED + g} if "seed" in kw else {}
        out = lorax_merge.merge(
            leaves, wl, strategy, density=kw["density"], out_dtype=torch.float32, **extra
        )
        (out.sum() * 2 if g == 0 else out.square().sum()).backward()
        for a, b in zip(many_groups[g], leaves):
            assert_same_bits(a.grad, b.grad, f"group {g}")
        assert_same_bits(many_w[g].grad, wl.grad, f"group {g} weights")


def test_prune_gradients_are_the_masked_gradient():
    x = make_tasks(1, (50, 40), torch.bfloat16, "tie_heavy", seed=18)[0].requires_grad_(True)
    g = torch.randn(50, 40).to(torch.bfloat16)
    utils.prune(x, 0.3, "magnitude").backward(g)
    keep = magnitude_keep_mask(x.detach(), 0.3)
    assert_same_bits_any_nan(x.grad, g * keep.to(g.dtype))
    y = x.detach().clone().requires_grad_(True)
    utils.prune(y, 0.3, "random", rescale=True, seed=9, stream=4).backward(g)
    mask = utils.prune(torch.ones_like(y), 0.3, "random", seed=9, stream=4) != 0
    assert_same_bits_any_nan(y.grad, (g / 0.3) * mask.to(g.dtype))


# ---------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("strategy", ["ties", "dare_ties", "linear"])
def test_bit_identical_across_backwards_and_thread_counts(strategy):
    """Several blocks per thread: the weight sums must not depend on how they are split."""
    tasks = make_tasks(3, (700, 513), torch.float32, seed=19)
    weights = torch.tensor([0.6, -1.1, 0.3])
    grad_out = torch.randn(700, 513, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 2):
            torch.set_num_threads(count)
            task_grads, w_grad, _ = _merge_grads(tasks, weights, grad_out, strategy, 0.5)
            results.append((task_grads, w_grad))
    finally:
        torch.set_num_threads(threads)
    for task_grads, w_grad in results[1:]:
        assert_same_bits(w_grad, results[0][1], f"{strategy} weights")
        for got, first in zip(task_grads, results[0][0]):
            assert_same_bits(got, first, f"{strategy} tasks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_cpu_level_gives_the_same_bits(strategy, dtype):
    """The gradient kernels of every CPU capability level this machine runs agree bit for bit
    (vector bodies, tails and 16-bit conversions), NaN and Inf included."""
    tasks = make_tasks(3, (37, 129), dtype, seed=26)
    tasks[0][1, 2], tasks[2][30, 100] = math.inf, math.nan
    weights = torch.tensor([0.7, -0.2, 1.3])
    grad_out = torch.randn(37, 129, generator=torch.Generator().manual_seed(9))
    previous = _C.cpu_capability()
    results = {}
    try:
        for level in CPU_CAPABILITIES:
            _C._set_cpu_capability(level)
            results[level] = _merge_grads(tasks, weights, grad_out, strategy, 0.3)[:2]
    finally:
        _C._set_cpu_capability(previous)
    first_tasks, first_w = results[CPU_CAPABILITIES[0]]
    for level, (task_grads, w_grad) in results.items():
        assert_same_bits(w_grad, first_w, f"{strategy} weights at {level}")
        for got, expected in zip(task_grads, first_tasks):
            assert_same_bits(got, expected, f"{strategy} tasks at {level}")


def test_weight_gradient_is_accurate_on_a_large_tensor():
    """The tree sum stays close to an exact (float64) sum over 2M terms."""
    tasks = make_tasks(2, (2_000_003,), torch.float32, seed=20)
    grad_out = torch.randn(2_000_003, generator=torch.Generator().manual_seed(7))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    lorax_merge.merge(tasks, w, "linear").backward(grad_out)
    exact = torch.stack([(grad_out.double() * t.double()).sum() for t in tasks])
    bound = torch.stack([(grad_out.double() * t.double()).abs().sum() for t in tasks])
    assert bool(((w.grad.double() - exact).abs() <= 1e-6 * bound).all())


# --------------------------------------------------------------------------- registrations
def _op_samples():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=True):
        return torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad)

    tasks = [rand(6, 7) for _ in range(3)]
    w = torch.tensor([1.0, -0.5, 0.25], requires_grad=True)
    thresholds = ops.magnitude_thresholds([t.detach() for t in tasks], 0.5)
    grads = [torch.randn(6, 7, generator=gen)]
    stacked = rand(3, 6, 7)
    mask = stacked.detach() > 0
    return {
        "merge": (tasks, w, "magnitude", "total", 0.5, False, 0, torch.float32),
        "merge_with_thresholds": (
            tasks,
            w,
            "magnitude",
            "frequency",
            0.5,
            False,
            0,
            5,
            thresholds,
            torch.float32,
        ),
        "merge_many": (
            tasks + [rand(4, dtype=torch.bfloat16)],
            [3, 1],
            torch.tensor([1.0, 0.5, 2.0, -1.0], dtype=torch.float64, requires_grad=True),
            "random",
            "total",
            0.4,
            True,
            [7, 8],
            torch.float32,
        ),
        "magnitude_prune": (tasks[0], 0.3),
        "random_prune": (tasks[0], 0.3, True, 11, 2),
        "majority_sign_mask": (stacked, "frequency"),
        "disjoint_merge": (stacked, mask),
        "magnitude_thresholds": (tasks, 0.3),
        "merge_backward": (
            grads,
            tasks,
            [3],
            w,
            "magnitude",
            "total",
            0.5,
            False,
            [0],
            0,
            thresholds,
            True,
            True,
        ),
        "disjoint_merge_backward": (rand(6, 7), mask, torch.float32),
    }


#: the ops whose backward is not differentiable (a double backward refuses)
_ONCE_DIFFERENTIABLE = {"merge_backward"}


@pytest.mark.parametrize("name", sorted(_op_samples()))
def test_opcheck_with_autograd_registration(name):
    sample = _op_samples()[name]
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if name not in _ONCE_DIFFERENTIABLE:
        tests.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(ops, name).default, sample, test_utils=tests)


def test_merge_out_refuses_inputs_that_require_grad():
    tasks = _leaves(make_tasks(2, (4, 4), torch.float32, seed=21))
    out = torch.empty(4, 4)
    with pytest.raises(RuntimeError, match="does not support automatic differentiation"):
        lorax_merge.merge(tasks, [1.0, 2.0], "linear", out=out)
    with pytest.raises(RuntimeError, match="does not support automatic differentiation"):
        ops.merge_out(
            [t.detach() for t in tasks],
            torch.ones(2, requires_grad=True),
            "none",
            "none",
            1.0,
            False,
            0,
            out,
        )
    with pytest.raises(RuntimeError, match="does not support automatic differentiation"):
        ops.merge_slice_out(tasks, torch.ones(2), "none", "none", 1.0, False, 0, 0, None, out)
    lora_a, lora_b = torch.randn(2, 4, requires_grad=True), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="does not support automatic differentiation"):
        ops.lora_delta_out(lora_a, lora_b, 0.5, 0, out)
    with torch.no_grad():
        assert lorax_merge.merge(tasks, [1.0, 2.0], "linear", out=out) is out
    assert torch.equal(out, tasks[0].detach() + 2 * tasks[1].detach())
    torch.library.opcheck(
        ops.merge_out.default,
        ([t.detach() for t in tasks], torch.ones(2), "none", "none", 1.0, False, 0, out),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_masks_and_thresholds_carry_no_gradient():
    stacked = torch.randn(3, 5, requires_grad=True)
    mask = utils.calculate_majority_sign_mask(stacked)
    assert mask.dtype == torch.bool and not mask.requires_grad
    thresholds = ops.magnitude_thresholds(list(stacked.unbind(0)), 0.5)
    assert thresholds.dtype == torch.int64 and not thresholds.requires_grad


def test_second_derivative_of_a_merge_refuses_clearly():
    tasks = _leaves(make_tasks(2, (4, 4), torch.float64, seed=22))
    w = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    out = lorax_merge.merge(tasks, w, "ties", density=0.5)
    (gw,) = torch.autograd.grad(out.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        gw.sum().backward()


def test_forward_mode_and_torch_func_transforms_are_refused():
    """The ops have reverse-mode derivatives only: a tangent must not be dropped silently (a
    zero Jacobian), and the transforms get a message that says why."""
    tasks = make_tasks(3, (4, 5), torch.float32, seed=25)
    w = torch.tensor([0.5, 1.0, -1.0])

    def loss(weights):
        return lorax_merge.merge(tasks, weights, "linear").sum()

    for transform in (torch.func.jacfwd, torch.func.jacrev, torch.func.grad):
        with pytest.raises(NotImplementedError, match=r"torch\.func transforms"):
            transform(loss)(w)
    with pytest.raises(NotImplementedError, match=r"torch\.func transforms"):
        torch.func.vmap(lambda t: utils.prune(t, 0.5, "magnitude"))(torch.randn(2, 6))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(w, torch.ones(3))
        for call in (
            lambda: lorax_merge.merge(tasks, dual, "ties", density=0.5),
            lambda: lorax_merge.merge_many([tasks, tasks], dual, strategy="linear"),
            lambda: utils.prune(forward_ad.make_dual(tasks[0], tasks[1]), 0.5, "random", seed=1),
        ):
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                call()
        # Inputs without a tangent merge as usual inside a dual level.
        assert torch.equal(lorax_merge.merge(tasks, w), lorax_merge.merge(tasks, w.clone()))


def test_torch_compile_traces_forward_and_backward():
    tasks = make_tasks(3, (16, 32), torch.float32, seed=23)
    w = torch.tensor([1.0, -0.5, 0.75])

    def loss(a, b, c, weights):
        ties = lorax_merge.merge([a, b, c], weights, "ties", density=0.5)
        dare = lorax_merge.merge([a, b, c], weights, "dare_linear", density=0.5, seed=5)
        return (ties * dare).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_in = _leaves(tasks) + [w.clone().requires_grad_(True)]
    compiled_in = _leaves(tasks) + [w.clone().requires_grad_(True)]
    loss(*eager_in).backward()
    compiled(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        assert_same_bits(b.grad, a.grad)


@pytest.mark.parametrize("dev", DEVICES)
def test_density_zero_and_empty_tensors(dev):
    tasks = _leaves(make_tasks(2, (0, 3), torch.float32, seed=24, device=dev))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    lorax_merge.merge(tasks, w, "ties", density=0.5).sum().backward()
    assert tasks[0].grad.shape == (0, 3) and torch.equal(w.grad, torch.zeros(2))


def test_random_strategies_need_no_mask_memory():
    """The DARE backward recomputes its masks: RANDOM_STRATEGIES' gradients equal the masked
    expression for a seed the forward drew itself."""
    torch.manual_seed(5)
    tasks = make_tasks(2, (30, 30), torch.float32, seed=25)
    for strategy in sorted(RANDOM_STRATEGIES):
        torch.manual_seed(99)
        seed = lorax_merge.draw_seed()
        torch.manual_seed(99)
        leaves = _leaves(tasks)
        lorax_merge.merge(leaves, [1.0, 0.5], strategy, density=0.5).sum().backward()
        ref, _ = reference_gradients(
            tasks, torch.tensor([1.0, 0.5]), torch.ones(30, 30), strategy, 0.5, seed=seed
        )
        for got, expected in zip(leaves, ref):
            assert_same_bits_any_nan(got.grad, expected, strategy)


# --------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def _grads_on(device, tasks, weights, grad_out, strategy, density, weights_device=None, **kw):
    tasks = _leaves([t.to(device) for t in tasks])
    # A copy of its own on every device: weights.to("cpu") would be `weights` itself, and a
    # later run's gradient would land in this one's.
    w = weights.detach().to(weights_device or device, copy=True).requires_grad_(True)
    out = lorax_merge.merge(tasks, w, strategy, **merge_kwargs(strategy, density), **kw)
    out.backward(grad_out.to(device).to(out.dtype))
    return [t.grad for t in tasks], w.grad


@needs_cuda
@pytest.mark.parametrize("weights_on", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_gradients_equal_cpu(strategy, dtype, weights_on):
    """Same bits on both devices, weight gradients included (one summation tree)."""
    tasks = make_tasks(3, (301, 77), dtype, "normal", seed=30)
    tasks[1][5, 5] = math.inf
    weights = torch.tensor([0.8, -1.7, 0.35])
    grad_out = torch.randn(301, 77, generator=torch.Generator().manual_seed(8))
    cpu_tasks, cpu_w = _grads_on("cpu", tasks, weights, grad_out, strategy, 0.3)
    gpu_tasks, gpu_w = _grads_on("cuda", tasks, weights, grad_out, strategy, 0.3, weights_on)
    assert gpu_w.device.type == weights_on
    assert_same_bits(gpu_w, cpu_w, f"{strategy} weights")
    for got, expected in zip(gpu_tasks, cpu_tasks):
        assert_same_bits(got, expected, f"{strategy} tasks")


@needs_cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_merge_many_and_slices_equal_cpu(strategy):
    groups = [
        make_tasks(2, (4099,), torch.bfloat16, seed=31),
        make_tasks(3, (70, 90), torch.float32, seed=32),
    ]
    w = torch.tensor([0.4, 1.2, 0.7, -0.1, 0.5], dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [_leaves([t.to(device) for t in g]) for g in groups]
        wd = w.detach().to(device, copy=True).requires_grad_(True)  # a leaf on each device
        outs = lorax_merge.merge_many(
            leaves,
            [wd[:2], wd[2:]],
            strategy=strategy,
            density=0.4,
            seed=[5, 6],
            out_dtype=torch.float32,
        )
        (outs[0].sum() + outs[1].square().sum()).backward()
        thresholds = ops.magnitude_thresholds([t.detach().to(device) for t in groups[1]], 0.4)
        sliced = _leaves([t.to(device)[10:30] for t in groups[1]])
        plan = lorax_merge.strategy_table.STRATEGIES[strategy]
        out = ops.merge_with_thresholds(
            sliced,
            wd[2:].detach(),
            plan.pruning,
            "total" if plan.elects_sign else "none",
            0.4,
            plan.rescale,
            6,
            900,
            thresholds,
            torch.float32,
        )
        out.sum().backward()
        results.append([t.grad for g in leaves for t in g] + [wd.grad] + [t.grad for t in sliced])
    for got, expected in zip(results[1], results[0]):
        assert_same_bits(got, expected, strategy)


@needs_cuda
def test_cuda_backward_does_not_synchronise():
    tasks = _leaves(make_tasks(3, (256, 256), torch.float32, seed=33, device="cuda"))
    w = torch.tensor([0.5, 0.3, 0.2], device="cuda", requires_grad=True)
    grad_out = torch.randn(256, 256, device="cuda")
    for strategy in STRATEGIES:
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = lorax_merge.merge(tasks, w, strategy, **merge_kwargs(strategy, 0.5))
            out.backward(grad_out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(w.grad).all()
