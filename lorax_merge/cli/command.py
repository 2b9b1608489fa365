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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..adapter_configs import merge_adapter_configs, peft_scaling
from ..strategy_table import LINEAR, STRATEGIES, strategy_names
from . import configs, delta_options, merging, report
from . import output as out_folder
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

#: Options that take numbers: argparse reads a value like -inf or -1e-3 as an unknown option.
_NUMBER_OPTIONS = {"--weights": -1, "--density": 1, "--seed": 1, "--rank": 1}  # -1: any count

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
    random_names = " / ".join(strategy_names(random=True))
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
        "--strategy", required=True, choices=strategy_names(), help=delta_options.strategy_help()
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
        "--rank", type=int, metavar="R",
        help="rank of the merged adapter, R >= 1, for delta-space strategies only (default: the "
        f"largest input r; {' / '.join(delta_options.CONCAT_STRATEGIES)}: the sum of their r)",
    )  # fmt: skip
    parser.add_argument(
        "--svd-driver", choices=delta_options.SVD_DRIVERS,
        help=f"SVD routine of {' / '.join(delta_options.SVD_STRATEGIES)}: exact is a full SVD of "
        "the dense merged delta, as PEFT computes it (default: the fast routine)",
    )  # fmt: skip
    parser.add_argument(
        "--weighting", choices=("lorax", "peft"),
        help="factor-space strategies only. lorax: weights as the LoRAX server applies them "
        "(default); peft: reproduce PEFT's add_weighted_adapter (scalings folded into the "
        "factors, lora_alpha = r)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing adapter folder (one with adapter_config.json and only the "
        "files an adapter folder usually holds); any other non-empty folder is refused",
    )  # fmt: skip
    parser.add_argument(
        "--allow-different-base", action="store_true",
        help="merge adapters whose base_model_name_or_path differ",
    )  # fmt: skip
    parser.add_argument(
        "--allow-nonfinite", action="store_true",
        help="merge inputs holding NaN or infinities and write results holding them "
        "(refused by default)",
    )  # fmt: skip
    parser.add_argument(
        "--average-modules-to-save", action="store_true",
        help="merge full weights (modules_to_save) by weighted average, unpruned (refused by "
        "default)",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    return parser


def _package_version() -> str:
    try:
        import lorax_merge

        return str(lorax_merge.__version__)
    except Exception:  # pragma: no cover - only when the package is broken
        return "unknown"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shield_negative_numbers(argv: Sequence[str]) -> list[str]:
    """Prefix a space to negative numbers given to number options (``--weights 1 -inf``), which
    argparse would read as options; ``float`` and ``int`` ignore the space."""
    result: list[str] = []
    wanted = 0
    for token in argv:
        if wanted and _is_number(token):
            result.append(" " + token if token.startswith("-") else token)
            wanted -= 1 if wanted > 0 else 0
            continue
        wanted = _NUMBER_OPTIONS.get(token, 0)
        result.append(token)
    return result


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
def _peft_differences(args: argparse.Namespace, inputs: Sequence[Adapter]) -> list[str]:
    if args.weighting != "peft" or not inputs[0].config.get("use_rslora"):
        return []
    return [
        "use_rslora is written as false: each adapter's scaling (lora_alpha/sqrt(r) with rsLoRA) "
        "is folded into the tensors and lora_alpha = r, so the merged adapter must be scaled by "
        "lora_alpha/r = 1. PEFT's add_weighted_adapter keeps the first adapter's use_rslora: "
        "true, which scales its result by sqrt(r) once more."
    ]


def _plan(
    args: argparse.Namespace, inputs: Sequence[Adapter], device: Any, rank: int
) -> report.MergePlan:
    """Weights, the strategy actually run and its seed, and the options recorded."""
    strategy = args.strategy
    if args.weighting == "peft" and len(inputs) == 1:
        strategy = LINEAR  # PEFT merges a single adapter linearly whatever the strategy
    seed = None
    if STRATEGIES[strategy].is_random:
        seed = args.seed if args.seed is not None else secrets.randbelow(_MAX_SEED + 1)
    delta = delta_options.is_delta(strategy)
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
        allow_different_base=args.allow_different_base,
        allow_nonfinite=args.allow_nonfinite,
        average_modules_to_save=args.average_modules_to_save,
        differences_from_peft=_peft_differences(args, inputs),
        rank=rank if delta else None,
        svd_driver=args.svd_driver if delta else None,
    )


def _read_configs(args: argparse.Namespace, inputs: Sequence[Adapter]) -> dict[str, Any]:
    """Read and check every configuration; returns the merged one."""
    for adapter in inputs:
        load_config(adapter)
        configs.check_fields(adapter)
        configs.check_supported(adapter, args.average_modules_to_save)
    configs.check_agreement(inputs, args.allow_different_base)
    if delta_options.is_delta(args.strategy):
        rank = delta_options.merge_rank(args.strategy, args.rank, inputs)
        merged = delta_options.delta_config(inputs, rank)
        configs.finish_config(merged, inputs, args.average_modules_to_save)
        return merged
    try:
        merged = merge_adapter_configs(
            [a.config for a in inputs], [a.shown for a in inputs], weighting=args.weighting
        )
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    configs.finish_config(merged, inputs, args.average_modules_to_save)
    return merged


def _peft_scalings(args: argparse.Namespace, inputs: Sequence[Adapter]) -> list[float] | None:
    if args.weighting != "peft":
        return None
    try:
        return [peft_scaling(a.config, a.shown) for a in inputs]
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None


def _read_tensors(args: argparse.Namespace, inputs: Sequence[Adapter]) -> None:
    """Read and check every adapter's tensors."""
    for adapter in inputs:
        load_tensors(adapter)
        configs.check_tensors(adapter, args.average_modules_to_save)
    if not args.allow_nonfinite:
        merging.check_finite_inputs(inputs)


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


def _run(argv: Sequence[str], guard: out_folder.CommitGuard) -> int:
    args = _parser().parse_args(_shield_negative_numbers(argv))
    started = time.perf_counter()
    _check_numbers(args)
    device = _resolve_device(args.device)
    delta_options.check_options(args, device)
    if not delta_options.is_delta(args.strategy) and args.weighting is None:
        args.weighting = "lorax"
    inputs = [Adapter(arg, check_input_dir(arg, i)) for i, arg in enumerate(args.adapters, 1)]
    output = out_folder.output_path(args.output)
    out_folder.check_output(output, args.output, inputs, args.overwrite)

    config = _read_configs(args, inputs)
    scalings = _peft_scalings(args, inputs)
    _read_tensors(args, inputs)
    plan = _plan(args, inputs, device, config["r"])
    tensors = merging.merge(plan, inputs, scalings, device)
    if not args.allow_nonfinite:
        merging.check_finite_outputs(tensors, plan, inputs, scalings)

    with out_folder.atomic_output(output, args.output, args.overwrite, guard) as folder:
        _write_adapter(folder, plan, inputs, tensors, config)
    elapsed = time.perf_counter() - started
    try:
        print(report.summary(plan, inputs, args.output, tensors, config, elapsed), flush=True)
    except BrokenPipeError:
        # The adapter is in place: a reader that went away does not undo the merge. Later
        # writes to stdout (at exit) go nowhere instead of failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


# --------------------------------------------------------------------------------------------- main
def _stop(signum: int) -> NoReturn:
    if signum == signal.SIGTERM:
        raise _Terminated()
    raise KeyboardInterrupt()


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {one_line(message, 1000)}\n")
    sys.stderr.flush()


def _traceback_wanted() -> bool:
    value = os.environ.get(TRACEBACK_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorax-merge`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Exit codes: 0 merged; 2 bad input (one line on stderr); 1 unexpected failure; 130 / 143
    interrupted / terminated before the merged adapter was in place (once it is, the run has
    succeeded).  With the environment variable ``LORAX_MERGE_TRACEBACK=1`` (or ``true``,
    ``yes``, ``on``) unexpected errors are re-raised with their traceback.
    """
    from .. import _cli_startup

    _cli_startup.release()
    guard = out_folder.CommitGuard(_stop)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, guard.on_signal)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(sys.argv[1:] if argv is None else list(argv), guard)
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
        # Started as the command, a run whose adapter is in place has succeeded: the signals
        # stay ignored for the interpreter's shutdown (most of a second), which a signal would
        # otherwise turn into exit status 130 or 143. Called as a library, the caller's
        # handlers come back.
        succeeded = guard.committed and _cli_startup._started_as_command()
        for signum, handler in previous.items():
            if succeeded:
                signal.signal(signum, signal.SIG_IGN)
            elif handler is not None:
                signal.signal(signum, handler)
