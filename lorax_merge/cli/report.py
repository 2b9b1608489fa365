"""What the command tells: the provenance file, the summary line and the progress bar."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..strategy_table import STRATEGIES
from .common import CONFIG_NAME, PROVENANCE_NAME, SAFETENSORS_NAME, one_line, show
from .inputs import Adapter

PROVENANCE_FORMAT = "lorax-merge provenance"
PROVENANCE_VERSION = 1
SEED_DERIVATION = (
    "tensor seed = int.from_bytes(blake2b(seed.to_bytes(8, 'little') + name.encode('utf-8'), "
    "digest_size=8, person=b'lorax-merge/seed').digest(), 'little') & (2**63 - 1)  "
    "(lorax_merge.adapters.derive_tensor_seed)"
)


@dataclass
class MergePlan:
    """The merge as it was run: what the provenance and the summary report."""

    strategy: str
    weighting: str | None  # None for delta-space strategies, which --weighting does not apply to
    weights: list[float]
    density: float
    majority_sign_method: str
    seed: int | None
    seed_given: bool
    dtype: str
    device: str
    allow_different_base: bool = False
    allow_nonfinite: bool = False
    average_modules_to_save: bool = False
    differences_from_peft: list[str] = field(default_factory=list)
    rank: int | None = None  # delta-space strategies: the merged rank
    svd_driver: str | None = None  # delta-space strategies: --svd-driver, None for the default


def provenance(
    plan: MergePlan,
    inputs: Sequence[Adapter],
    tensors: dict[str, Any],
    output_files: dict[str, str],
) -> dict[str, Any]:
    """The content of ``merge_provenance.json``; ``output_files`` maps file name to sha256."""
    import torch

    import lorax_merge

    return {
        "format": PROVENANCE_FORMAT,
        "format_version": PROVENANCE_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lorax_merge_version": str(lorax_merge.__version__),
        "torch_version": str(torch.__version__),
        "inputs": [{"path": str(a.path), "files": a.files} for a in inputs],
        "strategy": plan.strategy,
        "weighting": plan.weighting,
        "weights": plan.weights,
        "density": plan.density,
        "majority_sign_method": plan.majority_sign_method,
        "rank": plan.rank,
        "svd_driver": plan.svd_driver,
        "seed": plan.seed,
        "seed_derivation": SEED_DERIVATION if plan.seed is not None else None,
        "dtype": plan.dtype,
        "device": plan.device,
        "allow_different_base": plan.allow_different_base,
        "allow_nonfinite": plan.allow_nonfinite,
        "average_modules_to_save": plan.average_modules_to_save,
        "differences_from_peft": plan.differences_from_peft,
        "output": {
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "files": [
                {"name": name, "sha256": output_files[name]}
                for name in (SAFETENSORS_NAME, CONFIG_NAME)
            ],
        },
    }


def summary(
    plan: MergePlan,
    inputs: Sequence[Adapter],
    output_arg: str,
    tensors: dict[str, Any],
    config: dict[str, Any],
    elapsed: float,
) -> str:
    """The one paragraph printed on stdout after a merge."""
    spec = STRATEGIES[plan.strategy]
    names = ", ".join(os.path.basename(os.path.normpath(a.arg)) or a.arg for a in inputs)
    params = [f"weights {' '.join(f'{w:g}' for w in plan.weights)}"]
    if plan.weighting is not None:
        params.append(f"{plan.weighting} weighting")
    if spec.uses_svd:
        params.append(f"svd driver {plan.svd_driver or 'default'}")
    if spec.uses_density:
        params.insert(0, f"density {plan.density:g}")
    if spec.elects_sign:
        params.insert(1, f"majority sign {plan.majority_sign_method}")
    if plan.seed is not None:
        params.append(f"seed {plan.seed}" + ("" if plan.seed_given else " (drawn)"))
    modules = config.get("target_modules")
    modules_text = ", ".join(modules) if isinstance(modules, list) else str(modules)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    parameters = sum(t.numel() for t in tensors.values())
    plural = "s" if len(inputs) != 1 else ""
    return (
        f"Merged {len(inputs)} adapter{plural} ({one_line(names, 200)}) with {plan.strategy} "
        f"({', '.join(params)}) into {show(output_arg)}: {len(tensors)} tensors, "
        f"{parameters:,} parameters, rank {config.get('r')}, target modules {modules_text}, "
        f"{'/'.join(dtypes)}, merged on {plan.device} in {elapsed:.2f} s; provenance in "
        f"{PROVENANCE_NAME}."
    )


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A one-line progress bar of merged tensors on stderr (tqdm's), drawn only when stderr is a
    terminal and tqdm is installed (the ``cli`` extra); otherwise nothing is drawn."""

    def __init__(self, total: int, label: str) -> None:
        self._bar = None
        if total <= 0 or not stderr_is_terminal():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total,
            desc=label,
            unit="tensor",
            file=sys.stderr,
            leave=False,
            ascii=" #",
            bar_format="{desc} [{bar:30}] {n_fmt}/{total_fmt} tensors",
        )

    def update(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
