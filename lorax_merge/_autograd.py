"""Derivative formulas of the compiled ops, registered with ``torch.library.register_autograd``.

The gradient is the upstream expression's (``tensor * mask``, ``/ density``, ``stack * weights``,
``sum / count``) with the pruning masks, DARE masks and elected signs held constant:

* ``d out / d t_i = w_i * keep_i * scale * elect_i / count``
* ``d out / d w_i = sum over elements of g * v_i * elect_i / count``

where ``v_i`` is the pruned (and rescaled) task value, ``scale`` is ``1/density`` for DARE's
rescale and 1 otherwise, and ``count`` is the elected count (1 without election). The backward
of a merge is one fused kernel (``merge_backward``) that recomputes the masks from the magnitude
thresholds and the seed; nothing the size of a task is saved but the inputs themselves.

``merge_out`` and ``merge_slice_out`` (no derivative: they raise when an input requires grad, as
torch's out= ops do), ``majority_sign_mask`` and ``magnitude_thresholds`` (bool and int outputs)
have Autograd kernels in C++ (``csrc/grad_ops.cpp``).
"""

from __future__ import annotations

import torch

from ._ops import ops


def _unit_weight() -> torch.Tensor:
    """The weight of a one-task merge (pruning alone)."""
    return torch.ones(1, dtype=torch.float64, device="cpu")


def _prunes_by_magnitude(pruning: str, density: float) -> bool:
    return pruning == "magnitude" and density < 1


# The one NaN of each dtype (csrc/common/canonical_nan.h), as the bits of an integer of its width.
_CANONICAL_NAN = {
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF),
    torch.float32: (torch.int32, 0x7FFF_FFFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
}


def _weight_grad(grad: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float64 weight gradient as the weights' own dtype and device, NaNs canonical.

    The ops write the canonical float64 NaN, but a conversion to a 16-bit dtype gives another
    NaN on the CPU (c10's converters) than on the GPU, and a sum taken here (merge_many's
    shared weights) can make x86's negative NaN: every NaN is rewritten as its dtype's one.
    """
    converted = grad.to(device=device, dtype=dtype)
    as_int, bits = _CANONICAL_NAN[dtype]
    converted.view(as_int).masked_fill_(converted.isnan(), bits)
    return converted


class _FlatWeights(torch.autograd.Function):
    """merge_many's float64 weights: ``repeats`` copies of one shared vector, or the groups'
    vectors one after another. The backward gives every device the same bits: a shared vector's
    gradient sums the groups' gradients one group after another (torch's reduction of a repeat
    sums in another order on each device), and each gradient is converted as merge's is."""

    @staticmethod
    def forward(ctx, repeats: int, *weights: torch.Tensor) -> torch.Tensor:
        ctx.parts = [(w.numel(), w.dtype, w.device) for w in weights]
        return _concatenated(list(weights), repeats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes = [numel for numel, _, _ in ctx.parts]
        if len(ctx.parts) == 1:
            pieces = grad.split(sizes[0])
            total = pieces[0]
            for piece in pieces[1:]:
                total = total + piece
            grads = [total]
        else:
            grads = list(grad.split(sizes))
        converted = [
            _weight_grad(g, dtype, device) for g, (_, dtype, device) in zip(grads, ctx.parts)
        ]
        return (None, *converted)


def _concatenated(weights: list[torch.Tensor], repeats: int) -> torch.Tensor:
    if len(weights) == 1:
        return weights[0].to(torch.float64).repeat(repeats)
    return torch.cat([w.to(torch.float64) for w in weights])


def flat_weights(weights: list[torch.Tensor], repeats: int = 1) -> torch.Tensor:
    """The float64 weights of a merge_many call: ``weights[0]`` ``repeats`` times (one shared
    vector), or the vectors one after another (``repeats`` 1)."""
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return _FlatWeights.apply(repeats, *weights)
    return _concatenated(weights, repeats)


def _task_grads(grads: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor | None]:
    if not grads:
        return [None] * len(needs)
    return [g if need else None for g, need in zip(grads, needs)]


def _materialize(grad: torch.Tensor | None, meta: tuple) -> torch.Tensor:
    """A result's gradient; zeros for a result that did not take part in the loss."""
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad


# ------------------------------------------------------------------------------------------ merge
def _merges_backward(ctx, grads, tasks, weights, group_sizes, seeds, offset, thresholds):
    """Gradients of a batch of merges (one group each) w.r.t. the tasks and the weights."""
    pruning, election, density, rescale = ctx.strategy
    needs_tasks, needs_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[ctx.weights_index]
    if thresholds is None and _prunes_by_magnitude(pruning, density) and tasks:
        thresholds = _group_thresholds(tasks, group_sizes, density)
        if offset:  # selected from a slice, as the forward did: tie cut in the slice's indices
            thresholds[:, 1] += offset
    args = (pruning, election, density, rescale, seeds, offset, thresholds)
    task_grads, weight_grads = ops.merge_backward(
        grads, tasks, group_sizes, weights, *args, any(needs_tasks), needs_weights
    )
    w_grad = _weight_grad(weight_grads, weights.dtype, weights.device) if needs_weights else None
    return _task_grads(task_grads, needs_tasks), w_grad


def _setup_merge(ctx, inputs, output) -> None:
    tasks, weights, pruning, election, density, rescale, seed, _ = inputs
    ctx.save_for_backward(*tasks, weights)
    ctx.strategy, ctx.seed, ctx.weights_index = (pruning, election, density, rescale), seed, 1


def _merge_backward(ctx, grad):
    *tasks, weights = ctx.saved_tensors
    grads = _merges_backward(ctx, [grad], tasks, weights, [len(tasks)], [ctx.seed], 0, None)
    return grads + (None,) * 6


def _setup_merge_with_thresholds(ctx, inputs, output) -> None:
    tasks, weights, pruning, election, density, rescale, seed, offset, thresholds, _ = inputs
    ctx.save_for_backward(*tasks, weights, thresholds)
    ctx.strategy, ctx.seed, ctx.weights_index = (pruning, election, density, rescale), seed, 1
    ctx.offset = offset


def _merge_with_thresholds_backward(ctx, grad):
    *tasks, weights, thresholds = ctx.saved_tensors
    sizes, seeds = [len(tasks)], [ctx.seed]
    grads = _merges_backward(ctx, [grad], tasks, weights, sizes, seeds, ctx.offset, thresholds)
    return grads + (None,) * 8


def _setup_merge_many(ctx, inputs, output) -> None:
    tasks, group_sizes, weights, pruning, election, density, rescale, seeds, _ = inputs
    ctx.save_for_backward(*tasks, weights)
    ctx.strategy, ctx.weights_index = (pruning, election, density, rescale), 2
    ctx.group_sizes, ctx.seeds = list(group_sizes), list(seeds)
    ctx.out_meta = [(o.shape, o.dtype, o.device) for o in output]


def _merge_many_backward(ctx, grads):
    *tasks, weights = ctx.saved_tensors
    grads = [_materialize(g, meta) for g, meta in zip(grads, ctx.out_meta)]
    task_grads, w_grad = _merges_backward(
        ctx, grads, tasks, weights, ctx.group_sizes, ctx.seeds, 0, None
    )
    return (task_grads, None, w_grad) + (None,) * 6


def _group_thresholds(tasks: list[torch.Tensor], group_sizes: list[int], density: float):
    """Every group's magnitude thresholds (a group's tensors share one shape and dtype)."""
    parts, offset = [], 0
    for size in group_sizes:
        parts.append(ops.magnitude_thresholds(tasks[offset : offset + size], density))
        offset += size
    return torch.cat(parts)


# -------------------------------------------------------------------------------------- pruning
def _setup_magnitude_prune(ctx, inputs, output) -> None:
    x, density = inputs
    ctx.save_for_backward(x)
    ctx.density = density


def _magnitude_prune_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if ctx.density >= 1:
        return grad, None
    thresholds = ops.magnitude_thresholds([x], ctx.density)
    args = ("magnitude", "none", ctx.density, False, [0], 0, thresholds, True, False)
    (grad_x,), _ = ops.merge_backward([grad], [x], [1], _unit_weight(), *args)
    return grad_x, None


def _setup_random_prune(ctx, inputs, output) -> None:
    _, density, rescale, seed, stream = inputs
    ctx.params = (density, rescale, seed, stream)


def _random_prune_backward(ctx, grad):
    # The mask depends only on (seed, stream, index), and the gradient of a kept entry is
    # grad / density rounded as the forward rounds x / density: the same op, applied to grad.
    grad_x = ops.random_prune(grad, *ctx.params)
    density, rescale = ctx.params[:2]
    if rescale and 0 < density < 1:
        _overflowed_drops_as_nan(grad, grad_x, density)
    return grad_x, None, None, None, None


def _overflowed_drops_as_nan(grad: torch.Tensor, grad_x: torch.Tensor, density: float) -> None:
    """Gives a dropped entry the NaN of ``r(grad / density) * 0`` where the quotient overflows.

    The gradient of ``(tensor * mask) / density`` divides before the mask multiplies, so a
    dropped entry gets ``r(grad / density) * 0``: NaN where the rounded quotient is not finite,
    which ``random_prune(grad)`` (``grad * 0`` there) does not see. The quotient is the
    kernels' true division in the op-math type (a 0-dim tensor on the gradient's device, not a
    Python number, which the GPU would multiply by its reciprocal); a kept entry's gradient is
    that same quotient, so a non-finite quotient with a finite ``grad_x`` marks a drop (NaN
    too: a density that is 0 in the op-math type makes ``0 / 0``).
    """
    op_math = torch.float64 if grad.dtype == torch.float64 else torch.float32
    divisor = torch.full((), density, dtype=op_math, device=grad.device)
    quotient = (grad.to(op_math) / divisor).to(grad.dtype)
    overflowed = ~quotient.isfinite() & grad_x.isfinite()
    as_int, bits = _CANONICAL_NAN[grad.dtype]
    grad_x.view(as_int).masked_fill_(overflowed, bits)


# ------------------------------------------------------------------------------ disjoint merge
def _setup_disjoint_merge(ctx, inputs, output) -> None:
    stacked, mask = inputs
    ctx.save_for_backward(mask)
    ctx.dtype = stacked.dtype


def _disjoint_merge_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return ops.disjoint_merge_backward(grad, mask, ctx.dtype), None


def _setup_disjoint_merge_grad(ctx, inputs, output) -> None:
    _, mask, _ = inputs
    ctx.save_for_backward(mask)


def _disjoint_merge_grad_backward(ctx, grad):
    # The backward is linear in its gradient: mask_i * g / count, whose transpose is the
    # disjoint merge itself.
    (mask,) = ctx.saved_tensors
    return ops.disjoint_merge(grad, mask), None, None


# ------------------------------------------------------------------------------- the backward
def _setup_merge_grad(ctx, inputs, output) -> None:
    pass


def _merge_grad_backward(ctx, *grads):
    raise RuntimeError(
        "lorax_merge: second derivatives of a merge are not implemented (the backward of "
        "merge_backward); differentiate the merge once"
    )


# Each op's derivative, as (backward, setup_context); the op is named by the backward function
# (``_NAME_backward``, with ``_grad`` standing for the op's own ``_backward``), so that no op name
# is written twice.
_FORMULAS = (
    (_merge_backward, _setup_merge),
    (_merge_with_thresholds_backward, _setup_merge_with_thresholds),
    (_merge_many_backward, _setup_merge_many),
    (_magnitude_prune_backward, _setup_magnitude_prune),
    (_random_prune_backward, _setup_random_prune),
    (_disjoint_merge_backward, _setup_disjoint_merge),
    (_disjoint_merge_grad_backward, _setup_disjoint_merge_grad),
    (_merge_grad_backward, _setup_merge_grad),
)


def _op_name(backward) -> str:
    name = backward.__name__.removeprefix("_").removesuffix("_backward")
    return name.removesuffix("_grad") + "_backward" if name.endswith("_grad") else name


for _backward, _setup in _FORMULAS:
    _name = _op_name(_backward)
    torch.library.register_autograd(f"lorax_merge::{_name}", _backward, setup_context=_setup)
