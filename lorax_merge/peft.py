"""A drop-in for PEFT's ``add_weighted_adapter``, with fast exact kernels.

``add_weighted_adapter(model, ...)`` takes the arguments of
``PeftModel.add_weighted_adapter`` (PEFT 0.21) and adds the same adapter: same config (``r``,
``lora_alpha = r``, union of ``target_modules``; ``use_rslora = False``, see below), same factor
layout, same refusals. An existing PEFT program switches with one line::

    import lorax_merge.peft; lorax_merge.peft.patch()   # model.add_weighted_adapter(...) is ours

What differs, on purpose:

* ``svd`` never forms a ``d x k`` matrix (:func:`lorax_merge.lowrank.svd_of_factor_sum`); the
  pruned ``*_svd`` types merge the deltas with the fused kernels, tile by tile, and re-factor
  with a randomized SVD (``svd_driver=None``; an exact one from the Gram matrix of a wide or
  tall module's shorter side); ``svd_driver="exact"`` runs PEFT's dense
  ``torch.linalg.svd`` instead, a named driver that routine.
* Magnitude pruning breaks ties by the lower flat index (``torch.topk`` leaves them
  unspecified); DARE masks come from the seeded counter generator, not ``torch.bernoulli``:
  ``seed=`` makes a merge reproducible (module ``m`` uses ``derive_tensor_seed(seed, m)``),
  except on layers outside the fast path, whose PEFT code draws ``torch.bernoulli`` masks.
* Bad arguments are refused before the model changes (PEFT adds the adapter, then fails), with
  ``ValueError``: a missing density, ``svd_rank < 1``, a weight count that does not match.
* Non-finite factors give NaN (the whole module for the SVD types) instead of an SVD error.
* The merged adapter has ``use_rslora = False``: every type folds each adapter's scaling into the
  factors, so the result must be scaled by exactly 1 (``lora_alpha = r``). PEFT keeps the first
  adapter's flag, and with an rsLoRA first adapter its merge applies ``sqrt(r)`` times the
  merged delta.

Linear, Embedding and Conv2d LoRA layers (``fan_in_fan_out`` too) take the fast path; other
LoRA layer types are merged by PEFT's own per-module code.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ._validation import check_density, check_majority_sign_method
from .api import merge
from .delta import merge_lora_module
from .lowrank import check_svd_clamp, check_svd_driver, torch_driver
from .seeds import check_seed, derive_tensor_seed, draw_seed
from .strategy_table import STRATEGIES, SVD, strategy_names

__all__ = ["add_weighted_adapter", "patch", "unpatch"]

_ORIGINAL: dict[str, Any] = {}


def _lora_model(model: Any) -> Any:
    from peft.tuners.lora import LoraModel

    # A LoraModel forwards unknown attributes to the model it wraps, and a transformers model
    # has a `base_model` of its own: unwrap only what is not a LoraModel yet (a PeftModel).
    inner = model if isinstance(model, LoraModel) else getattr(model, "base_model", model)
    if not isinstance(inner, LoraModel):
        raise ValueError(
            f"model: expected a PeftModel with LoRA adapters (or a LoraModel), got "
            f"{type(model).__name__}"
        )
    return inner


def _check_arguments(
    adapters: Any,
    weights: Any,
    combination_type: Any,
    svd_rank: Any,
    svd_clamp: Any,
    density: Any,
    majority_sign_method: Any,
    seed: Any,
) -> tuple[list[str], list[float], float | None, int | None]:
    types = strategy_names(in_peft=True)
    if not isinstance(combination_type, str) or combination_type not in types:
        raise ValueError(
            f"Invalid combination_type: {combination_type!r}; expected one of {', '.join(types)}"
        )
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters: expected a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ValueError(f"weights: expected a list of numbers, got {weights!r}")
    if len(weights) != len(adapters):
        raise ValueError(
            f"weights: {len(weights)} weights for {len(adapters)} adapters; give one per adapter"
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise ValueError(f"weights: expected numbers, got {w!r}")
    spec = STRATEGIES[combination_type]
    if len(adapters) > 1 and spec.uses_density:
        if density is None:
            raise ValueError(f"density is required with combination_type={combination_type!r}")
        density = check_density(density)
    if len(adapters) > 1 and spec.elects_sign:
        check_majority_sign_method(majority_sign_method)
    if svd_rank is not None:  # any integer type, as PEFT (numpy's too), but not bool
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral):
            raise ValueError(f"svd_rank: expected None or an integer >= 1, got {svd_rank!r}")
        if operator.index(svd_rank) < 1:
            raise ValueError(f"svd_rank: expected None or an integer >= 1, got {svd_rank!r}")
        svd_rank = operator.index(svd_rank)
    check_svd_clamp(svd_clamp)
    check_seed(seed)
    return list(adapters), [float(w) for w in weights], density, svd_rank


def _factors(target: Any, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An adapter's (lora_A, lora_B) parameters in one layer, as PEFT finds them."""
    if adapter in target.lora_A:
        return target.lora_A[adapter].weight, target.lora_B[adapter].weight
    if adapter in target.lora_embedding_A:
        return target.lora_embedding_A[adapter], target.lora_embedding_B[adapter]
    return None


def _has_fast_path(target: Any) -> bool:
    from peft.tuners.lora import layer

    if isinstance(target, layer.Conv2d):
        return target.get_base_layer().groups == 1
    return isinstance(target, (layer.Linear, layer.Embedding))


def _merge_factor_space(
    combination_type: str, found, weights, density, majority_sign_method, seed, key
):
    """PEFT's factor merge: lora_A and lora_B merged apart, with sqrt(|w s|) on each."""
    weights_a, weights_b, tensors_a, tensors_b = [], [], [], []
    for (a, b, scaling), weight in zip(found, weights):
        ws = weight * scaling
        root = math.sqrt(abs(ws))
        weights_a.append(root if ws >= 0 else -root)
        weights_b.append(root)
        tensors_a.append(a.data)
        tensors_b.append(b.data)
    spec = STRATEGIES[combination_type]
    dtype = tensors_a[0].dtype
    results = []
    for side, tensors, side_weights in (("A", tensors_a, weights_a), ("B", tensors_b, weights_b)):
        merged = merge(
            tensors,
            torch.tensor(side_weights, device="cpu"),
            combination_type,
            density=1.0 if density is None else density,
            majority_sign_method=majority_sign_method,
            seed=None if seed is None else derive_tensor_seed(seed, f"{key}.lora_{side}"),
            out_dtype=dtype,
        )
        # PEFT's sum starts from +0: an all-(-0) sum is +0 there. (Not `+ 0.0`, which on the CPU
        # would also rewrite the canonical NaN of a 16-bit result.)
        results.append(merged if spec.elects_sign else merged.masked_fill_(merged == 0, 0.0))
    return results


def _merge_module(lora_model, key, target, new_a, new_b, args) -> None:
    (adapters, weights, combination_type, new_rank, density, method, seed, driver, clamp, full) = (
        args
    )
    present = [(name, w) for name, w in zip(adapters, weights) if _factors(target, name)]
    if not present:
        raise ValueError(
            f"module {key!r}: none of the adapters {adapters} has LoRA weights here, but the "
            f"merged adapter targets it"
        )
    found = [(*_factors(target, name), target.scaling[name]) for name, _ in present]
    present_weights = [w for _, w in present]
    spec = STRATEGIES[combination_type]
    if spec.space == "factor":
        new_a.data, new_b.data = _merge_factor_space(
            combination_type, found, present_weights, density, method, seed, key
        )
        return
    if spec.refactor == "concat":
        # PEFT's code: A_i * w_i * s_i stacked over the B_i, in a zeroed target of rank new_r.
        cat_a = torch.cat([a.data * w * s for (a, _, s), w in zip(found, present_weights)], 0)
        cat_b = torch.cat([b.data for _, b, _ in found], dim=1)
        new_a.data = new_a.data * 0.0
        new_b.data = new_b.data * 0.0
        new_a.data[: cat_a.shape[0]] = cat_a
        new_b.data[:, : cat_b.shape[1]] = cat_b
        return
    if not _has_fast_path(target):
        new_a.data, new_b.data = lora_model._svd_generalized_task_arithmetic_weighted_adapter(
            combination_type,
            [name for name, _ in present],
            present_weights,
            new_rank,
            target,
            new_a,
            new_b,
            density,
            method,
            clamp,
            full_matrices=full,
            driver=torch_driver(driver),
        )
        return
    # PEFT's SVD gives the dtype of the summed deltas: the adapters' dtypes promoted.
    dtype = found[0][0].dtype
    for a, b, _ in found:
        dtype = torch.promote_types(torch.promote_types(dtype, a.dtype), b.dtype)
    lora_a, lora_b = merge_lora_module(
        [a.data.flatten(1) for a, _, _ in found],
        [b.data.flatten(1) for _, b, _ in found],
        [s for _, _, s in found],
        present_weights,
        combination_type,
        rank=new_rank,
        density=1.0 if density is None else density,
        majority_sign_method=method,
        seed=None if seed is None else derive_tensor_seed(seed, key),
        svd_driver=driver,
        svd_clamp=clamp,
        svd_full_matrices=full,
        out_dtype=dtype,
    )
    new_a.data = lora_a.reshape(new_a.shape)
    new_b.data = lora_b.reshape(new_b.shape)


def add_weighted_adapter(
    model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = SVD,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    seed: int | None = None,
) -> None:
    """Add ``adapter_name``, the merge of ``adapters``, to a PEFT LoRA model.

    The arguments and the result are those of ``PeftModel.add_weighted_adapter`` (see the module
    docstring for what differs). ``combination_type`` is one of ``svd``, ``linear``, ``cat``,
    ``ties``, ``ties_svd``, ``dare_ties``, ``dare_linear``, ``dare_ties_svd``,
    ``dare_linear_svd``, ``magnitude_prune``, ``magnitude_prune_svd``; with one adapter, PEFT's
    rule makes every type ``linear``.

    Args:
        model: a ``PeftModel`` with LoRA adapters, or its ``LoraModel``; on the CPU or CUDA.
        svd_driver: ``None`` (fast: exact factor-space SVD for ``svd``, randomized for the
            pruned types), ``"exact"`` (PEFT's dense ``torch.linalg.svd``), ``"gesvd"``,
            ``"gesvdj"``, ``"gesvda"`` (cuSOLVER, CUDA) or ``"gesdd"`` (LAPACK, CPU).
        seed: DARE seed (``None``: drawn from torch's default generator). Layers outside the
            fast path draw PEFT's ``torch.bernoulli`` masks from the global generator instead.

    Raises:
        ValueError: unknown adapters or combination type, a missing density, ranks that differ
            for a factor-space type, ``svd_rank < 1``, a module no chosen adapter has, ... The
            model is unchanged after an error.
    """
    lora_model = _lora_model(model)
    if adapter_name in lora_model.peft_config:
        return  # PEFT's behaviour: an existing name is left alone
    adapters, weights, density, svd_rank = _check_arguments(
        adapters, weights, combination_type, svd_rank, svd_clamp, density,
        majority_sign_method, seed,
    )  # fmt: skip
    combination_type, new_rank, new_target_modules = lora_model._check_add_weighted_adapter(
        adapters=adapters, combination_type=combination_type, svd_rank=svd_rank
    )
    for device in {p.device for n, p in lora_model.model.named_parameters() if "lora_" in n}:
        check_svd_driver(svd_driver, device)
    spec = STRATEGIES[combination_type]
    if seed is None and spec.is_random and density is not None and density < 1:
        seed = draw_seed()
    args = (
        adapters,
        weights,
        combination_type,
        new_rank,
        density,
        majority_sign_method,
        seed,
        svd_driver,
        svd_clamp,
        svd_full_matrices,
    )

    from peft.tuners.lora import LoraLayer
    from peft.utils.other import _freeze_adapter

    lora_model.peft_config[adapter_name] = replace(
        lora_model.peft_config[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        use_rslora=False,  # the scalings are folded into the factors: scaling 1, not sqrt(r)
        target_modules=new_target_modules,
        alpha_pattern={},
        rank_pattern={},
    )
    active = lora_model.active_adapter
    try:
        lora_model.inject_adapter(lora_model.model, adapter_name)
        _freeze_adapter(lora_model.model, adapter_name)
        with torch.no_grad():
            for key, target in list(lora_model.model.named_modules()):
                if lora_model.prefix in key or not isinstance(target, LoraLayer):
                    continue
                new = _factors(target, adapter_name)
                if new is not None:
                    _merge_module(lora_model, key, target, *new, args)
    except BaseException:
        _remove_adapter(lora_model, adapter_name, active)
        raise


def _remove_adapter(lora_model: Any, adapter_name: str, active: Any) -> None:
    """Undo a partly added adapter, leaving the active adapter as it was."""
    if adapter_name in lora_model.peft_config:
        lora_model.delete_adapter(adapter_name)
    lora_model.active_adapter = active


def _method(self: Any, *args: Any, **kwargs: Any) -> None:
    return add_weighted_adapter(self, *args, **kwargs)


_method.__doc__ = add_weighted_adapter.__doc__


def patch() -> None:
    """Make ``PeftModel.add_weighted_adapter`` (PEFT's ``LoraModel`` method) this module's."""
    from peft.tuners.lora import LoraModel

    _ORIGINAL.setdefault("add_weighted_adapter", LoraModel.add_weighted_adapter)
    LoraModel.add_weighted_adapter = _method


def unpatch() -> None:
    """Restore PEFT's own ``add_weighted_adapter``."""
    from peft.tuners.lora import LoraModel

    if "add_weighted_adapter" in _ORIGINAL:
        LoraModel.add_weighted_adapter = _ORIGINAL.pop("add_weighted_adapter")
