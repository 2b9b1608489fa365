"""Loads the compiled ops (``torch.ops.lorax_merge``) and registers their fake kernels.

The fake (meta) kernels describe output shapes and dtypes only, so the ops trace under
``torch.compile`` and run on ``meta`` tensors.
"""

from __future__ import annotations

import torch

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


def _register_fake(name: str):
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    return register(f"lorax_merge::{name}")


@_register_fake("merge")
def _merge_fake(tasks, weights, pruning, election, density, rescale, seed, out_dtype):
    return tasks[0].new_empty(tasks[0].shape, dtype=out_dtype)


@_register_fake("merge_out")
def _merge_out_fake(tasks, weights, pruning, election, density, rescale, seed, out):
    return None


@_register_fake("merge_many")
def _merge_many_fake(
    tasks, group_sizes, weights, pruning, election, density, rescale, seeds, out_dtype
):
    outs, offset = [], 0
    for size in group_sizes:
        outs.append(tasks[offset].new_empty(tasks[offset].shape, dtype=out_dtype))
        offset += size
    return outs


@_register_fake("magnitude_prune")
def _magnitude_prune_fake(x, density):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_register_fake("random_prune")
def _random_prune_fake(x, density, rescale, seed, stream):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_register_fake("majority_sign_mask")
def _majority_sign_mask_fake(stacked, method):
    return stacked.new_empty(stacked.shape, dtype=torch.bool)


@_register_fake("disjoint_merge")
def _disjoint_merge_fake(stacked, mask):
    dtype = torch.promote_types(stacked.dtype, torch.float32)
    return stacked.new_empty(stacked.shape[1:], dtype=dtype)
