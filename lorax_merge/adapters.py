"""Merging whole LoRA adapters: state dicts tensor by tensor, as the LoRAX server does.

A LoRA adapter is a mapping from tensor name to tensor (a PEFT adapter state dict) plus a
configuration (``adapter_config.json``, merged by :func:`merge_adapter_configs`). Every tensor
name is merged over the adapters that contain it, with the weights of those adapters only.
``weighting="peft"`` reproduces PEFT's ``add_weighted_adapter`` instead, which folds every
adapter's scaling into its weights and splits the weight between the two LoRA factors.

Random pruning draws every tensor's mask from its own seed, derived from the merge seed and the
tensor's name by :func:`derive_tensor_seed`, so results depend neither on the order of the
dictionary entries nor on the device nor on how the tensors are batched.

The configuration helpers and ``derive_tensor_seed`` are also importable from here, and so is
``merge_module_maps`` (now in :mod:`lorax_merge.lorax_server`), where earlier versions had them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ._validation import (
    FLOAT_DTYPE_NAMES,
    FLOAT_DTYPES,
    check_density,
    check_majority_sign_method,
    check_strategy,
    task_dtype,
)
from .adapter_configs import (
    adapter_labels,
    check_weighting,
    lora_factor,
    merge_adapter_configs,
    peft_factor_weights,
    peft_scaling,
)
from .api import merge_many
from .seeds import check_seed, derive_tensor_seed, seed_or_drawn
from .strategy_table import LINEAR, STRATEGIES, strategy_names

__all__ = [
    "Batch",
    "derive_tensor_seed",
    "lora_factor",
    "merge_adapter_configs",
    "merge_adapters",
    "peft_factor_weights",
    "peft_scaling",
    "plan_batches",
]

# Tensors of one merge_many call: at most this many groups and about this many bytes of input.
_CHUNK_GROUPS = 64
_CHUNK_BYTES = 256 << 20


def __getattr__(name: str) -> Any:
    # merge_module_maps moved to lorax_server, which imports this module; LoRAX servers set up
    # with `from lorax_merge.adapters import merge_module_maps` keep working.
    if name == "merge_module_maps":
        from .lorax_server import merge_module_maps

        return merge_module_maps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Batch:
    """The tensor names that one ``merge_many`` call merges, and the dtype of its results."""

    names: tuple[str, ...]
    out_dtype: torch.dtype | None


def plan_batches(
    groups: Mapping[str, Sequence[torch.Tensor]],
    out_dtype: torch.dtype | Literal["input"] | None,
    *,
    max_groups: int = _CHUNK_GROUPS,
    max_bytes: int = _CHUNK_BYTES,
) -> list[Batch]:
    """Split the tensor names of a merge into ``merge_many`` calls.

    The names of a batch share one result dtype (``out_dtype``; with ``"input"``, the dtype of
    their tensors, promoted over the adapters as in :func:`lorax_merge.merge`) and one device.
    A batch holds at most ``max_groups`` names and at most ``max_bytes`` bytes of input tensors,
    unless one name alone is larger. Names keep their order; the batches of one (dtype, device)
    follow each other, in order of first appearance.

    Args:
        groups: every tensor name, with the tensors it is merged over (one device per name).
        out_dtype: as in :func:`merge_adapters`.
    """
    chunks: dict[tuple[torch.dtype | None, torch.device], list[list[str]]] = {}
    sizes: dict[tuple[torch.dtype | None, torch.device], int] = {}
    for name, tensors in groups.items():
        first = tensors[0]
        key = (task_dtype(tensors) if out_dtype == "input" else out_dtype, first.device)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        lists = chunks.setdefault(key, [[]])
        if lists[-1] and (len(lists[-1]) >= max_groups or sizes[key] + nbytes > max_bytes):
            lists.append([])
            sizes[key] = 0
        lists[-1].append(name)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [Batch(tuple(names), key[0]) for key, lists in chunks.items() for names in lists]


def _weights_list(weights: Any, count: int) -> tuple[list[float] | None, torch.Tensor | None]:
    """Return the weights as floats (None for a tensor: reading it would wait for its device),
    and the tensor the caller gave (None for a sequence)."""
    if weights is None:
        return [1.0] * count, None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.numel() != count:
            raise ValueError(
                f"weights: expected a 1-D tensor with one weight per adapter ({count}), "
                f"got shape {list(weights.shape)}"
            )
        if not weights.is_floating_point():
            raise TypeError(f"weights: expected a floating-point tensor, got {weights.dtype}")
        return None, weights.detach()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights: expected a sequence of numbers or a tensor, got {type(weights).__name__}"
        )
    values = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"weights: expected numbers, got {w!r}")
        values.append(float(w))
    if len(values) != count:
        raise ValueError(f"weights: expected one weight per adapter ({count}), got {len(values)}")
    return values, None


def _collect(
    adapters: Sequence[Mapping[str, torch.Tensor]], labels: list[str], device: torch.device | None
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Group the tensors by name (names sorted), checking types, dtypes and shapes, on ``device``
    (None: the device of the name's first tensor). Dtypes are left as they are: ``merge_many``
    merges tasks of several dtypes in their common one, batch by batch."""
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, Mapping):
            raise TypeError(
                f"adapters: {labels[i]} is a {type(adapter).__name__}, "
                "expected a mapping from tensor name to tensor"
            )
        for name, tensor in adapter.items():
            if not isinstance(name, str):
                raise TypeError(f"adapters: {labels[i]} has a non-string tensor name {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"adapters: {labels[i]}: {name!r} is a {type(tensor).__name__}, not a tensor"
                )
            if tensor.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"adapters: {labels[i]}: tensor {name!r} has dtype "
                    f"{str(tensor.dtype).replace('torch.', '')}; "
                    f"only {FLOAT_DTYPE_NAMES} tensors can be merged"
                )
            groups.setdefault(name, []).append((i, tensor))
    result = {}
    for name in sorted(groups):
        members = groups[name]
        first_i, first = members[0]
        for i, t in members[1:]:
            if t.shape != first.shape:
                raise ValueError(
                    f"adapters: tensor {name!r} has shape {list(first.shape)} in {labels[first_i]} "
                    f"but {list(t.shape)} in {labels[i]}"
                )
        target = device if device is not None else first.device
        result[name] = [(i, t.to(target)) for i, t in members]
    return result


def merge_adapters(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    strategy: str = LINEAR,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = None,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype | Literal["input"] | None = None,
    weighting: Literal["lorax", "peft"] = "lorax",
    scalings: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    rank: int | None = None,
    svd_driver: str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge whole LoRA adapters tensor by tensor.

    Every tensor name present in any adapter is merged over the adapters that contain it, with the
    weights of those adapters only (as the LoRAX server does).  The result does not depend on the
    order of the dictionary entries; its keys are sorted.  All tensors go through
    :func:`lorax_merge.merge_many`, in batches, so CUDA tensors use the batched kernels and CPU
    tensors are merged in parallel.

    Args:
        adapters: the adapters' state dicts (mappings from tensor name to tensor).
        weights: one weight per adapter: a sequence of numbers, a 1-D floating-point tensor, or None
            for all ones.  A tensor's dtype takes part in the result dtype as in
            :func:`lorax_merge.merge`.
        strategy: a strategy name, as in :func:`lorax_merge.merge`.
        density: fraction of each task tensor kept by pruning; ignored, and not checked, by the
            strategies that do not prune (``linear``), as in :func:`lorax_merge.merge`.
        majority_sign_method: ``total`` or ``frequency`` (``ties`` and ``dare_ties``).
        seed: merge seed for the random strategies: any int, of which only the value modulo 2**64
            counts, as in :func:`lorax_merge.merge`; tensor ``name`` is merged with
            ``derive_tensor_seed(seed, name)``.  None draws the merge seed from torch's default CPU
            generator.
        device: where to merge; None keeps every tensor name on the device of its first tensor.
            Results stay on the merge device.
        out_dtype: dtype of the results: None for the core's rule (the task dtype promoted with the
            weights' dtype; float32 for a sequence of weights, as in the LoRAX server), ``"input"``
            for the dtype of the input tensors, or a floating-point dtype.
        weighting: ``"lorax"`` applies ``weights`` as they are to every tensor.  ``"peft"``
            reproduces PEFT's ``add_weighted_adapter``: adapter i's weight becomes
            ``sqrt(|w_i*s_i|)*sign(w_i*s_i)`` on its ``lora_A`` tensors and ``sqrt(|w_i*s_i|)`` on
            its ``lora_B`` tensors, where ``s_i`` is ``scalings[i]`` (see :func:`peft_scaling`);
            with a single adapter the strategy becomes ``linear``, as in PEFT.  The delta-space
            strategies take ``"lorax"`` only: they merge ``w_i * s_i * B_i @ A_i``, as PEFT does.
        scalings: one scaling per adapter; required with ``weighting="peft"``.
        names: adapter names used in error messages.
        progress: called with the number of tensors merged after each batch.
        rank, svd_driver: for the delta-space strategies (``cat``, ``svd``, ``ties_svd``,
            ``dare_ties_svd``, ``dare_linear_svd``, ``magnitude_prune_svd``), which merge each
            module's ``scalings[i] * B_i @ A_i`` and need ``scalings``; see
            :func:`lorax_merge.delta_adapters.merge_state_dicts_delta`.

    Returns:
        A dict from tensor name to merged tensor, with sorted keys.

    Raises:
        ValueError, TypeError: empty adapter list, wrong number of weights or scalings, tensors
            that are not floating-point, the same name with different shapes in two adapters, bad
            strategy, density, method or seed, or (``weighting="peft"``) a tensor that is not a LoRA
            factor.
    """
    if (
        isinstance(adapters, Mapping)
        or isinstance(adapters, (str, bytes))
        or not isinstance(adapters, Sequence)
    ):
        raise TypeError(
            "adapters: expected a sequence of state dicts (mappings from tensor name to tensor)"
        )
    if strategy in strategy_names(space="delta"):
        from .delta_adapters import merge_state_dicts_delta

        if check_weighting(weighting) == "peft":
            raise ValueError(
                f"weighting: 'peft' splits w_i * s_i between the factors of a factor-space "
                f"strategy; {strategy!r} already merges each adapter's delta w_i * s_i * B_i @ A_i "
                "as PEFT does (leave weighting='lorax')"
            )
        if scalings is None:
            raise ValueError(
                f"scalings: strategy {strategy!r} merges each adapter's delta s_i * B_i @ A_i and "
                "needs one scaling per adapter (see peft_scaling)"
            )
        return merge_state_dicts_delta(
            list(adapters), weights, scalings, strategy=strategy, rank=rank, density=density,
            majority_sign_method=majority_sign_method, seed=seed, svd_driver=svd_driver,
            device=device, out_dtype=out_dtype, names=names, progress=progress,
        )  # fmt: skip
    count = len(adapters)
    if count == 0:
        raise ValueError("adapters: no adapters to merge")
    labels = adapter_labels(names, count)
    weight_values, weight_tensor = _weights_list(weights, count)
    spec = check_strategy(strategy)
    density = check_density(density) if spec.uses_density else 1.0  # as merge does
    check_majority_sign_method(majority_sign_method)
    seed = check_seed(seed)
    check_weighting(weighting)
    factor_weights: list[tuple[float, float]] = []
    if weighting == "peft":
        if scalings is None or len(scalings) != count:
            raise ValueError(
                f"scalings: weighting='peft' needs one scaling per adapter ({count}), got "
                f"{None if scalings is None else len(scalings)}"
            )
        if weight_values is None:  # the factors' weights are computed on the host
            weight_values = [float(x) for x in weight_tensor.cpu().tolist()]
        factor_weights = [peft_factor_weights(w, s) for w, s in zip(weight_values, scalings)]
        if count == 1:
            spec = STRATEGIES[LINEAR]  # PEFT merges a single adapter linearly
    if out_dtype is not None and out_dtype != "input" and out_dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"out_dtype: expected None, 'input' or a floating-point dtype, got {out_dtype!r}"
        )
    target = torch.device(device) if device is not None else None

    groups = _collect(adapters, labels, target)
    if weighting == "peft":
        for name in groups:
            if lora_factor(name) is None:
                raise ValueError(
                    f"adapters: tensor {name!r} is neither a lora_A nor a lora_B factor; "
                    "PEFT weighting applies only to LoRA factors"
                )
    base_seed = seed_or_drawn(seed) if spec.is_random else None

    def group_weights(name: str) -> Any:
        idx = [i for i, _ in groups[name]]
        if weighting == "peft":
            side = 0 if lora_factor(name) == "A" else 1
            return [factor_weights[i][side] for i in idx]
        if weight_tensor is not None:
            # The caller's tensor, or its entries stacked where it lives: nothing is copied
            # from the host, and CPU weights stay there (their values travel with the launch).
            if idx == list(range(count)):
                return weight_tensor
            return torch.stack([weight_tensor[i] for i in idx])
        return [weight_values[i] for i in idx]

    tensors = {name: [t for _, t in members] for name, members in groups.items()}
    results: dict[str, torch.Tensor] = {}
    for batch in plan_batches(tensors, out_dtype, max_groups=_CHUNK_GROUPS, max_bytes=_CHUNK_BYTES):
        merged = merge_many(
            [tensors[name] for name in batch.names],
            [group_weights(name) for name in batch.names],
            strategy=spec.name,
            density=density,
            majority_sign_method=majority_sign_method,
            seed=None
            if base_seed is None
            else [derive_tensor_seed(base_seed, name) for name in batch.names],
            out_dtype=batch.out_dtype,
        )
        results.update(zip(batch.names, merged))
        if progress is not None:
            progress(len(batch.names))
    return {name: results[name] for name in groups}
