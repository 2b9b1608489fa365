"""Tasks of different floating dtypes: merged in their common dtype, as ``torch.stack`` gives it.

Each merge of mixed tasks is the merge of the tasks converted to ``torch.promote_types`` over all
of them, bit for bit, through ``merge``, ``merge(out=...)``, ``merge_many``, the strategy classes
and ``merge_adapters``; and it matches the reference within its rounding bound.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import RANDOM_STRATEGIES, STRATEGIES, dare_masks, merge_kwargs, normal
from reference import assert_merge_matches, reference_merge_detailed

import lorax_merge
from lorax_merge import adapters as A
from lorax_merge.strategies import strategy_registry

MIXES = {
    "float32+bfloat16": (torch.float32, torch.bfloat16, torch.bfloat16),
    "float16+bfloat16": (torch.float16, torch.bfloat16, torch.float16),
    "all four": (torch.float16, torch.float64, torch.bfloat16, torch.float32),
}
WEIGHTS = [0.5, -1.25, 2.0, 0.75]
DENSITY = 0.4


def common_dtype(dtypes) -> torch.dtype:
    return functools.reduce(torch.promote_types, dtypes)


def mixed_tasks(mix: str, device: str, shape=(33, 17)) -> list[torch.Tensor]:
    return [normal(shape, d, seed=i).to(device) for i, d in enumerate(MIXES[mix])]


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().cpu().contiguous().reshape(-1).view(view)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_tasks_merge_as_their_conversion_to_the_common_dtype(device, strategy, mix):
    tasks = mixed_tasks(mix, device)
    common = common_dtype(MIXES[mix])
    converted = [t.to(common) for t in tasks]
    weights = WEIGHTS[: len(tasks)]
    kw = merge_kwargs(strategy, DENSITY)
    got = lorax_merge.merge(tasks, weights, strategy, **kw)
    assert got.dtype == torch.promote_types(common, torch.float32)
    assert_same(got, lorax_merge.merge(converted, weights, strategy, **kw))
    masks = dare_masks(converted, DENSITY, 7) if strategy in RANDOM_STRATEGIES else None
    ref = reference_merge_detailed(tasks, weights, strategy, DENSITY, "total", masks)
    assert_merge_matches(got, ref, what=f"{strategy} {mix}")

    out = torch.empty(tasks[0].shape, dtype=torch.bfloat16, device=device)
    lorax_merge.merge(tasks, weights, strategy, out=out, **kw)
    assert_same(out, lorax_merge.merge(converted, weights, strategy, out_dtype=out.dtype, **kw))

    strategy_object = strategy_registry[strategy](
        density=DENSITY, majority_sign_method="total", seed=7
    )
    assert_same(strategy_object.merge(tasks, torch.tensor(weights)), got)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_many_takes_groups_of_mixed_and_of_single_dtypes(device, strategy):
    mixed = mixed_tasks("float32+bfloat16", device)
    halves = mixed_tasks("float16+bfloat16", device, shape=(5, 7))
    single = [normal((4, 4), torch.bfloat16, seed=9 + i).to(device) for i in range(3)]
    groups = [mixed, halves, single]
    weights = WEIGHTS[:3]
    params = {"density": DENSITY, "majority_sign_method": "total"}
    got = lorax_merge.merge_many(groups, weights, strategy=strategy, seed=[7, 8, 9], **params)
    for group, seed, result in zip(groups, [7, 8, 9], got):
        assert_same(result, lorax_merge.merge(group, weights, strategy, seed=seed, **params))
    assert [r.dtype for r in got] == [torch.float32] * 3


def test_merge_adapters_input_dtype_is_the_common_dtype_of_each_tensor_name():
    a = {"x": normal((6, 4), torch.float16, seed=1), "y": normal((3,), torch.bfloat16, seed=2)}
    b = {"x": normal((6, 4), torch.bfloat16, seed=3), "y": normal((3,), torch.bfloat16, seed=4)}
    merged = A.merge_adapters([a, b], [1.0, -0.5], strategy="ties", density=0.5, out_dtype="input")
    assert merged["x"].dtype == torch.float32 and merged["y"].dtype == torch.bfloat16
    expected = lorax_merge.merge([a["x"], b["x"]], [1.0, -0.5], "ties", density=0.5)
    assert_same(merged["x"], expected)
