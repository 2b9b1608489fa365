"""Merging whole LoRA adapters: state dicts, configurations and seeds.

A LoRA adapter is a mapping from tensor name to tensor (a PEFT adapter state dict) plus a
configuration (``adapter_config.json``).  This module merges such adapters the way the LoRAX server
does:

* every tensor name is merged over the adapters that contain it, with the weights of those adapters
  only;
* the merged configuration is the first adapter's, with ``target_modules`` the sorted union of all
  of them, and all adapters must have the same rank ``r``.

It can also reproduce PEFT's ``add_weighted_adapter`` (``weighting="peft"``), which folds every
adapter's scaling into its weights and splits the weight between the two LoRA factors.

Random pruning (``dare_linear`` and ``dare_ties``) draws every tensor's mask from its own seed,
derived from the merge seed and the tensor's name by :func:`derive_tensor_seed`, so results depend
neither on the order of the dictionary entries nor on the device nor on how the tensors are batched.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "STRATEGIES",
    "RANDOM_STRATEGIES",
    "derive_tensor_seed",
    "lora_factor",
    "merge_adapter_configs",
    "merge_adapters",
    "merge_module_maps",
    "peft_factor_weights",
    "peft_scaling",
]

#: Strategy names accepted by :func:`merge_adapters`.
STRATEGIES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Strategies that prune at random and therefore use a seed.
RANDOM_STRATEGIES: frozenset[str] = frozenset({"dare_linear", "dare_ties"})
#: Majority sign methods of the sign-electing strategies.
MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
#: Tensor dtypes that can be merged.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
)

#: Largest seed value (seeds are 63-bit non-negative integers).
MAX_SEED = (1 << 63) - 1
_SEED_PERSON = b"lorax-merge/seed"  # blake2b personalisation string (16 bytes)

# Tensors of one merge_many call: at most this many groups and about this many bytes of input.
_CHUNK_GROUPS = 64
_CHUNK_BYTES = 256 << 20

_A_PARTS = frozenset({"lora_A", "lora_embedding_A"})
_B_PARTS = frozenset({"lora_B", "lora_embedding_B"})


# -------------------------------------------------------------------------------------------- seeds
def derive_tensor_seed(seed: int, name: str) -> int:
    """Derive the seed of one tensor from the merge seed and the tensor's name.

    The derivation is stable across processes, platforms and versions of this package::

        digest = blake2b(seed.to_bytes(8, "little") + name.encode("utf-8"),
                         digest_size=8, person=b"lorax-merge/seed")
        tensor_seed = int.from_bytes(digest, "little") & (2**63 - 1)

    Args:
        seed: the merge seed, an integer in ``[0, 2**63 - 1]``.
        name: the tensor's name in the adapter state dict.

    Returns:
        A non-negative 63-bit integer.

    Raises:
        ValueError: if ``seed`` is out of range.
        TypeError: if ``seed`` is not an integer or ``name`` is not a string.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    digest = hashlib.blake2b(
        seed.to_bytes(8, "little") + name.encode("utf-8"), digest_size=8, person=_SEED_PERSON
    ).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


# ----------------------------------------------------------------------------------------- configs
def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"adapter {i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"names: expected {count} names (one per adapter), got {len(names)}")
    return names


def _rank(config: Any, name: str) -> int:
    r = _get(config, "r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"adapter {name!r}: 'r' must be a positive integer, got {r!r}")
    return r


def _target_modules(config: Any, name: str) -> list[str] | str:
    modules = _get(config, "target_modules")
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
      folded into the tensors.

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
    if weighting not in ("lorax", "peft"):
        raise ValueError(f"weighting must be 'lorax' or 'peft', got {weighting!r}")
    configs = list(configs)
    if not configs:
        raise ValueError("no adapters to merge")
    labels = _names(names, len(configs))
    ranks = [_rank(c, n) for c, n in zip(configs, labels)]
    if len(set(ranks)) > 1:
        listed = ", ".join(f"{n} (r={r})" for n, r in zip(labels, ranks))
        raise ValueError(f"adapters must all have the same rank r to be merged, got: {listed}")
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
        merged_modules: list[str] | str = (
            unique[0] if len(unique) == 1 else "|".join(f"({m})" for m in unique)
        )
    else:
        merged_modules = sorted({m for ms in modules for m in ms})
    if not merged_modules:
        raise ValueError("cannot merge adapters that have no target modules: " + ", ".join(labels))

    first = configs[0]
    updates: dict[str, Any] = {"target_modules": merged_modules}
    if weighting == "peft":
        updates.update(lora_alpha=ranks[0], rank_pattern={}, alpha_pattern={})
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
    alpha = _get(config, "lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not _finite(alpha):
        raise ValueError(f"adapter {name!r}: 'lora_alpha' must be a finite number, got {alpha!r}")
    rslora = _get(config, "use_rslora", False)
    if rslora is None:
        rslora = False
    if not isinstance(rslora, bool):
        raise ValueError(f"adapter {name!r}: 'use_rslora' must be true or false, got {rslora!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = _get(config, key)
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


# ----------------------------------------------------------------------------------------- tensors
def _weights_list(weights: Any, count: int) -> tuple[list[float], torch.Tensor | None]:
    """Return the weights as floats, and the tensor the caller gave (None for a sequence)."""
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
        return [float(x) for x in weights.detach().cpu().tolist()], weights.detach()
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


def _check_params(
    strategy: str, density: float, majority_sign_method: str, seed: int | None
) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density: expected a number, got {density!r}")
    if math.isnan(density) or density < 0:
        raise ValueError(f"density: must be >= 0, got {density!r}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method: unknown method {majority_sign_method!r}; "
            "expected 'total' or 'frequency'"
        )
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed: must be in [0, 2**63 - 1], got {seed}")


def _collect(
    adapters: Sequence[Mapping[str, torch.Tensor]], labels: list[str], device: torch.device | None
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Group the tensors by name (names sorted), checking types, dtypes and shapes."""
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
                    "only float32, float16, bfloat16 and float64 tensors can be merged"
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
        dtype = first.dtype
        for _, t in members[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        target = device if device is not None else first.device
        result[name] = [(i, t.to(device=target, dtype=dtype)) for i, t in members]
    return result


def merge_adapters(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    strategy: str = "linear",
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
        strategy: ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``.
        density: fraction of each task tensor kept by pruning (ignored by ``linear``).
        majority_sign_method: ``total`` or ``frequency`` (``ties`` and ``dare_ties``).
        seed: merge seed for the random strategies; tensor ``name`` is merged with
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
            with a single adapter the strategy becomes ``linear``, as in PEFT.
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
    import lorax_merge  # the package's core; imported here because the package imports this module

    from .strategy_table import STRATEGIES as STRATEGY_TABLE

    if isinstance(strategy, str) and getattr(STRATEGY_TABLE.get(strategy), "space", "") == "delta":
        from .delta_adapters import merge_state_dicts_delta

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

    if (
        isinstance(adapters, Mapping)
        or isinstance(adapters, (str, bytes))
        or not isinstance(adapters, Sequence)
    ):
        raise TypeError(
            "adapters: expected a sequence of state dicts (mappings from tensor name to tensor)"
        )
    count = len(adapters)
    if count == 0:
        raise ValueError("adapters: no adapters to merge")
    labels = _names(names, count)
    weight_values, weight_tensor = _weights_list(weights, count)
    _check_params(strategy, density, majority_sign_method, seed)
    if weighting not in ("lorax", "peft"):
        raise ValueError(f"weighting: must be 'lorax' or 'peft', got {weighting!r}")
    factor_weights: list[tuple[float, float]] = []
    if weighting == "peft":
        if scalings is None or len(scalings) != count:
            raise ValueError(
                f"scalings: weighting='peft' needs one scaling per adapter ({count}), got "
                f"{None if scalings is None else len(scalings)}"
            )
        factor_weights = [peft_factor_weights(w, s) for w, s in zip(weight_values, scalings)]
        if count == 1:
            strategy = "linear"
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

    base_seed = None
    if strategy in RANDOM_STRATEGIES:
        base_seed = lorax_merge.draw_seed() if seed is None else seed

    def group_weights(name: str, members: list[tuple[int, torch.Tensor]]) -> Any:
        idx = [i for i, _ in members]
        if weighting == "peft":
            side = 0 if lora_factor(name) == "A" else 1
            return [factor_weights[i][side] for i in idx]
        if weight_tensor is not None:
            return weight_tensor.to(members[0][1].device)[
                torch.tensor(idx, device=members[0][1].device)
            ]
        return [weight_values[i] for i in idx]

    # Batches share one output dtype and one device; each holds at most _CHUNK_GROUPS tensors and
    # about _CHUNK_BYTES bytes of input.
    batches: dict[tuple[Any, str], list[list[str]]] = {}
    sizes: dict[tuple[Any, str], int] = {}
    for name, members in groups.items():
        first = members[0][1]
        key = (first.dtype if out_dtype == "input" else out_dtype, str(first.device))
        nbytes = sum(t.numel() * t.element_size() for _, t in members)
        chunks = batches.setdefault(key, [[]])
        if chunks[-1] and (
            len(chunks[-1]) >= _CHUNK_GROUPS or sizes.get(key, 0) + nbytes > _CHUNK_BYTES
        ):
            chunks.append([])
            sizes[key] = 0
        chunks[-1].append(name)
        sizes[key] = sizes.get(key, 0) + nbytes

    results: dict[str, torch.Tensor] = {}
    for (dtype, _), chunks in batches.items():
        for chunk in chunks:
            merged = lorax_merge.merge_many(
                [[t for _, t in groups[name]] for name in chunk],
                [group_weights(name, groups[name]) for name in chunk],
                strategy=strategy,
                density=float(density),
                majority_sign_method=majority_sign_method,
                seed=None
                if base_seed is None
                else [derive_tensor_seed(base_seed, name) for name in chunk],
                out_dtype=dtype,
            )
            results.update(zip(chunk, merged))
            if progress is not None:
                progress(len(chunk))
    return {name: results[name] for name in groups}


# ----------------------------------------------------------------------------------- LoRAX server
#: LoRAX's ``MergeStrategy`` and ``MajoritySignMethod`` protobuf enums, in value order.
LORAX_MERGE_STRATEGIES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")
LORAX_MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")


def _enum_name(value: Any, names: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value.lower() in names:
        return value.lower()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    raise ValueError(f"{what}: unknown value {value!r}; expected one of {', '.join(names)}")


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
        seed: merge seed of ``dare_linear`` / ``dare_ties``; each tensor uses
            ``derive_tensor_seed(seed, param_name)``, as ``lorax-merge --seed`` does for the same
            adapter files.  None draws one from torch's default generator.
        device: where to merge (default: where the tensors are).

    Returns:
        ``(module_map, config)``: the merged module map (every ``(weight_name, k)`` present in
        any adapter, merged over the adapters that have it, with the first adapter's
        ``param_name``) and the merged configuration (see :func:`merge_adapter_configs`).
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters: no adapters to merge")
    strategy = _enum_name(
        _get(merge_params, "merge_strategy", 0), LORAX_MERGE_STRATEGIES, "merge_strategy"
    )
    method = _enum_name(
        _get(merge_params, "majority_sign_method", 0),
        LORAX_MAJORITY_SIGN_METHODS,
        "majority_sign_method",
    )
    weights = [float(w) for w in (_get(merge_params, "weights", None) or [])] or None
    density = float(_get(merge_params, "density", 1.0))
    merged_config = merge_adapter_configs([config for _, config in adapters])

    # Each (weight_name, k) is merged under the first adapter's param_name: the tensor's name in
    # the adapter file, so DARE draws the same masks as lorax-merge does on the same files.
    keys: dict[tuple[str, str], str] = {}
    places: dict[str, tuple[str, str]] = {}
    states: list[dict[str, torch.Tensor]] = []
    for module_map, _ in adapters:
        state = {}
        for weight_name, entries in module_map.items():
            for k, (tensor, param_name) in entries.items():
                key = keys.setdefault((weight_name, k), str(param_name))
                if places.setdefault(key, (weight_name, k)) != (weight_name, k):
                    raise ValueError(
                        f"adapters: parameter {key!r} appears under two modules: "
                        f"{places[key]} and {(weight_name, k)}"
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
    )
    module_map_out: dict[str, dict[str, tuple[torch.Tensor, str]]] = defaultdict(dict)
    for key, tensor in merged.items():
        weight_name, k = places[key]
        module_map_out[weight_name][k] = (tensor, key)
    return module_map_out, merged_config
