"""Drop-in replacements for the LoRAX server's merge helpers, backed by the compiled ops."""

from __future__ import annotations

import torch

from . import _ops
from ._validation import (
    check_density,
    check_float_tensor,
    check_majority_sign_method,
    check_prune_method,
)
from .seeds import check_seed, check_stream, op_seed, seed_or_drawn

__all__ = ["prune", "calculate_majority_sign_mask", "disjoint_merge"]


def prune(
    tensor: torch.Tensor,
    density: float,
    method: str,
    rescale: bool = False,
    *,
    seed: int | None = None,
    stream: int = 0,
) -> torch.Tensor:
    """Prune a tensor to a fraction ``density`` of its entries.

    ``"magnitude"`` keeps the ``int(density * numel)`` entries of largest |x| (ties at the
    threshold: lower flat index first; NaN ranks above +Inf). ``"random"`` keeps each entry
    with probability ``density``, from a counter-based generator keyed by (seed, stream,
    flat index); with ``rescale=True`` kept entries are divided by ``density``. Dropped
    entries are ``x * 0`` (NaN where x is not finite). ``density >= 1`` returns ``tensor``
    itself. The result has the tensor's dtype and shape.
    """
    check_float_tensor(tensor, "tensor")
    density = check_density(density)
    method = check_prune_method(method)
    if density >= 1:
        return tensor
    records = _ops.records_gradient([tensor])
    if method == "magnitude":
        return _ops.call(_ops.ops.magnitude_prune, tensor, density, records_gradient=records)
    seed = seed_or_drawn(check_seed(seed))
    args = (tensor, density, bool(rescale), op_seed(seed), check_stream(stream))
    return _ops.call(_ops.ops.random_prune, *args, records_gradient=records)


def calculate_majority_sign_mask(tensor: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Boolean mask of the entries of stacked tasks ``[N, ...]`` whose sign is the majority.

    The majority at each position is +1 where ``sum(x)`` (``"total"``) or ``sum(sign(x))``
    (``"frequency"``) over the N tasks is >= 0, else -1; zeros never match.
    """
    check_float_tensor(tensor, "tensor")  # the op checks that it is at least 1-D
    return _ops.ops.majority_sign_mask(tensor, check_majority_sign_method(method))


def disjoint_merge(tensor: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """``sum(tensor * mask, 0) / clamp(sum(mask, 0), min=1)`` for stacked ``[N, ...]`` tensors.

    The result is float32 (float64 for float64 input), as the reference expression gives.
    """
    check_float_tensor(tensor, "tensor")
    if not isinstance(majority_sign_mask, torch.Tensor):
        raise TypeError(
            f"majority_sign_mask must be a bool tensor, got {type(majority_sign_mask).__name__}"
        )
    records = _ops.records_gradient([tensor])
    return _ops.call(_ops.ops.disjoint_merge, tensor, majority_sign_mask, records_gradient=records)
