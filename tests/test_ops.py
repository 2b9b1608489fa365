"""The compiled ops as torch sees them: schemas, fake (meta) kernels, torch.compile."""

from __future__ import annotations

import pytest
import torch

import lorax_merge

ops = torch.ops.lorax_merge


def _tasks(n: int = 3, shape=(8, 12), dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]


SAMPLES = {
    "merge": lambda: (
        _tasks(),
        torch.tensor([1.0, 0.5, -0.25]),
        "magnitude",
        "total",
        0.5,
        False,
        0,
        torch.float32,
    ),
    "merge_many": lambda: (
        _tasks(2) + _tasks(3, (5,)),
        [2, 3],
        torch.tensor([1.0, 0.5, 1.0, -1.0, 0.25], dtype=torch.float64),
        "random",
        "frequency",
        0.4,
        True,
        [7, 8],
        torch.bfloat16,
    ),
    "magnitude_prune": lambda: (_tasks(1)[0], 0.3),
    "random_prune": lambda: (_tasks(1)[0], 0.3, True, 11, 2),
    "majority_sign_mask": lambda: (torch.stack(_tasks()), "total"),
    "disjoint_merge": lambda: (
        torch.stack(_tasks()),
        torch.stack(_tasks()) > 0,
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    """Schema, fake kernel and dispatch registrations agree with the real kernels."""
    torch.library.opcheck(
        getattr(ops, name).default,
        SAMPLES[name](),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_merge_out_opcheck():
    tasks = _tasks()
    out = torch.empty(8, 12)
    torch.library.opcheck(
        ops.merge_out.default,
        (tasks, torch.tensor([1.0, 1.0, 1.0]), "none", "none", 1.0, False, 0, out),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("strategy", sorted(lorax_merge.strategy_registry))
def test_meta_tensors_give_shape_and_dtype(strategy):
    tasks = [torch.empty(4, 6, dtype=torch.bfloat16, device="meta") for _ in range(3)]
    out = lorax_merge.merge(tasks, [0.5, 0.25, 1.0], strategy, density=0.5, seed=3)
    assert out.device.type == "meta"
    assert out.shape == (4, 6)
    assert out.dtype == torch.float32


def test_torch_compile_traces_the_ops_without_graph_breaks():
    tasks = _tasks(3, (16, 32))
    weights = torch.tensor([1.0, -0.5, 0.75])

    def merged(a, b, c, w):
        ties = ops.merge([a, b, c], w, "magnitude", "total", 0.5, False, 0, torch.float32)
        dare = ops.merge([a, b, c], w, "random", "none", 0.5, True, 5, torch.float32)
        return ties + dare

    compiled = torch.compile(merged, backend="aot_eager", fullgraph=True, dynamic=True)
    expected = merged(*tasks, weights)
    assert torch.equal(compiled(*tasks, weights), expected)
    other = _tasks(3, (9, 7))
    assert torch.equal(compiled(*other, weights), merged(*other, weights))


@pytest.mark.parametrize("strategy", sorted(lorax_merge.strategy_registry))
def test_merge_with_thresholds_of_slices_is_the_whole_merge(strategy):
    """The op's own thresholds give merge's bits; slices at their offsets give the same bits."""
    tasks = _tasks(3, (40, 33))
    weights = torch.tensor([1.0, 0.5, -0.25])
    plan = lorax_merge.strategy_table.STRATEGIES[strategy]
    election = "total" if plan.elects_sign else "none"
    args = (plan.pruning, election, 0.4, plan.rescale, 17)
    whole = ops.merge(tasks, weights, *args, torch.float32)
    thresholds = ops.magnitude_thresholds(tasks, 0.4)
    same = ops.merge_with_thresholds(tasks, weights, *args, 0, thresholds, torch.float32)
    assert torch.equal(same.view(torch.int32), whole.view(torch.int32))
    flat = [t.reshape(-1) for t in tasks]
    pieces = []
    for start, stop in ((0, 7), (7, 500), (500, 1320)):  # odd and even offsets
        piece = [f[start:stop] for f in flat]
        pieces.append(
            ops.merge_with_thresholds(piece, weights, *args, start, thresholds, torch.float32)
        )
    assert torch.equal(torch.cat(pieces).view(torch.int32), whole.reshape(-1).view(torch.int32))
    torch.library.opcheck(
        ops.merge_with_thresholds.default,
        (tasks, weights, *args, 3, thresholds, torch.float32),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
