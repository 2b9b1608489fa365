"""LoRA adapter configurations: the LoRAX rules for merging them, and PEFT's scalings.

A configuration is the parsed ``adapter_config.json`` (a mapping) or an object with the same
attributes, such as PEFT's or LoRAX's ``LoraConfig``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "WEIGHTINGS",
    "lora_factor",
    "merge_adapter_configs",
    "peft_factor_weights",
    "peft_scaling",
]

#: How adapter weights are applied: as given (``"lorax"``, as the LoRAX server does) or as PEFT's
#: ``add_weighted_adapter`` applies them (``"peft"``).
WEIGHTINGS = ("lorax", "peft")

_A_PARTS = frozenset({"lora_A", "lora_embedding_A"})
_B_PARTS = frozenset({"lora_B", "lora_embedding_B"})


def check_weighting(weighting: object) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be 'lorax' or 'peft', got {weighting!r}")
    return weighting  # type: ignore[return-value]


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a mapping, ``config.key`` of an object; ``default`` when missing."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def adapter_labels(names: Sequence[str] | None, count: int) -> list[str]:
    """The adapters' names in error messages: ``names``, or ``"adapter 0"``, ``"adapter 1"``, ..."""
    if names is None:
        return [f"adapter {i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"names: expected {count} names (one per adapter), got {len(names)}")
    return names


def _rank(config: Any, name: str) -> int:
    r = config_value(config, "r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"adapter {name!r}: 'r' must be a positive integer, got {r!r}")
    return r


def _target_modules(config: Any, name: str) -> list[str] | str:
    modules = config_value(config, "target_modules")
    if modules is None:
        return []
    if isinstance(modules, str):
        return modules
    if isinstance(modules, (list, tuple, set, frozenset)) and all(
        isinstance(m, str) for m in modules
    ):
        return list(modules)
    raise ValueError(
        f"adapter {name!r}: 'target_modules' must be a list of module names or a regular "
        f"expression, got {modules!r}"
    )


def merge_adapter_configs(
    configs: Sequence[Any],
    names: Sequence[str] | None = None,
    *,
    weighting: Literal["lorax", "peft"] = "lorax",
) -> Any:
    """Merge LoRA adapter configurations with the LoRAX rules.

    * There must be at least one adapter, and all adapters must have the same rank ``r``.
    * The merged configuration is a copy of the first adapter's, with ``target_modules`` the sorted
      union of all adapters' target modules; that union must not be empty.  (Adapters whose
      ``target_modules`` is a regular expression string are combined as ``(re1)|(re2)``; mixing
      strings and lists is an error.)
    * With ``weighting="peft"`` the result is also what PEFT's ``add_weighted_adapter`` writes:
      ``lora_alpha = r`` and empty ``rank_pattern`` / ``alpha_pattern``, since the scalings were
      folded into the tensors; and ``use_rslora = False``, so that the merged adapter's scaling
      is ``lora_alpha / r = 1`` (PEFT keeps the first adapter's ``use_rslora``, which scales an
      rsLoRA merge by ``sqrt(r)`` once more).

    Args:
        configs: one configuration per adapter: mappings (the parsed ``adapter_config.json``) or
            objects with ``r`` and ``target_modules`` attributes, such as PEFT's or LoRAX's
            ``LoraConfig``.
        names: names of the adapters for error messages (default ``"adapter 0"``, ``"adapter 1"``,
            ...).
        weighting: ``"lorax"`` or ``"peft"`` (see above).

    Returns:
        A ``dict`` if the first configuration is a mapping, else a shallow copy of the first object.

    Raises:
        ValueError: no adapters, a missing or invalid rank, differing ranks (the message names every
            adapter and its rank), invalid or empty target modules, or an unknown ``weighting``.
    """
    check_weighting(weighting)
    configs = list(configs)
    if not configs:
        raise ValueError("no adapters to merge")
    labels = adapter_labels(names, len(configs))
    ranks = [_rank(c, n) for c, n in zip(configs, labels)]
    if len(set(ranks)) > 1:
        listed = ", ".join(f"{n} (r={r})" for n, r in zip(labels, ranks))
        raise ValueError(f"adapters must all have the same rank r to be merged, got: {listed}")
    merged_modules = union_target_modules(configs, labels)

    updates: dict[str, Any] = {"target_modules": merged_modules}
    if weighting == "peft":
        updates.update(lora_alpha=ranks[0], rank_pattern={}, alpha_pattern={}, use_rslora=False)
    return updated_config(configs[0], updates)


def union_target_modules(configs: Sequence[Any], labels: Sequence[str]) -> list[str] | str:
    """The merged ``target_modules``: the sorted union of the lists, or the regular expressions
    combined as ``(re1)|(re2)``. Mixing expressions and lists, or an empty union, is an error."""
    modules = [_target_modules(c, n) for c, n in zip(configs, labels)]
    kinds = {isinstance(m, str) for m in modules if m != []}
    if len(kinds) > 1:
        listed = ", ".join(
            f"{n} ({'expression' if isinstance(m, str) else 'list'})"
            for n, m in zip(labels, modules)
        )
        raise ValueError(
            "cannot merge adapters whose target_modules mix regular expressions and lists of "
            "names: " + listed
        )
    if kinds == {True}:
        unique = list(dict.fromkeys(m for m in modules if m))
        merged: list[str] | str = (
            unique[0] if len(unique) == 1 else "|".join(f"({m})" for m in unique)
        )
    else:
        merged = sorted({m for ms in modules for m in ms})
    if not merged:
        raise ValueError("cannot merge adapters that have no target modules: " + ", ".join(labels))
    return merged


def updated_config(first: Any, updates: Mapping[str, Any]) -> Any:
    """A copy of ``first`` with ``updates``: a deep-copied dict for a mapping, else a shallow copy
    of the object with the attributes it has (and ``target_modules``) set."""
    if isinstance(first, Mapping):
        merged = copy.deepcopy(dict(first))
        merged.update(updates)
        return merged
    merged = copy.copy(first)
    for key, value in updates.items():
        if key == "target_modules" or hasattr(merged, key):
            setattr(merged, key, value)
    return merged


def peft_scaling(config: Any, name: str = "adapter") -> float:
    """The scaling PEFT gives an adapter: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).

    Missing ``lora_alpha`` and ``use_rslora`` take PEFT's defaults (8 and ``False``), as when PEFT
    loads the configuration.

    Raises:
        ValueError: invalid ``r`` / ``lora_alpha`` / ``use_rslora``, or a non-empty
            ``rank_pattern`` or ``alpha_pattern`` (per-module ranks and alphas are not supported by
            whole-adapter PEFT weighting).
    """
    r = _rank(config, name)
    alpha = config_value(config, "lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not _finite(alpha):
        raise ValueError(f"adapter {name!r}: 'lora_alpha' must be a finite number, got {alpha!r}")
    rslora = config_value(config, "use_rslora", False)
    if rslora is None:
        rslora = False
    if not isinstance(rslora, bool):
        raise ValueError(f"adapter {name!r}: 'use_rslora' must be true or false, got {rslora!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config_value(config, key)
        if pattern:
            raise ValueError(
                f"adapter {name!r}: a non-empty '{key}' is not supported with PEFT weighting"
            )
    try:
        scaling = float(alpha) / (math.sqrt(r) if rslora else float(r))
    except OverflowError:
        raise ValueError(f"adapter {name!r}: 'r' = {r} is too large") from None
    return scaling


def _finite(value: int | float) -> bool:
    """Whether a JSON number is a finite float (huge ints are not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def peft_factor_weights(weight: float, scaling: float) -> tuple[float, float]:
    """Split ``weight * scaling`` between the LoRA factors as PEFT's ``add_weighted_adapter`` does.

    Returns ``(w_A, w_B)`` with ``w_A = sqrt(|w*s|) * sign(w*s)`` and ``w_B = sqrt(|w*s|)``, where
    the sign of zero is ``+1``, so that ``w_A * w_B == w * s``.
    """
    ws = float(weight) * float(scaling)
    root = math.sqrt(abs(ws))
    return (root if ws >= 0 else -root), root


def lora_factor(name: str) -> Literal["A", "B"] | None:
    """Which LoRA factor a PEFT tensor name holds: ``"A"``, ``"B"`` or None.

    ``"A"`` for names with a ``lora_A`` or ``lora_embedding_A`` component, ``"B"`` for ``lora_B`` or
    ``lora_embedding_B``.
    """
    parts = name.split(".")
    if any(p in _A_PARTS for p in parts):
        return "A"
    if any(p in _B_PARTS for p in parts):
        return "B"
    return None
