"""Bad input gives a ValueError/TypeError that names the argument and the value."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import CUDA_AVAILABLE
from helpers import ELECTING_STRATEGIES, STRATEGIES, make_tasks

import lorax_merge
from lorax_merge import strategies, utils

PRUNING = [s for s in STRATEGIES if s != "linear"]
needs_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device visible")


def raises_naming(*words: str):
    """pytest.raises for ValueError/TypeError whose message contains every word."""
    pattern = "(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words)
    return pytest.raises((ValueError, TypeError), match=pattern)


def _tasks(n=3, shape=(4, 5), dtype=torch.float32):
    return make_tasks(n, shape, dtype, "normal", seed=1)


# --------------------------------------------------------------------------- task tensors


@pytest.mark.parametrize("not_a_tensor", [3, None, [1.0, 2.0]], ids=repr)
def test_tasks_that_are_not_tensors(not_a_tensor):
    with raises_naming("task_tensors[1]", "torch.Tensor"):
        lorax_merge.merge([torch.zeros(2), not_a_tensor], [1.0, 1.0])
    with raises_naming("groups[0][1]", "torch.Tensor"):
        lorax_merge.merge_many([[torch.zeros(2), not_a_tensor]], [1.0, 1.0])
    with raises_naming("task_tensors"):
        lorax_merge.merge(torch.zeros(2, 3), [1.0, 1.0])


def test_empty_task_list():
    with raises_naming("task_tensors"):
        lorax_merge.merge([], [], "linear")
    with raises_naming("task_tensors"):
        strategies.LinearMerge().merge([], torch.tensor([]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes_differ(strategy):
    tasks = [torch.zeros(3, 4), torch.zeros(4, 3)]
    # checked by the op, which calls the tasks "tasks"
    with raises_naming("tasks[1]", "4, 3"):
        lorax_merge.merge(tasks, [1.0, 1.0], strategy, density=0.5, seed=0)
    with raises_naming("groups[1][1]", "4, 3"):
        lorax_merge.merge_many([tasks[:1], tasks], [[1.0], [1.0, 1.0]], strategy=strategy)


def test_same_numel_different_rank_is_rejected():
    with raises_naming("tasks[1]", "12"):
        lorax_merge.merge([torch.zeros(3, 4), torch.zeros(12)], [1.0, 1.0])


def test_the_ops_refuse_tasks_of_different_dtypes():
    # merge and merge_many convert narrower tasks to the common dtype first (see
    # test_strategies.py); the ops themselves read one dtype and say which task differs
    tasks = [torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bfloat16)]
    weights = torch.ones(2)
    with raises_naming("tasks[1]", "BFloat16"):
        torch.ops.lorax_merge.merge(tasks, weights, "none", "none", 1.0, False, 0, torch.float32)
    with raises_naming("groups[0][1]", "BFloat16"):
        torch.ops.lorax_merge.merge_many(
            tasks, [2], weights.double(), "none", "none", 1.0, False, [0], torch.float32
        )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_integer_and_bool_tasks(strategy, dtype):
    tasks = [torch.zeros(3, 4, dtype=dtype), torch.zeros(3, 4, dtype=dtype)]
    name = str(dtype).replace("torch.", "")
    with raises_naming("task_tensors[0]", name):
        lorax_merge.merge(tasks, [1.0, 1.0], strategy, density=0.5, seed=0)
    with raises_naming("groups[1][0]", name):
        lorax_merge.merge_many([[torch.zeros(2)], tasks[:1]], [1.0], strategy=strategy, seed=0)


def test_complex_tasks():
    tasks = [torch.zeros(3, dtype=torch.complex64)] * 2
    with raises_naming("task_tensors", "complex64"):
        lorax_merge.merge(tasks, [1.0, 1.0])


@needs_cuda
def test_tasks_on_different_devices():
    tasks = [torch.zeros(3, 4), torch.zeros(3, 4, device="cuda")]
    with raises_naming("tasks[1]", "cuda"):
        lorax_merge.merge(tasks, [1.0, 1.0])


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "weights", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], torch.ones(2), torch.ones(4)]
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_of_wrong_length(strategy, weights):
    n = len(weights)
    with raises_naming("weights", str(n)):
        lorax_merge.merge(_tasks(3), weights, strategy, density=0.5, seed=0)


def test_weights_of_wrong_rank():
    with raises_naming("weights"):
        lorax_merge.merge(_tasks(3), torch.ones(3, 1), "linear")


def test_strategy_object_weights_of_wrong_length():
    with raises_naming("weights", "2"):
        strategies.TiesMerge(0.5).merge(_tasks(3), torch.ones(2))


# --------------------------------------------------------------------------- density


@pytest.mark.parametrize("density,text", [(-0.5, "-0.5"), (-1e-9, "-1e-09"), (math.nan, "nan")])
@pytest.mark.parametrize("strategy", PRUNING)
def test_bad_density_in_merge(strategy, density, text):
    with raises_naming("density", text):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], strategy, density=density, seed=0)


@pytest.mark.parametrize("density,text", [(-0.5, "-0.5"), (math.nan, "nan")])
@pytest.mark.parametrize("strategy", PRUNING)
def test_bad_density_in_strategy_objects(strategy, density, text):
    with raises_naming("density", text):
        cls = strategies.strategy_registry[strategy]
        cls(density=density).merge(_tasks(), torch.ones(3))


@pytest.mark.parametrize("density,text", [(-0.5, "-0.5"), (math.nan, "nan")])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_bad_density_in_prune(method, density, text):
    with raises_naming("density", text):
        utils.prune(torch.ones(10), density, method)


# --------------------------------------------------------------------------- names


def test_unknown_strategy():
    with raises_naming("strategy", "tie"):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], "tie")


@pytest.mark.parametrize("strategy", sorted(ELECTING_STRATEGIES))
def test_unknown_majority_sign_method(strategy):
    with raises_naming("majority_sign_method", "median"):
        lorax_merge.merge(
            _tasks(), [1.0, 1.0, 1.0], strategy, density=0.5, majority_sign_method="median", seed=0
        )
    with raises_naming("majority_sign_method", "median"):
        cls = strategies.strategy_registry[strategy]
        cls(density=0.5, majority_sign_method="median").merge(_tasks(), torch.ones(3))


def test_unknown_prune_method():
    with raises_naming("method", "topk"):
        utils.prune(torch.ones(10), 0.5, "topk")


def test_unknown_sign_mask_method():
    with raises_naming("method", "median"):
        utils.calculate_majority_sign_mask(torch.ones(3, 4), "median")


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_primitives_reject_non_float(dtype):
    name = str(dtype).replace("torch.", "")
    with raises_naming(name):
        utils.prune(torch.ones(10, dtype=dtype), 0.5, "magnitude")
    with raises_naming(name):
        utils.calculate_majority_sign_mask(torch.ones(3, 4, dtype=dtype))


def test_disjoint_merge_mask_shape_mismatch():
    with raises_naming("mask"):
        utils.disjoint_merge(torch.ones(3, 4), torch.ones(3, 5, dtype=torch.bool))


# --------------------------------------------------------------------------- out / out_dtype


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_wrong_shape(strategy):
    out = torch.empty(5, 4)
    with raises_naming("out", "5, 4"):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], strategy, density=0.5, seed=0, out=out)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool], ids=str)
def test_out_of_wrong_dtype(dtype):
    out = torch.empty(4, 5, dtype=dtype)
    with raises_naming("out", str(dtype).replace("torch.", "")):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], out=out)


def test_out_dtype_not_floating():
    with raises_naming("out_dtype", "int64"):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], out_dtype=torch.int64)


def test_out_and_out_dtype_disagree():
    out = torch.empty(4, 5, dtype=torch.float64)
    with raises_naming("out"):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], out=out, out_dtype=torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_overlapping_part_of_a_task(strategy):
    storage = torch.randn(2, 4, 5)
    tasks = [storage[0], storage[1], torch.randn(4, 5)]
    shifted = storage.reshape(-1)[3:23].reshape(4, 5)  # the end of task 0, the start of task 1
    with raises_naming("out", "tasks[0]"):
        lorax_merge.merge(tasks, [1.0, 1.0, 1.0], strategy, density=0.5, seed=0, out=shifted)
    wider = storage.reshape(-1)[:20].view(torch.bfloat16)[:20].reshape(4, 5)  # half of task 0
    with raises_naming("out", "tasks[0]"):
        lorax_merge.merge(tasks, [1.0, 1.0, 1.0], strategy, density=0.5, seed=0, out=wider)


def test_out_sharing_memory_with_the_weights_or_thresholds(device):
    # The GPU kernels read both until the last element of out is written.
    tasks = [torch.randn(3, device=device, dtype=torch.float64) for _ in range(3)]
    weights = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64, device=device)
    with raises_naming("out", "weights"):
        lorax_merge.merge(tasks, weights, "ties", density=0.5, out=weights)
    ops = torch.ops.lorax_merge
    pairs = [torch.randn(2, device=device, dtype=torch.float64) for _ in range(3)]
    thresholds = ops.magnitude_thresholds(pairs, 0.5)
    out = thresholds.view(torch.float64)[0]  # the first task's (key, cut) as two float64s
    with raises_naming("out", "thresholds"):
        ops.merge_slice_out(pairs, weights, "magnitude", "total", 0.5, False, 0, 0, thresholds, out)
    # An out of its own is accepted: the guard does not refuse merely because the tensors meet.
    fresh = torch.empty(2, device=device, dtype=torch.float64)
    ops.merge_slice_out(pairs, weights, "magnitude", "total", 0.5, False, 0, 0, thresholds, fresh)
    expected = lorax_merge.merge(pairs, weights, "ties", density=0.5)
    assert torch.equal(fresh.view(torch.int64), expected.view(torch.int64))


@needs_cuda
def test_out_on_wrong_device():
    out = torch.empty(4, 5, device="cuda")
    with raises_naming("out", "cuda"):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], out=out)


# --------------------------------------------------------------------------- no partial writes


def test_failed_call_leaves_out_untouched():
    out = torch.full((4, 5), 7.0)
    with raises_naming("density"):
        lorax_merge.merge(_tasks(), [1.0, 1.0, 1.0], "ties", density=-1.0, out=out)
    assert bool((out == 7.0).all())
