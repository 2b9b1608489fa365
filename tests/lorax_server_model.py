"""The LoRAX server's adapter merge, step by step, to test the drop-ins in the server's own terms.

The server merges a request's adapters in ``lorax_server/utils/merges/strategies.py``:
``merge_adapters(adapters, merge_params)`` takes ``(module_map, lora_config)`` pairs, where
``module_map[weight_name][k] = (tensor, param_name)``, and the request's ``AdapterParameters``.
:func:`merge_adapters` here does what that function does, in the same order:

* the strategy name is the ``MergeStrategy`` enum's name, lower-cased; the weights are
  ``torch.tensor(weights)`` (float32), or ``torch.ones(n)`` when the request has none;
* the strategy object is built as ``registry[name](density=..., majority_sign_method=...)``;
* tensors are grouped by ``weight_name``, ``k`` and ``param_name``; the weights of a group are those
  of the adapters that have its ``weight_name``, in adapter order;
* the configs must share one rank ``r`` and have some target module; the merged config is a shallow
  copy of the first with ``target_modules = sorted(set(...))`` over every config's modules.

The per-tensor strategies are the server's code from ``benchmarks/upstream.py`` (magnitude pruning
with ``torch.topk``, random pruning with ``torch.bernoulli`` and its rescale discarded, ``stack``,
weights by broadcasting, sign election on the stack, ``sum(dim=0)``).  Passing ``lorax_merge``'s
``strategy_registry`` as ``registry`` gives the server's loop around our classes: the second
integration option of ``docs/lorax-server.md``.
"""

from __future__ import annotations

import copy
import struct
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import upstream

#: The server's protobuf enums, in value order.
MERGE_STRATEGY_ENUM: tuple[str, ...] = ("LINEAR", "TIES", "DARE_LINEAR", "DARE_TIES")
MAJORITY_SIGN_METHOD_ENUM: tuple[str, ...] = ("TOTAL", "FREQUENCY")

ModuleMap = Mapping[str, Mapping[str, tuple[torch.Tensor, str]]]


def as_float32(value: float) -> float:
    """A Python float rounded to float32, as a protobuf ``float`` field stores it."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _enum_value(value: int | str, names: tuple[str, ...]) -> int:
    return names.index(value) if isinstance(value, str) else value


@dataclass
class AdapterParameters:
    """The request's ``AdapterParameters`` message as the server reads it.

    Like the protobuf class, an enum field may be set by name and reads back as its number, and the
    ``float`` fields hold float32 values.
    """

    adapter_ids: list[str]
    weights: list[float] = field(default_factory=list)
    merge_strategy: int | str = 0
    density: float = 1.0
    majority_sign_method: int | str = 0

    def __post_init__(self) -> None:
        self.merge_strategy = _enum_value(self.merge_strategy, MERGE_STRATEGY_ENUM)
        self.majority_sign_method = _enum_value(
            self.majority_sign_method, MAJORITY_SIGN_METHOD_ENUM
        )
        self.weights = [as_float32(w) for w in self.weights]
        self.density = as_float32(self.density)


@dataclass
class LoraConfig:
    """The fields of the server's LoRA adapter configuration."""

    r: int
    target_modules: Any
    lora_alpha: int = 16
    base_model_name_or_path: str = "base"
    fan_in_fan_out: bool = False
    use_rslora: bool = False


class _ServerStrategy:
    """One of the server's strategy objects: parameters bound to an ``upstream`` merge function."""

    def __init__(self, merge: Callable[..., torch.Tensor], **params: Any) -> None:
        self._merge = merge
        self._params = params

    def merge(self, task_tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        return self._merge(list(task_tensors), weights, **self._params)


def server_registry(apply_rescale: bool = False) -> dict[str, Callable[..., _ServerStrategy]]:
    """The server's ``strategy_registry``; ``apply_rescale=True`` keeps DARE's discarded rescale."""

    def linear(**kwargs: Any) -> _ServerStrategy:
        return _ServerStrategy(upstream.linear)

    def ties(density: float, majority_sign_method: str = "total", **kwargs: Any):
        return _ServerStrategy(
            upstream.ties, density=density, majority_sign_method=majority_sign_method
        )

    def dare_linear(density: float, **kwargs: Any) -> _ServerStrategy:
        return _ServerStrategy(upstream.dare_linear, density=density, apply_rescale=apply_rescale)

    def dare_ties(density: float, majority_sign_method: str = "total", **kwargs: Any):
        return _ServerStrategy(
            upstream.dare_ties,
            density=density,
            majority_sign_method=majority_sign_method,
            apply_rescale=apply_rescale,
        )

    return {"linear": linear, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties}


def merge_order(adapters: Sequence[tuple[ModuleMap, Any]]) -> list[tuple[str, list[torch.Tensor]]]:
    """``(param_name, tensors)`` of every merged tensor, in the order the server merges them."""
    grouped: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for module_map, _ in adapters:
        for weight_name, entries in module_map.items():
            for k, (tensor, param_name) in entries.items():
                grouped[weight_name][k][param_name].append(tensor)
    return [
        (param_name, tensors)
        for by_k in grouped.values()
        for by_name in by_k.values()
        for param_name, tensors in by_name.items()
    ]


def merge_adapters(
    adapters: Sequence[tuple[ModuleMap, Any]],
    merge_params: AdapterParameters,
    registry: Mapping[str, Callable[..., Any]] | None = None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, str]]], Any]:
    """The server's ``merge_adapters``, with its own strategies unless ``registry`` is given."""
    strategy_name = MERGE_STRATEGY_ENUM[merge_params.merge_strategy].lower()
    weights = merge_params.weights
    weights = torch.tensor(weights) if weights else torch.ones(len(adapters))
    method = MAJORITY_SIGN_METHOD_ENUM[merge_params.majority_sign_method].lower()
    registry = server_registry() if registry is None else registry
    strategy = registry[strategy_name](density=merge_params.density, majority_sign_method=method)

    grouped: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    adapter_indices: dict[str, list[int]] = defaultdict(list)
    configs = []
    for idx, (module_map, config) in enumerate(adapters):
        for weight_name, entries in module_map.items():
            adapter_indices[weight_name].append(idx)
            for k, (tensor, param_name) in entries.items():
                grouped[weight_name][k][param_name].append(tensor)
        configs.append(config)
    _validate_configs(configs)

    merged: dict[str, dict[str, tuple[torch.Tensor, str]]] = defaultdict(dict)
    for weight_name, by_k in grouped.items():
        group_weights = weights[adapter_indices[weight_name]]
        for k, by_name in by_k.items():
            for param_name, tensors in by_name.items():
                merged[weight_name][k] = (strategy.merge(tensors, group_weights), param_name)
    return merged, _merge_configs(configs)


def _validate_configs(configs: Sequence[Any]) -> None:
    ranks = {config.r for config in configs}
    if len(ranks) > 1:
        raise ValueError(f"unable to merge adapters, lora configs have different ranks: {ranks}")
    if all(len(config.target_modules) == 0 for config in configs):
        raise ValueError("unable to merge adapters, lora configs have no target modules")


def _merge_configs(configs: Sequence[Any]) -> Any:
    merged = copy.copy(configs[0])
    merged.target_modules = sorted({m for config in configs for m in config.target_modules})
    return merged
