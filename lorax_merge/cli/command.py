"""Arguments, the run as a sequence of named steps, and ``main`` with its exit codes."""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..strategy_table import LINEAR, STRATEGIES, strategy_names
from . import output as out_folder
from . import report
from .common import (
    CONFIG_NAME,
    PROG,
    PROVENANCE_NAME,
    SAFETENSORS_NAME,
    CliError,
    json_bytes,
    one_line,
    sha256_bytes,
    sha256_file,
)
from .inputs import Adapter, check_input_dir, load_config, load_tensors

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_MAX_SEED = (1 << 63) - 1
#: Set to 1 (or true, yes, on) to re-raise unexpected errors with their traceback.
TRACEBACK_VARIABLE = "LORAX_MERGE_TRACEBACK"


class _Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so that the temporary output is removed."""


# ---------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {PROG} --help)")


def _parser() -> argparse.ArgumentParser:
    # The command merges LoRA factors element by element: the factor-space rows of the table.
    random_names = " / ".join(strategy_names(space="factor", random=True))
    parser = _Parser(
        prog=PROG,
        description=(
            "Merge PEFT LoRA adapter folders with the LoRAX merge strategies and write the result "
            "as a new PEFT adapter folder (adapter_config.json + adapter_model.safetensors + "
            "merge_provenance.json)."
        ),
        epilog="Bad inputs are reported on one line with exit code 2. See docs/cli.md for details.",
    )
    parser.add_argument(
        "adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA adapter folders to merge"
    )
    parser.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="folder to write the merged adapter to"
    )
    parser.add_argument(
        "--strategy", required=True, choices=strategy_names(space="factor"), help="merge strategy"
    )
    parser.add_argument(
        "--weights", nargs="+", type=float, metavar="W",
        help="one weight per adapter (default: all 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--density", type=float, default=1.0, metavar="D",
        help="fraction of each tensor kept by pruning (default 1.0; ignored by strategies that "
        "do not prune)",
    )  # fmt: skip
    parser.add_argument(
        "--majority-sign-method", choices=("total", "frequency"), default="total",
        help="sign election of the sign-electing strategies (default total)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, metavar="S",
        help=f"seed of {random_names} in [0, 2**63-1] (default: drawn and recorded)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="auto", metavar="auto|cpu|cuda[:N]",
        help="where to merge (default auto: cuda if usable)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=_DTYPES, default="auto",
        help="dtype of the merged tensors (default auto: the inputs')",
    )  # fmt: skip
    parser.add_argument(
        "--weighting", choices=("lorax", "peft"), default="lorax",
        help="lorax: weights as the LoRAX server applies them (default); "
        "peft: reproduce PEFT's add_weighted_adapter (scalings folded into the factors, "
        "lora_alpha = r)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty output folder"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    return parser


def _package_version() -> str:
    try:
        import lorax_merge

        return str(lorax_merge.__version__)
    except Exception:  # pragma: no cover - only when the package is broken
        return "unknown"


def _check_numbers(args: argparse.Namespace) -> None:
    if not math.isfinite(args.density) or args.density < 0:
        raise CliError(f"--density must be a finite number >= 0, got {args.density}")
    if args.weights is not None:
        if len(args.weights) != len(args.adapters):
            raise CliError(
                f"--weights: got {len(args.weights)} weights for {len(args.adapters)} adapters "
                "(one weight per adapter)"
            )
        bad = [w for w in args.weights if not math.isfinite(w)]
        if bad:
            raise CliError(f"--weights must be finite numbers, got {bad[0]}")
    if args.seed is not None and not 0 <= args.seed <= _MAX_SEED:
        raise CliError(f"--seed must be in [0, 2**63-1], got {args.seed}")


def _resolve_device(spec: str) -> Any:
    import torch

    import lorax_merge

    if spec == "cpu":
        return torch.device("cpu")
    cuda_built = bool(lorax_merge.build_info().get("cuda_compiled", False))
    if spec == "auto":
        usable = cuda_built and torch.cuda.is_available()
        return torch.device("cuda") if usable else torch.device("cpu")
    match = re.fullmatch(r"cuda(?::([0-9]+))?", spec)
    if match is None:
        raise CliError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not cuda_built:
        raise CliError(f"--device {spec}: this build of lorax_merge has no CUDA support")
    if not torch.cuda.is_available():
        raise CliError(f"--device {spec}: no CUDA device is available")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise CliError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


# -------------------------------------------------------------------------------------------- steps
def _plan(args: argparse.Namespace, inputs: Sequence[Adapter], device: Any) -> report.MergePlan:
    """Weights, the strategy actually run and its seed."""
    strategy = args.strategy
    if args.weighting == "peft" and len(inputs) == 1:
        strategy = LINEAR  # PEFT merges a single adapter linearly whatever the strategy
    seed = None
    if STRATEGIES[strategy].is_random:
        seed = args.seed if args.seed is not None else secrets.randbelow(_MAX_SEED + 1)
    return report.MergePlan(
        strategy=strategy,
        weighting=args.weighting,
        weights=list(args.weights) if args.weights is not None else [1.0] * len(inputs),
        density=args.density,
        majority_sign_method=args.majority_sign_method,
        seed=seed,
        seed_given=args.seed is not None,
        dtype=args.dtype,
        device=str(device),
    )


def _merged_config(args: argparse.Namespace, inputs: Sequence[Adapter]) -> dict[str, Any]:
    from lorax_merge import adapters as adapter_lib

    try:
        return adapter_lib.merge_adapter_configs(
            [a.config for a in inputs], [a.shown for a in inputs], weighting=args.weighting
        )
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None


def _peft_scalings(args: argparse.Namespace, inputs: Sequence[Adapter]) -> list[float] | None:
    from lorax_merge import adapters as adapter_lib

    if args.weighting != "peft":
        return None
    try:
        return [adapter_lib.peft_scaling(a.config, a.shown) for a in inputs]
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None


def _merge(
    plan: report.MergePlan,
    inputs: Sequence[Adapter],
    scalings: list[float] | None,
    device: Any,
) -> dict[str, Any]:
    """Merge every tensor; returns the results on the CPU, contiguous."""
    import torch

    from lorax_merge import adapters as adapter_lib

    total = len({name for a in inputs for name in a.tensors})
    progress = report.Progress(total, "merging")
    try:
        merged = adapter_lib.merge_adapters(
            [a.tensors for a in inputs],
            plan.weights,
            strategy=plan.strategy,
            density=plan.density,
            majority_sign_method=plan.majority_sign_method,
            seed=plan.seed,
            device=device,
            out_dtype="input" if plan.dtype == "auto" else getattr(torch, plan.dtype),
            weighting=plan.weighting,
            scalings=scalings,
            names=[a.shown for a in inputs],
            progress=progress.update,
        )
    except (ValueError, TypeError) as exc:
        raise CliError(one_line(str(exc))) from None
    finally:
        progress.close()
    for adapter in inputs:
        adapter.tensors = {}
    return {name: t.detach().to("cpu").contiguous() for name, t in merged.items()}


def _write_adapter(
    folder: Path,
    plan: report.MergePlan,
    inputs: Sequence[Adapter],
    tensors: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """Write the adapter files and the provenance into ``folder``."""
    out_folder.save_tensors(tensors, folder / SAFETENSORS_NAME)
    config_bytes = json_bytes(config)
    out_folder.write_file(folder / CONFIG_NAME, config_bytes)
    files = {
        SAFETENSORS_NAME: sha256_file(folder / SAFETENSORS_NAME),
        CONFIG_NAME: sha256_bytes(config_bytes),
    }
    provenance = report.provenance(plan, inputs, tensors, files)
    out_folder.write_file(folder / PROVENANCE_NAME, json_bytes(provenance))


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    _check_numbers(args)
    device = _resolve_device(args.device)
    inputs = [Adapter(arg, check_input_dir(arg)) for arg in args.adapters]
    output = Path(os.path.abspath(args.output))
    out_folder.check_output(output, args.output, inputs, args.overwrite)

    for adapter in inputs:
        load_config(adapter)
    config = _merged_config(args, inputs)
    scalings = _peft_scalings(args, inputs)
    for adapter in inputs:
        load_tensors(adapter)
    plan = _plan(args, inputs, device)
    tensors = _merge(plan, inputs, scalings, device)

    with out_folder.atomic_output(output, args.output, args.overwrite) as folder:
        _write_adapter(folder, plan, inputs, tensors, config)
    elapsed = time.perf_counter() - started
    print(report.summary(plan, inputs, args.output, tensors, config, elapsed))
    return 0


# --------------------------------------------------------------------------------------------- main
def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {one_line(message, 1000)}\n")
    sys.stderr.flush()


def _traceback_wanted() -> bool:
    value = os.environ.get(TRACEBACK_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorax-merge`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Exit codes: 0 merged; 2 bad input (one line on stderr); 1 unexpected failure; 130 / 143
    interrupted / terminated.  With the environment variable ``LORAX_MERGE_TRACEBACK=1`` (or
    ``true``, ``yes``, ``on``) unexpected errors are re-raised with their traceback.
    """
    handler_installed = False
    previous: Callable[..., Any] | int | None = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        handler_installed = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(argv)
    except CliError as exc:
        _error(str(exc))
        return 2
    except _Terminated:
        _error("terminated")
        return 143
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except MemoryError:
        _error("out of memory")
        return 1
    except Exception as exc:
        if _traceback_wanted():
            raise
        _error(f"unexpected error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if handler_installed:
            signal.signal(signal.SIGTERM, previous)
