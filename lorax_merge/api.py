"""The merge entry points: ``merge`` for one tensor, ``merge_many`` for many at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _autograd, _ops
from ._validation import (
    as_weight_tensor,
    check_density,
    check_majority_sign_method,
    check_out,
    check_out_dtype,
    check_strategy,
    check_task_tensors,
    in_task_dtype,
    is_weight_vector,
    result_dtype,
)
from .seeds import check_seed, derive_group_seed, op_seed, seed_or_drawn
from .strategy_table import LINEAR

__all__ = ["merge", "merge_many", "build_info"]


def _resolve(strategy: str, density: object, majority_sign_method: object):
    plan = check_strategy(strategy)
    density = check_density(density) if plan.uses_density else 1.0
    election = check_majority_sign_method(majority_sign_method) if plan.elects_sign else "none"
    return plan, density, election


def merge(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    strategy: str = LINEAR,
    *,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge task tensors (one module of several adapters) into one tensor.

    Args:
        task_tensors: tensors of one shape and device, each float32, float16, bfloat16 or
            float64. Any shape and layout; they are never modified. Tasks of different dtypes
            are merged in ``torch.promote_types`` of all of them (the dtype ``torch.stack``
            gives), each narrower task through a converted copy.
        weights: one weight per task: a 1-D tensor (any device, any real dtype) or a
            sequence of numbers (taken as a float32 tensor). Negative weights are allowed.
        strategy: ``"linear"`` (sum of w_i * t_i), ``"magnitude_prune"`` (keep the
            ``int(density * numel)`` largest |t_i|, then linear), ``"ties"`` (magnitude pruning,
            sign election, disjoint merge), ``"dare_linear"`` (random pruning rescaled by
            1/density, then linear) or ``"dare_ties"`` (random pruning, sign election, disjoint
            merge).
        density: fraction of entries kept by pruning; >= 1 prunes nothing, 0 drops everything.
        majority_sign_method: ``"total"`` (sign of the sum of values) or ``"frequency"`` (sign
            of the sum of signs), for the strategies that elect a sign.
        seed: seed of the random masks (DARE): any int, of which only the value modulo 2**64
            counts (see ``lorax_merge.seeds``). Task i uses random stream i. ``None`` draws a
            seed from torch's default generator.
        out: optional destination, of the tasks' shape and device; it is returned.
        out_dtype: dtype of the result.

    Returns:
        The merged tensor. Its dtype is ``torch.promote_types(task dtype, weights dtype)``
        (bfloat16 tasks with float weights give float32), unless ``out`` or ``out_dtype``
        chooses another. Accumulation is in float32 (float64 when tasks or result are float64).
        A DARE rescale rounds ``x / density`` to the task dtype (the common one).

    The merge is differentiable w.r.t. the task tensors and the weights, with the pruning
    masks and elected signs held constant (the README's "Gradients"), except with ``out``,
    which refuses inputs that require grad.

    Raises:
        ValueError, TypeError: for bad arguments, with the argument named.
    """
    tasks = in_task_dtype(check_task_tensors(task_tensors))  # the op checks that they agree
    plan, density, election = _resolve(strategy, density, majority_sign_method)
    seed = check_seed(seed)
    w = as_weight_tensor(weights, len(tasks), tasks[0].device)
    if out is not None:
        check_out(out)
    dtype = result_dtype(tasks[0], w, out, out_dtype)
    kernel_seed = 0
    if plan.is_random and density < 1:
        kernel_seed = op_seed(seed_or_drawn(seed))
    args = (tasks, w, plan.pruning, election, density, plan.rescale, kernel_seed)
    records = _ops.records_gradient(tasks, w)
    if out is not None:
        _ops.call(_ops.ops.merge_out, *args, out, records_gradient=records)
        return out
    if plan.pruning == "magnitude" and density < 1 and records:
        # Selected once here and saved by autograd, so the backward does not select again.
        thresholds = _ops.ops.magnitude_thresholds(tasks, density)
        return _ops.ops.merge_with_thresholds(*args, 0, thresholds, dtype)
    return _ops.call(_ops.ops.merge, *args, dtype, records_gradient=records)


def merge_many(
    groups: Sequence[Sequence[torch.Tensor]],
    weights: torch.Tensor | Sequence[float] | Sequence[torch.Tensor | Sequence[float]],
    *,
    strategy: str = LINEAR,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Merge many groups of task tensors (e.g. every module of an adapter) in one call.

    Each group is merged exactly as ``merge(group, group_weights, strategy, ...)`` would,
    but all groups share the threshold selection and the fused pass: a few launches (GPU) or
    one parallel loop (CPU) for the whole batch. Shapes and task counts may differ between
    groups; all tensors must be on one device.

    Args:
        groups: one sequence of task tensors per group (of one dtype or several, as in
            ``merge``).
        weights: one weights vector for every group (all groups then have the same number of
            tasks), or a sequence with one weights vector per group.
        seed: one int, from which group g uses ``derive_group_seed(seed, g)``; or one int per group;
            or ``None`` to draw one seed from torch's default generator.
        strategy, density, majority_sign_method, out_dtype: as in ``merge``.

    Returns:
        One merged tensor per group, in order.
    """
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError(
            f"groups must be a sequence of sequences of tensors, got {type(groups).__name__}"
        )
    # The op checks each group's tensors against each other and that all share one device.
    groups = [in_task_dtype(check_task_tensors(g, f"groups[{i}]")) for i, g in enumerate(groups)]
    if not groups:
        return []
    plan, density, election = _resolve(strategy, density, majority_sign_method)
    requested = check_out_dtype(out_dtype)
    device = groups[0][0].device

    shared = is_weight_vector(weights)
    if shared:
        w = as_weight_tensor(weights, len(groups[0]), device)
        for i, g in enumerate(groups):
            if len(g) != w.numel():
                raise ValueError(
                    f"weights has {w.numel()} entries but groups[{i}] has {len(g)} tensors; "
                    "give one weights vector per group"
                )
        group_weights = [w] * len(groups)
    else:
        if not isinstance(weights, Sequence) or len(weights) != len(groups):
            raise ValueError(
                f"weights must be one weights vector or one per group ({len(groups)} groups)"
            )
        group_weights = [
            as_weight_tensor(w, len(g), device, f"weights[{i}]")
            for i, (w, g) in enumerate(zip(weights, groups))
        ]

    uses_seed = plan.is_random and density < 1
    if seed is None or not isinstance(seed, Sequence):
        base = check_seed(seed)
        if uses_seed:
            base = seed_or_drawn(base)
            seeds = [op_seed(derive_group_seed(base, i)) for i in range(len(groups))]
        else:
            seeds = [0] * len(groups)
    else:
        if len(seed) != len(groups):
            raise ValueError(f"seed has {len(seed)} entries but there are {len(groups)} groups")
        checked = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
        seeds = [op_seed(seed_or_drawn(s)) if uses_seed else 0 for s in checked]

    by_dtypes: dict[tuple[torch.dtype, torch.dtype], torch.dtype] = {}
    dtypes = []
    for g, w in zip(groups, group_weights):
        key = (g[0].dtype, w.dtype)
        if key not in by_dtypes:
            by_dtypes[key] = result_dtype(g[0], w, None, requested)
        dtypes.append(by_dtypes[key])
    # One op call per result dtype (usually one) and, with per-group weights, per place the
    # weights live: host weights travel with the launch and device weights are read where
    # they are, so no call copies weights host -> device (a synchronous copy, which a CUDA
    # graph cannot capture).
    batches: dict[tuple[torch.dtype, torch.device | None], list[int]] = {}
    for i, dtype in enumerate(dtypes):
        where = None if shared else group_weights[i].device
        batches.setdefault((dtype, where), []).append(i)
    results: list[torch.Tensor | None] = [None] * len(groups)
    if shared:
        # One float64 copy per group, in group order, taken in slices by the batches: the
        # backward then adds the groups' gradients in group order and converts once, however
        # the groups fall into batches (split and cat move gradients without adding them).
        shared_flat = _autograd.flat_weights([group_weights[0]], len(groups))
        if len(batches) > 1:  # one call (the usual case) takes the vector whole
            shared_pieces = shared_flat.split(group_weights[0].numel())
    for (dtype, _), members in batches.items():
        flat = [t for i in members for t in groups[i]]
        if shared and len(members) == len(groups):
            flat_weights = shared_flat
        elif shared:
            flat_weights = torch.cat([shared_pieces[i] for i in members])
        else:
            flat_weights = _autograd.flat_weights([group_weights[i] for i in members])
        outs = _ops.call(
            _ops.ops.merge_many,
            flat,
            [len(groups[i]) for i in members],
            flat_weights,
            plan.pruning,
            election,
            density,
            plan.rescale,
            [seeds[i] for i in members],
            dtype,
            records_gradient=_ops.records_gradient(flat, flat_weights),
        )
        for i, o in zip(members, outs):
            results[i] = o
    return results  # type: ignore[return-value]


def build_info() -> dict[str, object]:
    """What this installation was built with and runs on.

    ``cpu_capabilities`` lists the CPU kernel levels compiled in (lowest first) and
    ``cpu_capability`` the one in use: the best the CPU supports, unless the environment
    variable ``LORAX_MERGE_CPU_CAPABILITY`` chose a lower one when the package was imported.
    """
    from . import __version__

    return {
        "version": __version__,
        "torch_version": torch.__version__,
        "cuda_compiled": _ops.WITH_CUDA,
        "cuda_archs": list(_ops.CUDA_ARCHS),
        "cuda_available": _ops.WITH_CUDA and torch.cuda.is_available(),
        "cpu_capabilities": list(_ops.CPU_CAPABILITIES),
        "cpu_capability": _ops.cpu_capability(),
        "num_threads": torch.get_num_threads(),
    }
