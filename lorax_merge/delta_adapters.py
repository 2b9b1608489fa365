"""Whole adapters merged in delta space: PEFT state dicts and configurations.

The ``lora_A`` / ``lora_B`` (or ``lora_embedding_A`` / ``lora_embedding_B``) tensors of every
module are merged with :func:`lorax_merge.delta.merge_lora_module`, over the adapters that have
the module, each delta carrying its adapter's weight and scaling. The result is exact whatever
the adapters' ``lora_alpha``, ``r`` (ranks may differ) and ``use_rslora``: its configuration says
``lora_alpha = r`` and ``use_rslora = false`` (scaling 1), with the union of the target modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._validation import FLOAT_DTYPES, check_density
from .adapter_configs import (
    adapter_labels,
    config_value,
    peft_scaling,
    union_target_modules,
    updated_config,
)
from .delta import compute_dtype, merge_lora_module
from .seeds import derive_tensor_seed, draw_seed
from .strategy_table import STRATEGIES, SVD, strategy_names

__all__ = ["merge_adapters_delta", "merge_state_dicts_delta", "delta_adapter_config"]

_FACTORS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}


def _split_name(name: str) -> tuple[str, str] | None:
    """``(module key, factor)`` of a LoRA tensor name; the key is the name with the factor's
    ``A``/``B`` letter masked, so that a module's two tensors share it."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _FACTORS:
            return ".".join(parts[:i] + [part[:-1] + "*"] + parts[i + 1 :]), _FACTORS[part]
    return None


def _modules(
    adapters: Sequence[Mapping[str, torch.Tensor]], labels: list[str]
) -> dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]]:
    """module key -> adapter index -> factor ("A"/"B") -> (tensor name, tensor)."""
    modules: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, Mapping):
            raise TypeError(f"adapters: {labels[i]} is a {type(adapter).__name__}, not a mapping")
        for name, tensor in adapter.items():
            split = _split_name(name) if isinstance(name, str) else None
            if split is None:
                raise ValueError(
                    f"adapters: {labels[i]}: tensor {name!r} is not a LoRA factor; delta-space "
                    "strategies merge lora_A/lora_B pairs only"
                )
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"adapters: {labels[i]}: {name!r} must be a float32, float16, bfloat16 or "
                    "float64 tensor"
                )
            modules.setdefault(split[0], {}).setdefault(i, {})[split[1]] = (name, tensor)
    for key, members in modules.items():
        for i, pair in members.items():
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise ValueError(f"adapters: {labels[i]} has no {missing} for {key!r}")
            a, b = pair["A"][1], pair["B"][1]
            if a.dim() < 2 or b.dim() < 2 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"adapters: {labels[i]}: {key!r} has lora_A {list(a.shape)} and lora_B "
                    f"{list(b.shape)}, which do not share a rank"
                )
    return {key: modules[key] for key in sorted(modules)}


def merge_state_dicts_delta(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None,
    scalings: Sequence[float],
    *,
    strategy: str,
    rank: int | None = None,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = None,
    svd_driver: str | None = None,
    svd_clamp: float | None = None,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype | str | None = None,
    names: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge adapter state dicts in delta space, module by module.

    Args:
        adapters: PEFT adapter state dicts (only LoRA factor tensors).
        weights: one weight per adapter (None: all ones).
        scalings: each adapter's scaling (see :func:`lorax_merge.adapters.peft_scaling`); the
            delta of adapter ``i`` is ``scalings[i] * B_i @ A_i``.
        strategy: ``cat``, ``svd``, ``ties_svd``, ``dare_ties_svd``, ``dare_linear_svd`` or
            ``magnitude_prune_svd``.
        rank: rank of every merged module (default: the largest input rank; ``cat``: the sum
            of the adapters' ranks, modules an adapter lacks padded with zeros).
        density, majority_sign_method, svd_driver, svd_clamp: see
            :func:`lorax_merge.delta.merge_lora_module`.
        seed: DARE seed; module ``m`` uses ``derive_tensor_seed(seed, m)`` where ``m`` is its
            ``lora_A`` tensor's name. None draws one.
        device: where to merge (default: where each module's first tensor is).
        out_dtype: None for the compute dtype (float32, float64 for float64 inputs), ``"input"``
            for the inputs' dtype, or a floating-point dtype.
        names: adapter names for error messages.
        progress: called with 2 (tensors done) after each module.

    Returns:
        tensor name -> merged tensor, with the names of the inputs, sorted.
    """
    count = len(adapters)
    if count == 0:
        raise ValueError("adapters: no adapters to merge")
    labels = [f"adapter {i}" for i in range(count)] if names is None else [str(n) for n in names]
    if strategy not in strategy_names(space="delta"):
        raise ValueError(
            f"strategy: {strategy!r} is not a delta-space strategy; expected one of "
            f"{', '.join(strategy_names(space='delta'))}"
        )
    spec = STRATEGIES[strategy]
    if spec.uses_density:  # before `density < 1` reads it
        density = check_density(density)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if scalings is None or len(scalings) != count or len(weights) != count:
        raise ValueError(f"weights and scalings: expected one per adapter ({count})")
    if out_dtype is not None and out_dtype != "input" and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected None, 'input' or a float dtype, got {out_dtype!r}")
    modules = _modules(adapters, labels)
    ranks = [0] * count  # each adapter's largest module rank
    for members in modules.values():
        for i, pair in members.items():
            ranks[i] = max(ranks[i], pair["A"][1].shape[0])
    if rank is None:
        rank = sum(ranks) if spec.refactor == "concat" else max(ranks)
    if spec.is_random and seed is None and density < 1:
        seed = draw_seed()

    merged: dict[str, torch.Tensor] = {}
    for key, members in modules.items():
        order = sorted(members)
        a_list = [members[i]["A"][1] for i in order]
        b_list = [members[i]["B"][1] for i in order]
        target = torch.device(device) if device is not None else a_list[0].device
        name_a, name_b = members[order[0]]["A"][0], members[order[0]]["B"][0]
        first = order[0]
        for i, a, b in zip(order, a_list, b_list):
            # Shapes apart from the rank: lora_A (r, *in), lora_B (out, r, *1).
            if a.shape[1:] != a_list[0].shape[1:] or b.shape[:1] != b_list[0].shape[:1]:
                raise ValueError(
                    f"adapters: {key!r} has lora_A {list(a.shape)}, lora_B {list(b.shape)} in "
                    f"{labels[i]} but {list(a_list[0].shape)}, {list(b_list[0].shape)} in "
                    f"{labels[first]}"
                )
        dtype = compute_dtype(*a_list, *b_list)
        if out_dtype == "input":
            dtype = a_list[0].dtype
            for x in a_list + b_list:
                dtype = torch.promote_types(dtype, x.dtype)
        elif out_dtype is not None:
            dtype = out_dtype
        lora_a, lora_b = merge_lora_module(
            [x.to(target).flatten(1) for x in a_list],
            [x.to(target).flatten(1) for x in b_list],  # conv lora_B is (out, r, 1, 1)
            [float(scalings[i]) for i in order],
            [weights[i] for i in order],
            strategy,
            rank=rank,
            density=density,
            majority_sign_method=majority_sign_method,
            seed=None if seed is None else derive_tensor_seed(seed, name_a),
            svd_driver=svd_driver,
            svd_clamp=svd_clamp,
            out_dtype=dtype,
        )
        shape_a, shape_b = list(a_list[0].shape), list(b_list[0].shape)
        shape_a[0], shape_b[1] = rank, rank
        merged[name_a] = lora_a.reshape(shape_a)
        merged[name_b] = lora_b.reshape(shape_b)
        if progress is not None:
            progress(2)
    return {name: merged[name] for name in sorted(merged)}


def delta_adapter_config(
    configs: Sequence[Any], rank: int, names: Sequence[str] | None = None
) -> Any:
    """The configuration of a delta-space merge: the first adapter's, with ``r = lora_alpha =
    rank``, ``use_rslora = False``, empty ``rank_pattern``/``alpha_pattern`` and the union of the
    ``target_modules`` (sorted; regular expressions are combined as ``(re1)|(re2)``).

    Returns a dict for mapping configs, else a shallow copy of the first config object.
    """
    if not configs:
        raise ValueError("no adapters to merge")
    labels = adapter_labels(names, len(configs))
    updates = {
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": union_target_modules(configs, labels),
    }
    return updated_config(configs[0], updates)


def merge_adapters_delta(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    configs: Sequence[Any],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    strategy: str = SVD,
    rank: int | None = None,
    names: Sequence[str] | None = None,
    **options: Any,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Merge whole PEFT adapters (state dicts and configs) in delta space.

    Each adapter's scaling comes from its config (``lora_alpha / r``, or ``/ sqrt(r)`` with
    ``use_rslora``). ``rank`` defaults to the largest ``r`` of the configs (``cat``: their sum).
    Other keyword arguments are those of :func:`merge_state_dicts_delta`.

    Returns:
        ``(tensors, config)``: the merged state dict and its configuration
        (:func:`delta_adapter_config`), ready for ``adapter_model.safetensors`` and
        ``adapter_config.json``.
    """
    if len(configs) != len(adapters):
        raise ValueError(f"configs: expected {len(adapters)} (one per adapter), got {len(configs)}")
    labels = [f"adapter {i}" for i in range(len(configs))] if names is None else list(names)
    scalings = [peft_scaling(c, n) for c, n in zip(configs, labels)]
    if rank is None and strategy in STRATEGIES:
        config_ranks = [int(config_value(c, "r")) for c in configs]
        concat = STRATEGIES[strategy].refactor == "concat"
        rank = sum(config_ranks) if concat else max(config_ranks)
    tensors = merge_state_dicts_delta(
        adapters, weights, scalings, strategy=strategy, rank=rank, names=labels, **options
    )
    return tensors, delta_adapter_config(configs, rank, labels)
