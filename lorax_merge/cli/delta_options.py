"""The delta-space strategies in the command: ``--rank``, ``--svd-driver``, the refusal of
``--weighting``, and the merged configuration (``r = lora_alpha = rank``, ``use_rslora`` false).

A delta-space strategy merges each adapter's product ``s·B·A`` (``s`` its own ``lora_alpha / r``,
``lora_alpha / sqrt(r)`` with rsLoRA) and re-factors the result, so the adapters' ranks, alphas
and rsLoRA flags may all differ; ``--weighting`` (how weights meet the factors) does not apply.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..delta_adapters import delta_adapter_config
from ..lowrank import CPU_SVD_DRIVERS, CUDA_SVD_DRIVERS, check_svd_driver
from ..strategy_table import STRATEGIES, strategy_names
from .common import CliError
from .inputs import Adapter

#: ``--svd-driver`` choices: a full SVD of the dense delta as PEFT computes it, then the
#: ``torch.linalg.svd`` routines (cuSOLVER's on CUDA, LAPACK's on the CPU).
SVD_DRIVERS: tuple[str, ...] = ("exact", *CUDA_SVD_DRIVERS, *CPU_SVD_DRIVERS)

DELTA_SPACE = strategy_names(space="delta")
#: Delta-space strategies that truncate by an SVD (the others concatenate the factors exactly).
SVD_STRATEGIES = tuple(name for name in DELTA_SPACE if STRATEGIES[name].uses_svd)
CONCAT_STRATEGIES = tuple(name for name in DELTA_SPACE if not STRATEGIES[name].uses_svd)


def strategy_help() -> str:
    """``--strategy``'s help: the strategies of each space, from the table."""
    factor = ", ".join(strategy_names(space="factor"))
    return (
        f"merge strategy. Factor space ({factor}): the LoRA factors merged element by element, as "
        f"the LoRAX server does. Delta space ({', '.join(DELTA_SPACE)}): each adapter's product "
        "lora_alpha/r*B*A merged, then re-factored to --rank, as PEFT's add_weighted_adapter does"
    )


def is_delta(strategy: str) -> bool:
    """Whether ``strategy`` merges the adapters' deltas rather than their factors."""
    return STRATEGIES[strategy].space == "delta"


def check_options(args: argparse.Namespace, device: Any) -> None:
    """Refuse ``--rank`` / ``--svd-driver`` where they do not apply, an explicit ``--weighting``
    with a delta-space strategy, a rank below 1 and a driver that does not exist on ``device``."""
    strategy, spec = args.strategy, STRATEGIES[args.strategy]
    if spec.space != "delta":
        for option, value, applies_to in (
            ("--rank", args.rank, DELTA_SPACE),
            ("--svd-driver", args.svd_driver, SVD_STRATEGIES),
        ):
            if value is not None:
                raise CliError(
                    f"{option} applies to the strategies {', '.join(applies_to)} only; "
                    f"{strategy} merges the LoRA factors element by element and keeps their rank r"
                )
        return
    if args.weighting is not None:
        raise CliError(
            f"--weighting does not apply to {strategy}: a delta-space strategy merges each "
            "adapter's delta scaled by its own lora_alpha/r (lora_alpha/sqrt(r) with use_rslora), "
            "as PEFT's add_weighted_adapter does, and writes lora_alpha = r; leave --weighting out"
        )
    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be an integer >= 1, got {args.rank}")
    driver = args.svd_driver
    if driver is None:
        return
    if not spec.uses_svd:
        raise CliError(
            f"--svd-driver applies to the strategies that truncate by an SVD "
            f"({', '.join(SVD_STRATEGIES)}); {strategy} concatenates the factors exactly"
        )
    try:
        check_svd_driver(driver, device)
    except ValueError as error:  # a driver that does not exist on the merge's device
        raise CliError("--svd-driver " + str(error).removeprefix("svd_driver: ")) from None


def merge_rank(strategy: str, requested: int | None, inputs: Sequence[Adapter]) -> int:
    """The rank of the merged adapter: ``--rank``, else the largest ``r`` of the inputs (the sum
    of their ``r`` for a strategy that concatenates, which needs at least that sum)."""
    ranks = [int(a.config["r"]) for a in inputs]
    if STRATEGIES[strategy].uses_svd:
        return max(ranks) if requested is None else requested
    total = sum(ranks)
    if requested is not None and requested < total:
        listed = ", ".join(f"{a.shown} (r={r})" for a, r in zip(inputs, ranks))
        raise CliError(
            f"--rank {requested}: {strategy} concatenates the adapters' factors and needs a rank "
            f">= {total}, the sum of their ranks: {listed}"
        )
    return total if requested is None else requested


def delta_config(inputs: Sequence[Adapter], rank: int) -> dict[str, Any]:
    """The merged configuration: the first adapter's, with ``r = lora_alpha = rank``,
    ``use_rslora`` false and the union of the target modules."""
    for adapter in inputs:
        for key in ("rank_pattern", "alpha_pattern"):
            if adapter.config.get(key):
                raise CliError(
                    f"{adapter.shown}: a non-empty {key!r} gives modules their own rank or alpha, "
                    "which the delta-space strategies do not read; they scale every module by the "
                    "adapter's lora_alpha and r"
                )
    try:
        return delta_adapter_config([a.config for a in inputs], rank, [a.shown for a in inputs])
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
