"""Eager reference for gradients: the upstream merge expressions, differentiated by autograd.

The upstream code (the LoRAX server's and PEFT's merge helpers) computes a merge as plain tensor
expressions: ``tensor * mask`` (pruning), ``/ density`` (DARE's rescale), ``stack * weights``,
``(weighted * sign_mask).sum(0) / clamp(sign_mask.sum(0), min=1)`` (disjoint merge) or
``.sum(0)``. ``torch.autograd`` differentiates that with every mask held constant: the selection
masks, DARE's keep masks and the elected signs are piecewise constant in the inputs.

The masks here are ours, computed from the detached inputs: the magnitude selection with its tie
rule (``reference.magnitude_keep_mask``), DARE's seeded masks (``helpers.dare_masks``) and the sign
election of the README (on the pruned, unweighted values). With these masks the expression is the
function our forward computes, so its autograd gradient is the one our backward must give:

* ``d out / d t_i = w_i * keep_i * scale * elect_i / count``
* ``d out / d w_i = sum over elements of g * v_i * elect_i / count``

Everything runs in the dtypes upstream would use (16-bit tasks stay 16-bit, the weighted stack is
promoted with the weights), so the per-element task gradients of a correct backward are
bit-identical to these, and the weight gradients differ only in the order of one sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from helpers import dare_masks
from reference import (
    STRATEGY_TABLE,
    accumulate_dtype,
    magnitude_keep_mask,
    reference_majority_sign,
    reference_sign,
)


def keep_masks(
    tasks: Sequence[torch.Tensor], strategy: str, density: float, seed: int | None
) -> list[torch.Tensor] | None:
    """The pruning masks a merge applies (boolean, one per task), or None when it prunes nothing."""
    pruning, _ = STRATEGY_TABLE[strategy]
    if pruning is None or density >= 1:
        return None
    if pruning == "magnitude":
        return [magnitude_keep_mask(t, density).to(t.device) for t in tasks]
    assert seed is not None, "DARE needs the merge's seed to rebuild its masks"
    return dare_masks([t.detach() for t in tasks], density, seed)


def upstream_expression(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor,
    strategy: str,
    density: float,
    method: str,
    masks: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """The upstream merge as differentiable tensor expressions, with ``masks`` held constant.

    The sign election is computed from the detached pruned values (the README's rule), so it is
    held constant too.
    """
    pruning, elects = STRATEGY_TABLE[strategy]
    pruned = list(tasks)
    if masks is not None:
        pruned = [t * m.to(t.dtype) for t, m in zip(tasks, masks)]
        if pruning == "random" and density > 0:
            pruned = [p / density for p in pruned]
    stacked = torch.stack(pruned, dim=0)
    w = weights.reshape((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if not elects:
        return weighted.sum(dim=0)
    values = [p.detach().cpu() for p in pruned]
    acc = accumulate_dtype(values[0].dtype, weighted.dtype)
    majority = reference_majority_sign(values, method, accumulate_dtype(values[0].dtype)).to(acc)
    sign_mask = torch.stack([reference_sign(v).to(acc) == majority for v in values])
    sign_mask = sign_mask.to(stacked.device)
    summed = (weighted * sign_mask).sum(dim=0)
    return summed / torch.clamp(sign_mask.sum(dim=0), min=1.0)


def reference_gradients(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    strategy: str,
    density: float = 1.0,
    method: str = "total",
    seed: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of the upstream expression w.r.t. every task and the weights.

    ``tasks`` and ``weights`` are used as values (they need not require grad); ``grad_out`` is the
    gradient of the merge's result. The gradients are computed on the CPU, whatever the inputs'
    device: CUDA divides a tensor by a Python number as a product with its reciprocal, which
    differs from the quotient (the kernels' rescale on both devices) in the last place.
    """
    leaves = [t.detach().cpu().clone().requires_grad_(True) for t in tasks]
    w = weights.detach().cpu().clone().requires_grad_(True)
    masks = keep_masks(leaves, strategy, density, seed)
    out = upstream_expression(leaves, w, strategy, density, method, masks)
    grads = torch.autograd.grad(out, [*leaves, w], grad_out.detach().cpu().to(out.dtype))
    return list(grads[:-1]), grads[-1]


def weight_gradient_tolerance(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    strategy: str,
    density: float = 1.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Largest admissible |difference| per weight gradient: two summation orders of one sum.

    A sum of n terms is off by at most about ``n * eps * sum |term|`` in the dtype it is formed in
    (the weighted stack's), and the result is rounded once to the weights' dtype.
    """
    tasks = [t.detach().cpu() for t in tasks]  # the inputs may be on different devices
    masks = keep_masks(tasks, strategy, density, seed)
    rescale = STRATEGY_TABLE[strategy][0] == "random" and 0 < density < 1
    g = grad_out.detach().cpu().abs().to(torch.float64)
    bounds = []
    for i, t in enumerate(tasks):
        v = t.abs().to(torch.float64)
        if masks is not None:
            v = v * masks[i].to(torch.float64)
        bounds.append((g * v).sum() / (density if rescale else 1.0))
    eps_sum = torch.finfo(torch.promote_types(tasks[0].dtype, weights.dtype)).eps
    eps_w = torch.finfo(weights.dtype).eps
    return torch.stack(bounds) * (2 * tasks[0].numel() * eps_sum + eps_w)
