"""Argument conversion and the checks C++ cannot make, for the public API.

The ops check every tensor relation themselves (tasks of one shape, dtype and device; ``out``
of the tasks' shape and device; one weight per task; ``density >= 0``) for every caller,
``torch.ops`` and ``torch.compile`` included. Python converts its arguments (sequences of
numbers to tensors, names to the ops' enums) and checks what the ops cannot see or cannot name
as the API does: Python types, strategy and method names, each tensor's own dtype (named as
torch names it), and how ``merge_many`` splits weights and seeds between groups. Each failure
raises ValueError or TypeError naming the argument and the value. Nothing here reads tensor data
or synchronises a GPU, except ``check_real`` given a one-element tensor for a scalar argument.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

from .strategy_table import STRATEGIES, Space, StrategySpec, strategy_names

#: Tensor dtypes the kernels merge, in the order error messages name them.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Majority sign methods, in the order of the LoRAX server's ``MajoritySignMethod`` enum.
MAJORITY_SIGN_METHODS = ("total", "frequency")
PRUNE_METHODS = ("magnitude", "random")
FLOAT_DTYPE_NAMES = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)


def describe(value: object) -> str:
    """``repr(value)``, shortened for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_name(value: object, choices: Sequence[str], arg: str, what: str) -> str:
    """``value`` if it is one of the names ``choices``, else a ValueError naming ``arg``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{arg}: unknown {what} {describe(value)}; expected one of {', '.join(choices)}"
        )
    return value


def check_strategy(strategy: object, space: Space = "factor") -> StrategySpec:
    """The table row of a strategy name that merges in ``space``."""
    spec = STRATEGIES.get(strategy) if isinstance(strategy, str) else None
    if spec is not None and spec.space == space:
        return spec
    return STRATEGIES[check_name(strategy, strategy_names(space=space), "strategy", "strategy")]


def check_real(value: object, arg: str) -> float:
    """``value`` as a float if it is a real number (a bool is not one) or a one-element real
    tensor or array (whose value is read: a GPU tensor synchronises), else a TypeError naming
    ``arg``. NaN and infinities pass: the caller refuses them where they mean nothing."""
    if _is_real_scalar_array(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {describe(value)}")
    return float(value)


def _is_real_scalar_array(value: object) -> bool:
    """A one-element torch tensor or numpy array of a real, non-bool dtype."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return (
        hasattr(value, "__array__")
        and getattr(value, "size", None) == 1
        and kind in ("f", "i", "u")
    )


def check_density(density: object, arg: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {describe(density)}")
    value = float(density)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{arg} must be >= 0, got {value}")
    return value


def check_majority_sign_method(method: object) -> str:
    return check_name(method, MAJORITY_SIGN_METHODS, "majority_sign_method", "method")


def check_prune_method(method: object) -> str:
    return check_name(method, PRUNE_METHODS, "method", "pruning method")


def check_float_tensor(t: object, arg: str) -> torch.Tensor:
    """A tensor of a dtype the kernels merge (the ops say so too, in c10's dtype names)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg} has dtype {t.dtype}; supported: {FLOAT_DTYPE_NAMES}")
    return t


def check_task_tensors(task_tensors: object, arg: str = "task_tensors") -> list[torch.Tensor]:
    """A non-empty sequence of float tensors as a list; the op checks that they agree."""
    # list and tuple first: the Sequence ABC check costs more than the rest of this function.
    if type(task_tensors) not in (list, tuple) and (
        isinstance(task_tensors, torch.Tensor) or not isinstance(task_tensors, Sequence)
    ):
        raise TypeError(f"{arg} must be a sequence of tensors, got {type(task_tensors).__name__}")
    tasks = list(task_tensors)
    if not tasks:
        raise ValueError(f"{arg} is empty; at least one tensor is needed")
    for i, t in enumerate(tasks):
        check_float_tensor(t, f"{arg}[{i}]")
    return tasks


def task_dtype(tasks: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype tasks are merged in: ``torch.promote_types`` over all of them.

    It is the dtype of ``torch.stack(tasks)``, as the LoRAX server stacks them: float32 with
    bfloat16 gives float32, float16 with bfloat16 gives float32, anything with float64 float64.
    """
    return functools.reduce(torch.promote_types, (t.dtype for t in tasks))


def in_task_dtype(tasks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tasks in their common dtype (:func:`task_dtype`).

    The kernels read one dtype, so each narrower task is read through a converted copy (the
    conversion is exact); tasks already in the common dtype are passed as they are.
    """
    first = tasks[0].dtype
    if all(t.dtype == first for t in tasks):
        return tasks
    dtype = task_dtype(tasks)
    return [t if t.dtype == dtype else t.to(dtype) for t in tasks]


def is_weight_vector(weights: object) -> bool:
    """A tensor, or a sequence of plain numbers (as opposed to a sequence of vectors)."""
    if isinstance(weights, torch.Tensor):
        return True
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        return False
    return all(isinstance(w, numbers.Real) and not isinstance(w, torch.Tensor) for w in weights)


def as_weight_tensor(
    weights: object, num_tasks: int, device: torch.device, arg: str = "weights"
) -> torch.Tensor:
    """The weights as a 1-D tensor on the CPU or on `device`.

    A sequence of numbers becomes a float32 tensor, as ``torch.tensor(list)`` would.
    """
    if isinstance(weights, torch.Tensor):
        w = weights
        if w.dtype == torch.bool or w.is_complex():
            raise TypeError(f"{arg} must hold real numbers, got dtype {w.dtype}")
        if w.dim() == 0:
            w = w.reshape(1)
        if w.dim() != 1:
            raise ValueError(f"{arg} must be 1-D, got shape {tuple(w.shape)}")
        if w.device != device and w.device.type != "cpu":
            # A CPU merge reads its weights on the host; a GPU merge reads them where they are.
            w = w.to(device if device.type != "cpu" else "cpu")
    else:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise TypeError(
                f"{arg} must be a 1-D tensor or a sequence of numbers, got {describe(weights)}"
            )
        values = list(weights)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{arg}[{i}] must be a real number, got {describe(v)}")
        w = torch.tensor([float(v) for v in values], dtype=torch.float32, device="cpu")
    if w.numel() != num_tasks:
        raise ValueError(f"{arg} has {w.numel()} entries but there are {num_tasks} task tensors")
    return w


def check_out_dtype(out_dtype: object) -> torch.dtype | None:
    if out_dtype is None:
        return None
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPE_NAMES}, got {describe(out_dtype)}")
    return out_dtype


def result_dtype(
    task: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None, out_dtype: object
) -> torch.dtype:
    """The dtype of ``stack(tasks) * weights``, unless ``out``/``out_dtype`` chooses one."""
    requested = check_out_dtype(out_dtype)
    if out is not None:
        if requested is not None and out.dtype != requested:
            raise TypeError(f"out has dtype {out.dtype} but out_dtype is {requested}")
        return out.dtype
    if requested is not None:
        return requested
    return torch.promote_types(task.dtype, weights.dtype)


def check_out(out: object) -> torch.Tensor:
    """A float tensor; the op checks its shape and device against the tasks."""
    return check_float_tensor(out, "out")
