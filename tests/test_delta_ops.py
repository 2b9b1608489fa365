"""The ops behind delta-space merging: ``magnitude_thresholds`` and ``merge_slice_out``.

A merge of consecutive slices of the tasks, each given the whole tasks' thresholds and its
flat-index offset, must equal the merge of the whole tasks bit for bit: the same entries kept
at the magnitude threshold (ties cut by flat index), the same DARE draws (at even and odd
offsets), the same elections.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tasks

import lorax_merge

ops = torch.ops.lorax_merge

#: (strategy, pruning, election, rescale) of the fused rule
RULES = [
    ("linear", "none", "none", False),
    ("magnitude_prune", "magnitude", "none", False),
    ("ties", "magnitude", "total", False),
    ("ties", "magnitude", "frequency", False),
    ("dare_linear", "random", "none", True),
    ("dare_ties", "random", "total", True),
]
SEED = 77


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _merge_by_slices(tasks, weights, rule, density, bounds, device):
    _, pruning, election, rescale = rule
    flat = [t.reshape(-1) for t in tasks]
    thresholds = ops.magnitude_thresholds(flat, density) if pruning == "magnitude" else None
    out = torch.empty(flat[0].numel(), dtype=torch.float32, device=device)
    w = torch.tensor(weights)
    for lo, hi in zip(bounds, bounds[1:]):
        ops.merge_slice_out(
            [f[lo:hi] for f in flat],
            w,
            pruning,
            election,
            density,
            rescale,
            SEED,
            lo,
            thresholds,
            out[lo:hi],
        )
    return out


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{r[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["normal", "tie_heavy"])
def test_slices_merge_like_the_whole(device, rule, dtype, kind):
    tasks = make_tasks(3, (37, 29), dtype, kind, seed=3, device=device)
    weights = [0.75, -1.5, 0.5]
    n = tasks[0].numel()
    # odd and even offsets, slices of one element, a slice across the middle
    bounds = [0, 1, 2, 5, 8, 300, 301, 777, n - 1, n]
    for density in (0.0, 0.3, 0.5, 1.0):
        whole = lorax_merge.merge(
            tasks,
            weights,
            rule[0],
            density=density,
            majority_sign_method=rule[2] if rule[2] != "none" else "total",
            seed=SEED,
            out_dtype=torch.float32,
        )
        sliced = _merge_by_slices(tasks, weights, rule, density, bounds, device)
        assert torch.equal(_bits(sliced), _bits(whole.reshape(-1))), (rule, density)


def test_thresholds_are_the_exact_top_k_with_ties_cut_by_index(device):
    tasks = make_tasks(2, (64, 33), torch.bfloat16, "tie_heavy", seed=5, device=device)
    for density in (0.0, 0.25, 0.61, 1.0):
        th = ops.magnitude_thresholds(tasks, density)
        assert th.dtype == torch.int64 and th.shape == (2, 2) and th.device == tasks[0].device
        for t, (key, cut) in zip(tasks, th.cpu().tolist()):
            keys = (t.reshape(-1).cpu().view(torch.int16).to(torch.int64) & 0x7FFF).tolist()
            key &= (1 << 64) - 1  # the op returns the unsigned key's 64 bits
            kept = [k > key or (k == key and i < cut) for i, k in enumerate(keys)]
            assert sum(kept) == int(density * t.numel())
            kept_keys = [k for k, keep in zip(keys, kept) if keep]
            dropped = [(k, i) for i, (k, keep) in enumerate(zip(keys, kept)) if not keep]
            if kept_keys and dropped:
                lowest = min(kept_keys)
                assert lowest >= max(k for k, _ in dropped)
                # at the threshold key, every kept entry precedes every dropped one
                last_kept = max(
                    i for i, (k, keep) in enumerate(zip(keys, kept)) if keep and k == lowest
                )
                assert all(i > last_kept for k, i in dropped if k == lowest)


def test_merge_slice_without_thresholds_selects_from_the_slice():
    tasks = make_tasks(3, (20, 20), torch.float32, "normal", seed=9)
    out = torch.empty(20, 20)
    ops.merge_slice_out(tasks, torch.ones(3), "magnitude", "total", 0.4, False, 0, 0, None, out)
    expected = lorax_merge.merge(tasks, [1.0, 1.0, 1.0], "ties", density=0.4)
    assert torch.equal(_bits(out), _bits(expected))


def _tie_heavy(shape, n, device, seed):
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(seed)
    return [values[torch.randint(5, shape, generator=g)].to(device) for _ in range(n)]


@pytest.mark.parametrize("rule", [r for r in RULES if r[1] == "magnitude"], ids=lambda r: r[2])
def test_a_slice_selecting_its_own_thresholds_cuts_ties_from_its_start(device, rule):
    """Without thresholds the top-k is the slice's own, its tie cut counted from the slice's
    first element whatever index_offset is (the offset places the slice for DARE's words)."""
    _, pruning, election, rescale = rule
    tasks = _tie_heavy((30, 11), 3, device, seed=3)

    def merged(offset, tasks=tasks, election=election):
        out = torch.empty(30, 11, device=device)
        weights = torch.ones(len(tasks))
        ops.merge_slice_out(tasks, weights, pruning, election, 0.4, rescale, 0, offset, None, out)
        return out

    at_zero = merged(0)
    for offset in (8, 1001):
        assert torch.equal(_bits(merged(offset)), _bits(at_zero)), offset
    # exactly int(0.4 * 330) entries of one task are kept, every one nonzero here
    kept = merged(8, tasks[:1], "none")
    assert int(kept.count_nonzero()) == int(0.4 * 330)


def test_the_backward_of_a_slice_selecting_its_own_thresholds():
    tasks = _tie_heavy((30, 11), 3, "cpu", seed=4)
    grad_out = torch.randn(30, 11, generator=torch.Generator().manual_seed(2))
    grads = []
    for offset in (0, 8):
        leaves = [t.clone().requires_grad_(True) for t in tasks]
        w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
        out = ops.merge_with_thresholds(
            leaves, w, "magnitude", "total", 0.4, False, 0, offset, None, torch.float32
        )
        out.backward(grad_out)
        grads.append([t.grad for t in leaves] + [w.grad])
    for at_offset, at_zero in zip(grads[1], grads[0]):
        assert torch.equal(_bits(at_offset), _bits(at_zero))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_threshold_key_above_the_dtypes_nan_key_keeps_the_nans_before_the_cut(device, dtype):
    """A threshold of a wider dtype (here float32's key of 1.0) given to 16-bit tasks compares
    as the NaN key: the NaN entries before the cut are kept and nothing else, in the forward
    and in the gradient, on every device."""
    x = torch.randn(12, generator=torch.Generator().manual_seed(5)).to(dtype)
    x[[2, 5, 9]] = float("nan")
    thresholds = torch.tensor([[0x3F800000, 6]], dtype=torch.int64)
    leaf = x.to(device).requires_grad_(True)
    out = ops.merge_with_thresholds(
        [leaf], torch.ones(1), "magnitude", "none", 0.5, False, 0, 0, thresholds.to(device),
        torch.float32,
    )  # fmt: skip
    out.backward(torch.ones_like(out))
    kept = torch.zeros(12)
    kept[[2, 5]] = 1.0
    assert torch.equal(leaf.grad.float().cpu(), kept)
    assert bool(out.isnan()[[2, 5, 9]].all())  # a dropped NaN is NaN * 0
    assert not bool(out.isnan()[[0, 1, 3, 4, 6, 7, 8, 10, 11]].any())


@pytest.mark.parametrize(
    ("thresholds", "offset", "error", "match"),
    [
        (torch.zeros(3, 2, dtype=torch.int32), 0, TypeError, "int64"),
        (torch.zeros(2, 2, dtype=torch.int64), 0, ValueError, r"shape \[3, 2\]"),
        (torch.zeros(3, 3, dtype=torch.int64), 0, ValueError, r"shape \[3, 2\]"),
        (None, -1, ValueError, "index_offset must be >= 0"),
    ],
)
def test_merge_slice_refuses_bad_thresholds_and_offsets(thresholds, offset, error, match):
    tasks = make_tasks(3, (4, 5), torch.float32, "normal", seed=1)
    out = torch.empty(4, 5)
    with pytest.raises(error, match=match):
        ops.merge_slice_out(
            tasks, torch.ones(3), "magnitude", "total", 0.5, False, 0, offset, thresholds, out
        )


def test_magnitude_thresholds_refuses_bad_input():
    with pytest.raises(ValueError, match="density"):
        ops.magnitude_thresholds([torch.ones(3)], -0.5)
    with pytest.raises(ValueError, match="shape"):
        ops.magnitude_thresholds([torch.ones(3), torch.ones(4)], 0.5)
    with pytest.raises(TypeError, match="float32"):
        ops.magnitude_thresholds([torch.ones(3, dtype=torch.int32)], 0.5)


def test_opcheck_of_the_slice_ops():
    tasks = make_tasks(3, (6, 10), torch.float32, "normal", seed=2)
    thresholds = ops.magnitude_thresholds(tasks, 0.5)
    torch.library.opcheck(
        ops.magnitude_thresholds.default,
        (tasks, 0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    torch.library.opcheck(
        ops.merge_slice_out.default,
        (tasks, torch.tensor([1.0, -0.5, 2.0]), "magnitude", "total", 0.5, False, 0, 60,
         thresholds, torch.empty(6, 10)),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


def test_fake_kernels_give_shapes_on_meta_tensors():
    tasks = [torch.empty(4, 6, dtype=torch.bfloat16, device="meta") for _ in range(3)]
    th = ops.magnitude_thresholds(tasks, 0.5)
    assert th.shape == (3, 2) and th.dtype == torch.int64 and th.device.type == "meta"
    out = torch.empty(4, 6, device="meta")
    ops.merge_slice_out(tasks, torch.ones(3), "magnitude", "total", 0.5, False, 0, 8, th, out)
