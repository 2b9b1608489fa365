"""The merge: LoRA factors with the chosen strategy, full weights (``modules_to_save``) by
weighted average, and the refusal of NaN and infinities that the library would pass through."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..adapter_configs import lora_factor
from ..adapters import merge_adapters
from ..delta_adapters import merge_adapters_delta
from .common import CliError, one_line, quoted
from .delta_options import is_delta
from .inputs import Adapter
from .report import MergePlan, Progress

_F32_MAX = torch.finfo(torch.float32).max
_ALLOW = "pass --allow-nonfinite to"


def _nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, infinity count) of a floating-point tensor."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return 0, 0
    nan = int(torch.isnan(tensor).sum())
    return nan, int((~finite).sum()) - nan


def _counted(nan: int, inf: int) -> str:
    parts = [f"{nan:,} NaN"] if nan else []
    parts += [f"{inf:,} infinite value{'s' if inf != 1 else ''}"] if inf else []
    return " and ".join(parts)


def check_finite_inputs(inputs: Sequence[Adapter]) -> None:
    """Refuse an input tensor that holds NaN or an infinity."""
    for adapter in inputs:
        for name in sorted(adapter.tensors):
            nan, inf = _nonfinite(adapter.tensors[name])
            if nan or inf:
                raise CliError(
                    f"{adapter.shown}: tensor {quoted(name)} holds {_counted(nan, inf)}: a "
                    f"damaged adapter or a diverged training run; {_ALLOW} merge it anyway"
                )


def _likely_cause(
    plan: MergePlan, inputs: Sequence[Adapter], scalings: list[float] | None, dtype: torch.dtype
) -> str:
    for weight in plan.weights:
        if abs(weight) > _F32_MAX:
            return (
                f"the weight {weight:g} is beyond float32's range (largest about 3.4e38), in "
                "which the merge computes"
            )
    for adapter, weight, scaling in zip(inputs, plan.weights, scalings or []):
        product = weight * scaling
        if not math.isfinite(product) or math.sqrt(abs(product)) > _F32_MAX:
            return (
                f"with --weighting peft, the weight times lora_alpha/r of {adapter.shown} "
                f"({weight:g} x {scaling:g}) is beyond float32's range"
            )
    if dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        return (
            f"the merged values exceed {name}'s range (largest {torch.finfo(dtype).max:g}); "
            "try --dtype float32"
        )
    return "the weighted sum exceeds float32's range (largest about 3.4e38)"


def check_finite_outputs(
    tensors: dict[str, torch.Tensor],
    plan: MergePlan,
    inputs: Sequence[Adapter],
    scalings: list[float] | None,
) -> None:
    """Refuse a merged tensor that holds NaN or an infinity (the inputs being finite)."""
    offenders = []
    for name, tensor in tensors.items():
        nan, inf = _nonfinite(tensor)
        if nan or inf:
            offenders.append((name, nan, inf))
    if not offenders:
        return
    name, nan, inf = offenders[0]
    more = f" (and {len(offenders) - 1} more tensors)" if len(offenders) > 1 else ""
    cause = _likely_cause(plan, inputs, scalings, tensors[name].dtype)
    raise CliError(
        f"merged tensor {quoted(name)} holds {_counted(nan, inf)}{more} although every input is "
        f"finite; likely cause: {cause}. Nothing was written ({_ALLOW} write it anyway)"
    )


def _average_full_weights(
    groups: dict[str, list[tuple[int, torch.Tensor]]],
    inputs: Sequence[Adapter],
    weights: Sequence[float],
    device: torch.device,
    out_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Each tensor's weighted average over the adapters that hold it: sum(w_i t_i) / sum(w_i)."""
    results = {}
    for name in sorted(groups):
        members = groups[name]
        first_i, first = members[0]
        for i, tensor in members[1:]:
            if tensor.shape != first.shape:
                raise CliError(
                    f"tensor {quoted(name)} has shape {list(first.shape)} in "
                    f"{inputs[first_i].shown} but {list(tensor.shape)} in {inputs[i].shown}"
                )
        total = math.fsum(weights[i] for i, _ in members)
        if total == 0:
            raise CliError(
                f"tensor {quoted(name)}: the weights of the adapters that hold it sum to 0, so "
                "their weighted average is undefined"
            )
        dtype = first.dtype
        for _, tensor in members[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        average = torch.zeros(first.shape, dtype=accumulate, device=device)
        for i, tensor in members:
            average.add_(tensor.to(device=device, dtype=accumulate), alpha=weights[i] / total)
        results[name] = average.to(out_dtype or dtype)
    return results


def merge(
    plan: MergePlan,
    inputs: Sequence[Adapter],
    scalings: list[float] | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Merge every tensor; returns the results on the CPU, contiguous, with sorted names.

    LoRA factors go through :func:`lorax_merge.merge_adapters` (factor-space strategies) or
    :func:`lorax_merge.delta_adapters.merge_adapters_delta` (delta-space ones, each adapter scaled
    by its own configuration); other tensors (full weights, present only when they are to be
    averaged) are averaged with the raw weights.
    """
    factors: list[dict[str, torch.Tensor]] = []
    full: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, adapter in enumerate(inputs):
        factors.append({})
        for name, tensor in adapter.tensors.items():
            if lora_factor(name) is None:
                full.setdefault(name, []).append((i, tensor))
            else:
                factors[i][name] = tensor
    out_dtype = None if plan.dtype == "auto" else getattr(torch, plan.dtype)
    progress = Progress(len({n for f in factors for n in f}) + len(full), "merging")
    options = {
        "strategy": plan.strategy,
        "density": plan.density,
        "majority_sign_method": plan.majority_sign_method,
        "seed": plan.seed,
        "device": device,
        "out_dtype": out_dtype or "input",
        "names": [a.shown for a in inputs],
        "progress": progress.update,
    }
    try:
        if is_delta(plan.strategy):
            configs = [a.config for a in inputs]
            merged, _ = merge_adapters_delta(
                factors, configs, plan.weights, rank=plan.rank, svd_driver=plan.svd_driver,
                **options,
            )  # fmt: skip
        else:
            merged = merge_adapters(
                factors, plan.weights, weighting=plan.weighting, scalings=scalings, **options
            )
        merged.update(_average_full_weights(full, inputs, plan.weights, device, out_dtype))
        progress.update(len(full))
    except (ValueError, TypeError) as exc:
        raise CliError(one_line(str(exc))) from None
    finally:
        progress.close()
    for adapter in inputs:
        adapter.tensors = {}
    return {name: merged[name].detach().to("cpu").contiguous() for name in sorted(merged)}
