"""Loads the compiled ops (``torch.ops.lorax_merge``) and registers their fake kernels.

The fake (meta) kernels describe output shapes and dtypes only, so the ops trace under
``torch.compile`` and run on ``meta`` tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd import forward_ad

from . import _C  # noqa: F401  (loading the library registers the ops)

ops = torch.ops.lorax_merge

WITH_CUDA: bool = bool(_C.WITH_CUDA)
CUDA_ARCHS: list[str] = [a for a in _C.CUDA_ARCHS.replace(" ", ";").split(";") if a]
#: CPU capability levels compiled into the library, lowest first ("default", "avx2", "avx512")
CPU_CAPABILITIES: list[str] = list(_C.CPU_CAPABILITIES)


def cpu_capability() -> str:
    """The CPU kernels' capability level in use: the best this CPU supports, or the one
    ``LORAX_MERGE_CPU_CAPABILITY`` names (read when the library is imported)."""
    return _C.cpu_capability()


# The ops' derivatives are registered from Python (_autograd.py), so every call passes through a
# Python autograd kernel, a few microseconds even when nothing requires grad. Callers that know
# their result records no gradient call the op below the autograd key instead.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def records_gradient(tensors: Sequence[torch.Tensor], *more: torch.Tensor) -> bool:
    """Whether an op's result over these inputs would record a gradient.

    Every differentiable entry point asks this before calling an op, so it also refuses what
    the ops cannot differentiate (see ``refuse_forward_mode``).
    """
    if not torch.compiler.is_compiling():
        refuse_forward_mode(tensors, more)
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in more) or any(t.requires_grad for t in tensors)
    )


_functorch_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)


def refuse_forward_mode(tensors: Sequence[torch.Tensor], more: Sequence[torch.Tensor]) -> None:
    """Raises NotImplementedError under a ``torch.func`` transform, or for an input that
    carries a forward-mode tangent.

    The ops have reverse-mode derivatives only. torch passes an input whose only derivative
    is a tangent (forward AD, ``jvp``, ``jacfwd``) below the autograd key, which would drop
    the tangent without a word: a zero Jacobian. The other transforms (``grad``, ``vmap``)
    would fail deep inside torch with a message that does not say why.
    """
    if _functorch_level() is not None:
        raise NotImplementedError(
            "lorax_merge: the merge ops do not support torch.func transforms (grad, vmap, jvp, "
            "jacfwd, jacrev, ...); differentiate with torch.autograd (loss.backward() or "
            "torch.autograd.grad)"
        )
    if forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for group in (tensors, more) for t in group
    ):
        raise NotImplementedError(
            "lorax_merge: forward-mode AD is not supported (an input carries a tangent); the "
            "merge ops have reverse-mode derivatives only (loss.backward() or torch.autograd.grad)"
        )


def call(op: Callable[..., Any], *args: Any, records_gradient: bool) -> Any:
    """``op(*args)``; below the autograd key when ``records_gradient`` is false.

    ``records_gradient`` must be true whenever grad mode is on and an argument requires
    grad: the autograd kernel is what builds the graph (and what refuses such arguments to
    an out= op). Under ``torch.compile`` the op is always called as it is.
    """
    if records_gradient or torch.compiler.is_compiling():
        return op(*args)
    with _below_autograd():
        return op(*args)


def _fake_kernel(kernel):
    """Registers ``kernel`` as the fake kernel of the op it is named after."""
    torch.library.register_fake(f"lorax_merge::{kernel.__name__}")(kernel)
    return kernel


# Each fake kernel is named after its op (names only here, so that no op name is written twice).


@_fake_kernel
def merge(tasks, weights, pruning, election, density, rescale, seed, out_dtype):
    return tasks[0].new_empty(tasks[0].shape, dtype=out_dtype)


@_fake_kernel
def merge_out(tasks, weights, pruning, election, density, rescale, seed, out):
    return None


@_fake_kernel
def merge_many(tasks, group_sizes, weights, pruning, election, density, rescale, seeds, out_dtype):
    outs, offset = [], 0
    for size in group_sizes:
        outs.append(tasks[offset].new_empty(tasks[offset].shape, dtype=out_dtype))
        offset += size
    return outs


@_fake_kernel
def magnitude_prune(x, density):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_fake_kernel
def random_prune(x, density, rescale, seed, stream):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_fake_kernel
def majority_sign_mask(stacked, method):
    return stacked.new_empty(stacked.shape, dtype=torch.bool)


@_fake_kernel
def disjoint_merge(stacked, mask):
    dtype = torch.promote_types(stacked.dtype, torch.float32)
    return stacked.new_empty(stacked.shape[1:], dtype=dtype)


@_fake_kernel
def merge_slice_out(
    tasks, weights, pruning, election, density, rescale, seed, index_offset, thresholds, out
):
    return None


@_fake_kernel
def magnitude_thresholds(tasks, density):
    return tasks[0].new_empty((len(tasks), 2), dtype=torch.int64)


@_fake_kernel
def lora_delta_out(lora_a, lora_b, scale, row_begin, out):
    return None


@_fake_kernel
def merge_with_thresholds(
    tasks, weights, pruning, election, density, rescale, seed, index_offset, thresholds, out_dtype
):
    return tasks[0].new_empty(tasks[0].shape, dtype=out_dtype)


@_fake_kernel
def merge_backward(
    grads,
    tasks,
    group_sizes,
    weights,
    pruning,
    election,
    density,
    rescale,
    seeds,
    index_offset,
    thresholds,
    tasks_need_grad,
    weights_need_grad,
):
    task_grads = [t.new_empty(t.shape) for t in tasks] if tasks_need_grad else []
    count = len(tasks) if weights_need_grad and group_sizes else 0
    device = tasks[0].device if tasks else weights.device
    return task_grads, torch.empty((count,), dtype=torch.float64, device=device)


@_fake_kernel
def disjoint_merge_backward(grad, mask, dtype):
    return grad.new_empty(mask.shape, dtype=dtype)
