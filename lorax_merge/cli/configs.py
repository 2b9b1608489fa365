"""Checking adapter configurations against each other and against their tensors.

The merged adapter is loaded with one configuration, so every field that changes how the
tensors are applied must mean the same for every input adapter; full weights
(``modules_to_save``) and DoRA magnitude vectors are not LoRA factors and are refused unless
their merge is defined (see ``docs/cli.md``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..adapter_configs import lora_factor
from .common import CliError, quoted
from .inputs import Adapter


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _layer_ranges(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and all(_is_int(x) and x >= 0 for x in p) for p in value
    )


_BOOL = (_optional(lambda v: isinstance(v, bool)), "true or false")
_TEXT = (_optional(lambda v: isinstance(v, str)), "a string")
_MODULES = (
    _optional(lambda v: (isinstance(v, str) and v != "") or _names(v)),
    "a list of module names or a regular expression",
)
#: The type and range of every known field: (check, what it must be). Unknown fields pass.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_optional(lambda v: _is_number(v) and math.isfinite(v)), "a finite number"),
    "use_rslora": _BOOL,
    "lora_dropout": (_optional(lambda v: _is_number(v) and 0 <= v <= 1), "a number in [0, 1]"),
    "target_modules": _MODULES,
    "exclude_modules": _MODULES,
    "modules_to_save": (_optional(_names), "a list of module names"),
    "layers_to_transform": (
        _optional(
            lambda v: (
                (_is_int(v) and v >= 0)
                or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v))
            )
        ),
        "a layer index or a list of layer indices",
    ),  # fmt: skip
    "layers_pattern": (_optional(lambda v: isinstance(v, str) or _names(v)), "a name or names"),
    "rank_pattern": (
        _optional(lambda v: isinstance(v, dict) and all(_is_int(x) and x > 0 for x in v.values())),
        "an object mapping module names to positive integer ranks",
    ),  # fmt: skip
    "alpha_pattern": (
        _optional(lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values())),
        "an object mapping module names to numbers",
    ),
    "fan_in_fan_out": _BOOL,
    "bias": (
        _optional(lambda v: v in ("none", "all", "lora_only")),
        "'none', 'all' or 'lora_only'",
    ),
    "use_dora": _BOOL,
    "lora_bias": _BOOL,
    "inference_mode": _BOOL,
    "base_model_name_or_path": _TEXT,
    "revision": _TEXT,
    "task_type": _TEXT,
    "init_lora_weights": (_optional(lambda v: isinstance(v, (bool, str))), "true, false or a name"),
    "layer_replication": (_optional(_layer_ranges), "a list of [start, end] layer ranges"),
}

#: Fields that change how the tensors are applied, with PEFT's default (a missing field or
#: ``null`` means the default). They must agree across the adapters.
APPLY_FIELDS: dict[str, Any] = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "fan_in_fan_out": False,
    "bias": "none",
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "megatron_config": None,
    "megatron_core": "megatron.core",
}
BASE_FIELD = "base_model_name_or_path"
_AVERAGE_OPTION = "--average-modules-to-save"


def _json_text(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fields(adapter: Adapter) -> None:
    """Check the type and range of every known field of the adapter's configuration."""
    for key, (check, what) in _FIELD_RULES.items():
        if key not in adapter.config:
            if key == "r":
                raise CliError(f"{adapter.shown}: 'r' must be {what}, but it is missing")
            continue
        value = adapter.config[key]
        if not check(value):
            raise CliError(f"{adapter.shown}: {key!r} must be {what}, got {_json_text(value)}")


def check_agreement(inputs: Sequence[Adapter], allow_different_base: bool) -> None:
    """Refuse adapters whose fields that change how tensors are applied differ."""
    for key, default in APPLY_FIELDS.items():
        groups: dict[str, list[Adapter]] = {}
        for adapter in inputs:
            value = adapter.config.get(key)
            canonical = json.dumps(default if value is None else value, sort_keys=True)
            groups.setdefault(canonical, []).append(adapter)
        if len(groups) > 1:
            listed = "; ".join(
                f"{', '.join(a.shown for a in members)}: {_json_text(json.loads(value))}"
                for value, members in groups.items()
            )
            raise CliError(
                f"the adapters disagree on {key!r}, which changes how the merged tensors are "
                f"applied ({listed}); merge only adapters that agree on it"
            )
    bases = {a.config.get(BASE_FIELD) for a in inputs} - {None}
    if len(bases) > 1 and not allow_different_base:
        listed = ", ".join(f"{a.shown} ({a.config.get(BASE_FIELD)!r})" for a in inputs)
        raise CliError(
            f"the adapters were trained on different base models: {listed}; "
            "pass --allow-different-base to merge them anyway"
        )


def check_supported(adapter: Adapter, average_full_weights: bool) -> None:
    """Refuse DoRA adapters, and ``modules_to_save`` unless they are to be averaged."""
    if adapter.config.get("use_dora"):
        raise CliError(
            f"{adapter.shown}: a DoRA adapter (use_dora: true); merging DoRA magnitude vectors "
            "is not defined, so DoRA adapters are refused"
        )
    modules = adapter.config.get("modules_to_save")
    if modules and not average_full_weights:
        raise CliError(
            f"{adapter.shown}: modules_to_save {modules} are full weights, which the merge "
            f"would prune and scale like LoRA factors; pass {_AVERAGE_OPTION} to merge them by "
            "weighted average, unpruned"
        )


def check_tensors(adapter: Adapter, average_full_weights: bool) -> None:
    """Check every tensor: a LoRA factor whose rank is ``r`` (or one of ``rank_pattern``),
    no DoRA magnitude vector, and no full weight unless full weights are to be averaged."""
    r = adapter.config["r"]
    ranks = {r, *(adapter.config.get("rank_pattern") or {}).values()}
    others = ", ".join(map(str, sorted(ranks - {r})))
    allowed = f"'r' is {r}" + (f" (or {others} from rank_pattern)" if others else "")
    for name, tensor in adapter.tensors.items():
        parts = name.split(".")
        where = f"{adapter.shown}: tensor {quoted(name)}"
        if "lora_magnitude_vector" in parts:
            raise CliError(
                f"{where} is a DoRA magnitude vector; merging DoRA adapters is not defined, so "
                "they are refused"
            )
        side = lora_factor(name)
        if side is None:
            if not average_full_weights:
                raise CliError(
                    f"{where} is not a LoRA factor but a full weight (as modules_to_save "
                    "writes), which the merge would prune and scale like a factor; pass "
                    f"{_AVERAGE_OPTION} to merge such tensors by weighted average, unpruned"
                )
            continue
        if tensor.dim() == 1 and parts[-1] == "bias":
            continue  # lora_B's bias (lora_bias: true) has no rank dimension
        axis = 0 if side == "A" else 1
        if tensor.dim() < 2 or tensor.shape[axis] not in ranks:
            raise CliError(
                f"{where} has shape {list(tensor.shape)}, but {allowed}: a lora_{side} factor's "
                f"{'first' if axis == 0 else 'second'} dimension is the rank"
            )


def finish_config(config: dict[str, Any], inputs: Sequence[Adapter], averaged: bool) -> None:
    """Adjust the merged configuration: with averaged full weights, ``modules_to_save`` lists
    every adapter's, so that each averaged tensor is loaded."""
    if averaged:
        modules = sorted({m for a in inputs for m in a.config.get("modules_to_save") or []})
        if modules:
            config["modules_to_save"] = modules
