"""The upstream pure-PyTorch merge code, as the LoRAX server runs it.

This is the baseline the benchmarks time ``lorax_merge`` against, and an
independent implementation the tests compare with.  It follows the server's
algorithm step by step: every task tensor is pruned on its own (``torch.topk``
for magnitude pruning, ``torch.bernoulli`` for random pruning), the pruned
tensors are stacked into one ``[n, ...]`` tensor, weighted by broadcasting, the
signs are elected over the stack and the stack is reduced with ``sum(dim=0)``.

Two behaviours of the server are kept on purpose, because they are part of the
cost being measured:

* random pruning with ``rescale=True`` computes ``pruned / density`` and then
  discards the quotient (the server never assigns it), so DARE results are not
  rescaled.  ``apply_rescale=True`` keeps the quotient instead, which is what
  ``lorax_merge`` (and PEFT) do;
* the "total" sign election sums ``sign(x) * |x|`` rather than ``x``.

The server has no ``magnitude_prune`` strategy; the one here is PEFT's:
magnitude pruning followed by the weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries."""
    flat_mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.reshape(-1).shape[0])
    picked = torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices
    flat_mask[picked] = 1
    return tensor * flat_mask.reshape(tensor.shape)


def prune_at_random(
    tensor: torch.Tensor, density: float, rescale: bool, apply_rescale: bool = False
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (Bernoulli mask)."""
    keep = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * keep
    if rescale:
        quotient = torch.div(input=pruned, other=density)
        if apply_rescale:
            pruned = quotient
    return pruned


def prune(
    tensor: torch.Tensor,
    density: float,
    method: str,
    rescale: bool = False,
    apply_rescale: bool = False,
) -> torch.Tensor:
    """Prune one tensor: no-op for ``density >= 1``, error for negative density."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return prune_by_magnitude(tensor, density)
    if method == "random":
        return prune_at_random(tensor, density, rescale, apply_rescale)
    raise ValueError(f"unknown pruning method {method}")


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Boolean mask of the entries whose sign agrees with the elected sign."""
    signs = stacked.sign()
    if method == "total":
        score = (signs * stacked.abs()).sum(dim=0)
    elif method == "frequency":
        score = signs.sum(dim=0)
    else:
        raise RuntimeError(f"unknown majority sign method {method}")
    elected = torch.where(score >= 0, 1, -1)
    return signs == elected


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the agreeing entries (0 where none agrees)."""
    summed = (stacked * mask).sum(dim=0)
    agreeing = mask.sum(dim=0)
    return summed / torch.clamp(agreeing, min=1.0)


def _weighted(
    tensors: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    stacked = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors), dim=0)
    w = weights
    while w.dim() < stacked.dim():
        w = w.unsqueeze(-1)
    return stacked * w


def linear(tasks: Sequence[torch.Tensor], weights: torch.Tensor, **_: object) -> torch.Tensor:
    """Weighted sum."""
    return _weighted(tasks, weights).sum(dim=0)


def magnitude_prune(
    tasks: Sequence[torch.Tensor], weights: torch.Tensor, density: float, **_: object
) -> torch.Tensor:
    """Magnitude pruning, then weighted sum."""
    pruned = [prune(t, density, "magnitude") for t in tasks]
    return _weighted(pruned, weights).sum(dim=0)


def ties(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
    **_: object,
) -> torch.Tensor:
    """Magnitude pruning, sign election on the unweighted stack, disjoint merge."""
    stacked = torch.stack([prune(t, density, "magnitude") for t in tasks], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    apply_rescale: bool = False,
    **_: object,
) -> torch.Tensor:
    """Random pruning (rescale computed; kept only with ``apply_rescale``), weighted sum."""
    pruned = [prune(t, density, "random", True, apply_rescale) for t in tasks]
    return _weighted(pruned, weights).sum(dim=0)


def dare_ties(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
    apply_rescale: bool = False,
    **_: object,
) -> torch.Tensor:
    """Random pruning, sign election on the unweighted stack, disjoint merge."""
    stacked = torch.stack([prune(t, density, "random", True, apply_rescale) for t in tasks], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


#: strategy name -> upstream merge function ``f(tasks, weights, density=..., ...)``
STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}


def merge(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    strategy: str = "linear",
    density: float = 1.0,
    majority_sign_method: str = "total",
    apply_rescale: bool = False,
) -> torch.Tensor:
    """Merge like the server: a list of weights becomes ``torch.tensor(weights)``."""
    if not isinstance(weights, torch.Tensor):
        weights = torch.tensor(list(weights))
    return STRATEGIES[strategy](
        tasks,
        weights,
        density=density,
        majority_sign_method=majority_sign_method,
        apply_rescale=apply_rescale,
    )
