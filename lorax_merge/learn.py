"""Learning merge weights by gradient descent, with the merge in the loop.

Given N adapters and a small loss on a few batches, :func:`learn_weights` optimises one weight per
adapter (or one per adapter and module) through the differentiable merge: every step merges the
adapters with the current weights (any strategy, on the CPU or the GPU), evaluates the user's loss
on the merged adapter and follows the gradient of that loss with respect to the weights. The
pruning masks and elected signs are constants of the merge (see the README's "Gradients"), so the
objective is smooth in the weights for a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import (
    check_density,
    check_majority_sign_method,
    check_real,
    check_strategy,
    describe,
    in_task_dtype,
)
from .adapter_configs import adapter_labels
from .adapters import _collect
from .api import merge_many
from .seeds import check_seed, derive_tensor_seed, draw_seed
from .strategy_table import LINEAR

__all__ = ["LearnedWeights", "learn_weights", "module_name"]

#: ``loss_fn(merged, batch)``: the loss of a merged adapter (tensor name -> tensor) on one batch.
LossFn = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]


def module_name(tensor_name: str) -> str:
    """The module a LoRA tensor belongs to: its name up to the ``.lora_`` part.

    ``"model.layers.0.self_attn.q_proj.lora_A.weight"`` -> ``"model.layers.0.self_attn.q_proj"``,
    so a module's ``lora_A`` and ``lora_B`` share one weight. A name without a ``.lora_`` part is
    its own module.
    """
    head, sep, _ = tensor_name.partition(".lora_")
    return head if sep else tensor_name


@dataclass
class LearnedWeights:
    """Result of :func:`learn_weights`.

    Attributes:
        weights: the learned weights: shape ``[N]``, or ``[len(modules), N]`` with one row per
            module when learned per module. Detached, on the adapters' device, float32.
        modules: the module of each row of ``weights`` (sorted), or ``()`` for one weight per
            adapter.
        losses: the loss of every step, evaluated before that step's update.
        merged: the adapter merged with the learned weights (tensor name -> tensor).
        seed: the merge seed used throughout (random strategies), or None.
    """

    weights: torch.Tensor
    modules: tuple[str, ...]
    losses: list[float]
    merged: dict[str, torch.Tensor] = field(repr=False)
    seed: int | None

    def weights_of(self, module: str) -> torch.Tensor:
        """The N weights that merge ``module`` (the shared ones when learned per adapter)."""
        if not self.modules:
            return self.weights
        return self.weights[self.modules.index(module)]


def _check_l1(l1: object) -> float:
    value = check_real(l1, "l1")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"l1 must be a finite number >= 0, got {value}")
    return value


def _initial_weights(init: object, count: int) -> torch.Tensor:
    """``init`` as a tensor of ``count`` real numbers (``1/count`` each when None)."""
    if init is None:
        return torch.full((count,), 1.0 / count, device="cpu")
    try:
        start = torch.as_tensor(init, device=init.device if torch.is_tensor(init) else "cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"init must be a tensor or a sequence of numbers, got {describe(init)}"
        ) from error
    if start.dtype == torch.bool or start.is_complex():
        raise TypeError(f"init must hold real numbers, got dtype {start.dtype}")
    if start.numel() != count:
        raise ValueError(f"init has {start.numel()} values but there are {count} adapters")
    return start


def _depends_on(loss: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``loss``'s autograd graph reaches ``leaf``: a walk over the recorded graph, with no
    forward or backward pass."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is leaf:  # the leaf's AccumulateGrad
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


class _MergePlan:
    """The adapters' tensors grouped by name, ready for one ``merge_many`` call per step."""

    def __init__(self, adapters: Sequence[Mapping[str, torch.Tensor]]) -> None:
        # merge_adapters' grouping and checks; the tensors are constants of the optimisation,
        # converted to their group's common dtype once here rather than at every step.
        members = _collect(adapters, adapter_labels(None, len(adapters)), None)
        if not members:
            raise ValueError("adapters: no tensors to merge")
        self.names = list(members)
        self.modules = tuple(sorted({module_name(n) for n in self.names}))
        row = {m: r for r, m in enumerate(self.modules)}
        self.rows = [row[module_name(n)] for n in self.names]
        self.groups = [in_task_dtype([t.detach() for _, t in members[n]]) for n in self.names]
        self.indices = [torch.tensor([i for i, _ in members[n]], device="cpu") for n in self.names]
        self.device = self.groups[0][0].device
        self.indices = [idx.to(self.device) for idx in self.indices]

    def merge(
        self, weights: torch.Tensor, per_module: bool, seeds: list[int] | None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        rows = [weights[r] if per_module else weights for r in self.rows]
        group_weights = [row.index_select(0, idx) for row, idx in zip(rows, self.indices)]
        merged = merge_many(self.groups, group_weights, seed=seeds, **kwargs)
        return dict(zip(self.names, merged))


def learn_weights(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    strategy: str = LINEAR,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = None,
    per_module: bool = False,
    init: torch.Tensor | Sequence[float] | None = None,
    steps: int = 100,
    lr: float = 0.05,
    l1: float = 0.0,
) -> LearnedWeights:
    """Learn merge weights that minimise ``loss_fn`` on ``batches``, with the merge in the loop.

    Each step merges the adapters with the current weights (``lorax_merge.merge_many`` over every
    tensor name, each merged over the adapters that have it, as ``merge_adapters`` does), calls
    ``loss_fn(merged, batch)`` on the next batch (cycling through ``batches``) and takes one Adam
    step on the weights. Only the weights are optimised; the adapters are constants.

    Args:
        adapters: N adapters' state dicts (tensor name -> tensor), all on one device.
        loss_fn: the loss of a merged adapter on one batch, a scalar tensor. It typically loads
            ``merged`` into a model (e.g. ``torch.func.functional_call``) and scores the output.
        batches: the batches, used in turn; ``[None]`` for a loss that needs no data.
        strategy, density, majority_sign_method: the merge, as in ``lorax_merge.merge``.
        seed: merge seed of the random strategies; tensor ``name`` uses
            ``derive_tensor_seed(seed, name)`` at every step, so the DARE masks stay fixed while
            the weights are learned and ``merged`` equals ``merge_adapters(..., seed=seed)``.
            None draws one seed for the whole run (reported in the result).
        per_module: learn one weight per adapter and module (see :func:`module_name`) instead of
            one per adapter.
        init: initial weights, N real numbers (shared by every module); default ``1/N`` each.
        steps: number of optimisation steps.
        lr: Adam's learning rate.
        l1: weight of an L1 penalty ``l1 * sum |w|`` added to the loss (LoraHub's regulariser),
            a finite number >= 0; the reported losses do not include it.

    Returns:
        A :class:`LearnedWeights` with the weights, the loss history and the merged adapter.

    Raises:
        ValueError, TypeError: naming the argument: no adapters or batches, bad strategy
            parameters, ``init`` of the wrong length or not real (complex or bool), a
            ``per_module`` that is not a bool, an ``l1`` that is not a finite number >= 0, an
            ``lr`` that is not a finite number > 0, or a
            loss that is not a scalar or does not depend on the weights (computed without
            autograd, or not from ``merged``).
    """
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError("adapters: expected a non-empty sequence of state dicts")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or not batches:
        raise ValueError("batches: expected a non-empty sequence (use [None] for no data)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not isinstance(per_module, bool):
        raise TypeError(f"per_module must be a bool, got {describe(per_module)}")
    l1 = _check_l1(l1)
    lr = check_real(lr, "lr")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    random = check_strategy(strategy).is_random  # a factor-space strategy
    density = check_density(density)
    majority_sign_method = check_majority_sign_method(majority_sign_method)
    seed = check_seed(seed)
    if random and seed is None:
        seed = draw_seed()
    start = _initial_weights(init, len(adapters))
    plan = _MergePlan(adapters)

    start = start.detach().to(device=plan.device, dtype=torch.float32).reshape(-1)
    if per_module:
        start = start.repeat(len(plan.modules), 1)
    weights = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([weights], lr=lr)
    seeds = None
    if random:
        seeds = [derive_tensor_seed(seed, name) for name in plan.names]
    merge_args = dict(
        per_module=per_module,
        seeds=seeds,
        strategy=strategy,
        density=density,
        majority_sign_method=majority_sign_method,
    )

    losses: list[float] = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(plan.merge(weights, **merge_args), batches[step % len(batches)])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        losses.append(float(loss.detach()))
        if not _depends_on(loss, weights):
            raise ValueError(
                "loss_fn: the loss does not depend on the weights; compute it from `merged`, "
                "with autograd enabled"
            )
        if l1:
            loss = loss + l1 * weights.abs().sum()
        loss.backward()
        optimizer.step()

    learned = weights.detach().clone()
    with torch.no_grad():
        merged = plan.merge(learned, **merge_args)
    return LearnedWeights(
        weights=learned,
        modules=plan.modules if per_module else (),
        losses=losses,
        merged=merged,
        seed=seed if random else None,
    )
