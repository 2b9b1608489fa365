"""The drop-in for a LoRAX server's merge function (see ``docs/lorax-server.md``).

``merge_module_maps`` takes the server's own arguments (module maps and the request's
``AdapterParameters``) and returns what the server's ``merge_adapters`` returns, merged through
:func:`lorax_merge.merge_adapters`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._validation import MAJORITY_SIGN_METHODS, check_density, check_real
from .adapter_configs import adapter_labels, config_value, merge_adapter_configs
from .adapters import merge_adapters
from .strategy_table import STRATEGIES, strategy_names

__all__ = ["LORAX_MAJORITY_SIGN_METHODS", "LORAX_MERGE_STRATEGIES", "merge_module_maps"]

#: LoRAX's ``MergeStrategy`` and ``MajoritySignMethod`` protobuf enums, in value order.
LORAX_MERGE_STRATEGIES: tuple[str, ...] = strategy_names(in_server=True)
LORAX_MAJORITY_SIGN_METHODS: tuple[str, ...] = MAJORITY_SIGN_METHODS


def _enum_name(value: Any, names: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value.lower() in names:
        return value.lower()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    raise ValueError(f"{what}: unknown value {value!r}; expected one of {', '.join(names)}")


def _adapter_names(merge_params: Any, count: int) -> list[str] | None:
    """The request's ``adapter_ids``, which name the adapters in error messages; None (the
    default "adapter 0", "adapter 1", ...) when the request has no id for each adapter."""
    ids = config_value(merge_params, "adapter_ids", None)
    if ids is None or isinstance(ids, (str, bytes)):
        return None
    ids = [str(i) for i in ids]
    return ids if len(ids) == count else None


def merge_module_maps(
    adapters: Sequence[tuple[Mapping[str, Mapping[str, tuple[torch.Tensor, str]]], Any]],
    merge_params: Any,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, str]]], Any]:
    """Merge adapters in the LoRAX server's own format; a drop-in for its ``merge_adapters``.

    Args:
        adapters: ``(module_map, adapter_config)`` pairs, where ``module_map[weight_name][k]`` is a
            ``(tensor, param_name)`` pair (``k`` is ``"lora_A"`` or ``"lora_B"``) and the config
            has ``r`` and ``target_modules``.
        merge_params: LoRAX's ``AdapterParameters`` (or any object or mapping with ``weights``,
            ``merge_strategy``, ``density`` and ``majority_sign_method``); the two enums may be
            given by value (``TIES`` = 1) or by name.  Empty ``weights`` mean all ones.
            ``density`` is ignored, and not checked, by the strategies that do not prune
            (``linear``), as in the server.  Its ``adapter_ids``, one per adapter, name the
            adapters in error messages.
        seed: merge seed of ``dare_linear`` / ``dare_ties``; each tensor uses
            ``derive_tensor_seed(seed, param_name)``, as ``lorax-merge --seed`` does for the same
            adapter files.  None draws one from torch's default generator.
        device: where to merge (default: where the tensors are).

    Returns:
        ``(module_map, config)``: the merged module map (every ``(weight_name, k)`` present in
        any adapter, merged over the adapters that have it, with the first adapter's
        ``param_name``) and the merged configuration (see :func:`merge_adapter_configs`).
        Adapters of different dtypes are merged in their common dtype, as the server's
        ``torch.stack`` does.

    Raises:
        ValueError, TypeError: before anything is merged, naming the adapter (by its id), the
            tensor or the argument: differing ranks, no target modules, tensors of one name with
            different shapes, tensors that are not floating-point, unknown enum values, a
            ``density`` that is not a real number >= 0 where the strategy prunes.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters: no adapters to merge")
    strategy = _enum_name(
        config_value(merge_params, "merge_strategy", 0), LORAX_MERGE_STRATEGIES, "merge_strategy"
    )
    method = _enum_name(
        config_value(merge_params, "majority_sign_method", 0),
        LORAX_MAJORITY_SIGN_METHODS,
        "majority_sign_method",
    )
    given = config_value(merge_params, "weights", None) or []
    weights = [check_real(w, f"weights[{i}]") for i, w in enumerate(given)] or None
    density = config_value(merge_params, "density", 1.0)
    density = check_density(density) if STRATEGIES[strategy].uses_density else 1.0
    names = _adapter_names(merge_params, len(adapters))
    labels = adapter_labels(names, len(adapters))
    merged_config = merge_adapter_configs([config for _, config in adapters], names)

    # Each (weight_name, k) is merged under the first adapter's param_name: the tensor's name in
    # the adapter file, so DARE draws the same masks as lorax-merge does on the same files.
    keys: dict[tuple[str, str], str] = {}
    places: dict[str, tuple[str, str]] = {}
    states: list[dict[str, torch.Tensor]] = []
    for label, (module_map, _) in zip(labels, adapters):
        state = {}
        for weight_name, entries in module_map.items():
            for k, (tensor, param_name) in entries.items():
                key = keys.setdefault((weight_name, k), str(param_name))
                if places.setdefault(key, (weight_name, k)) != (weight_name, k):
                    raise ValueError(
                        f"adapters: parameter {key!r} appears under two modules: "
                        f"{places[key]} and, in {label}, {(weight_name, k)}"
                    )
                state[key] = tensor
        states.append(state)
    merged = merge_adapters(
        states,
        weights,
        strategy=strategy,
        density=density,
        majority_sign_method=method,
        seed=seed,
        device=device,
        names=names,
    )
    module_map_out: dict[str, dict[str, tuple[torch.Tensor, str]]] = defaultdict(dict)
    for key, tensor in merged.items():
        weight_name, k = places[key]
        module_map_out[weight_name][k] = (tensor, key)
    return module_map_out, merged_config
