"""The ``lorax-merge`` command: merge PEFT LoRA adapter folders into a new adapter folder.

Usage::

    lorax-merge ADAPTER_DIR [ADAPTER_DIR ...] --output DIR --strategy STRATEGY [options]

Every bad input (a missing or malformed file, differing ranks, a bad parameter, ...) is reported as
one line on stderr with exit code 2.  The output folder appears atomically: it is written as a
hidden temporary folder beside the output and renamed into place once complete, so an interrupted or
failed run leaves no partial adapter behind.  See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from .strategy_table import LINEAR, STRATEGIES, strategy_names

PROG = "lorax-merge"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PROVENANCE_NAME = "merge_provenance.json"
PROVENANCE_FORMAT = "lorax-merge provenance"
PROVENANCE_VERSION = 1

_STRATEGIES = strategy_names(space="factor")
_RANDOM = strategy_names(random=True)
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_MAX_CONFIG_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100_000_000
_MAX_SEED = (1 << 63) - 1
# safetensors dtype names and their sizes in bytes; only the first four can be merged.
_ST_FLOAT = ("F32", "F16", "BF16", "F64")
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "F6_E2M3": 1, "F6_E3M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip
_SEED_DERIVATION = (
    "tensor seed = int.from_bytes(blake2b(seed.to_bytes(8, 'little') + name.encode('utf-8'), "
    "digest_size=8, person=b'lorax-merge/seed').digest(), 'little') & (2**63 - 1)  "
    "(lorax_merge.adapters.derive_tensor_seed)"
)
_TEMP_RE = re.compile(r"\.(?P<base>.+)\.lorax-merge-(?:tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]+")


class CliError(Exception):
    """A bad input or an unusable environment: reported as one line on stderr, exit code 2."""


class _Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so that the temporary output is removed."""


# ---------------------------------------------------------------------------------------- utilities
def _show(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: as given, escaped if it holds unprintable characters."""
    text = os.fspath(path)
    return text if text.isprintable() else ascii(text)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _read_regular_file(path: Path, shown: str, limit: int | None = None) -> bytes:
    """Read a whole file, refusing anything that is not a regular file (devices, FIFOs, folders)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CliError(f"{shown}: file not found") from None
    except OSError as exc:
        raise CliError(f"{shown}: cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CliError(f"{shown}: is a folder, expected a file")
        if not stat.S_ISREG(info.st_mode):
            raise CliError(f"{shown}: is not a regular file")
        if limit is not None and info.st_size > limit:
            raise CliError(f"{shown}: too large ({info.st_size} bytes; at most {limit} expected)")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise CliError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {PROG} --help)")


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--strategy", required=True, choices=_STRATEGIES, help="merge strategy")
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per adapter (default: all 1.0)",
    )
    parser.add_argument(
        "--density", type=float, default=1.0, metavar="D",
        help="fraction of each tensor kept by pruning (default 1.0; ignored by linear)",
    )  # fmt: skip
    parser.add_argument(
        "--majority-sign-method", choices=("total", "frequency"), default="total",
        help="sign election of ties and dare_ties (default total)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, metavar="S",
        help="seed of dare_linear / dare_ties in [0, 2**63-1] (default: drawn and recorded)",
    )  # fmt: skip
    parser.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="where to merge (default auto: cuda if usable)",
    )
    parser.add_argument(
        "--dtype",
        choices=_DTYPES,
        default="auto",
        help="dtype of the merged tensors (default auto: the inputs')",
    )
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


# ------------------------------------------------------------------------------------------- inputs
@dataclass
class _Adapter:
    """One input adapter folder."""

    arg: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shown(self) -> str:
        return _show(self.arg)


def _check_input_dir(arg: str) -> Path:
    path = Path(arg)
    shown = _show(arg)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CliError(f"{shown}: adapter folder is a broken symbolic link") from None
        raise CliError(f"{shown}: adapter folder not found") from None
    except OSError as exc:
        raise CliError(f"{shown}: cannot access adapter folder ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CliError(f"{shown}: not a folder (expected a PEFT adapter folder)")
    try:
        with os.scandir(path):
            pass
    except OSError as exc:
        raise CliError(f"{shown}: cannot read adapter folder ({exc.strerror or exc})") from None
    return Path(os.path.abspath(path))


def _out_of_range(value: Any) -> bool:
    """A JSON number no field can use: a float literal beyond the float range (parsed as
    inf), or an integer beyond 64 bits; looked for inside lists and objects too."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int):
        return not -(2**63) <= value < 2**63
    if isinstance(value, list):
        return any(_out_of_range(v) for v in value)
    if isinstance(value, dict):
        return any(_out_of_range(v) for v in value.values())
    return False


def _parse_config(raw: bytes, shown: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{shown}: not UTF-8 text") from None
    try:
        config = json.loads(
            text,
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{shown}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError as exc:
        raise CliError(f"{shown}: malformed JSON ({exc})") from None
    except RecursionError:
        raise CliError(f"{shown}: malformed JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise CliError(f"{shown}: expected a JSON object, got a JSON {type(config).__name__}")
    for key, value in config.items():
        if _out_of_range(value):
            raise CliError(f"{shown}: {key!r} holds a number out of range")
    peft_type = config.get("peft_type")
    if peft_type is not None and peft_type != "LORA":
        raise CliError(
            f"{shown}: peft_type is {peft_type!r}; "
            "only LoRA adapters (peft_type 'LORA') can be merged"
        )
    return config


def _parse_safetensors(data: bytes, shown: str) -> dict[str, Any]:
    """Validate a safetensors file's header against the file before letting the reader near it."""
    import safetensors.torch

    size = len(data)
    if size < 8:
        raise CliError(
            f"{shown}: truncated ({size} bytes; "
            "a safetensors file starts with an 8-byte header size)"
        )
    header_len = int.from_bytes(data[:8], "little")
    if header_len > size - 8:
        raise CliError(
            f"{shown}: truncated or corrupt "
            f"(the header claims {header_len} bytes but only {size - 8} follow)"
        )
    if header_len > _MAX_HEADER_BYTES:
        raise CliError(f"{shown}: header of {header_len} bytes is too large")
    try:
        header = json.loads(
            data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_reject_duplicate_keys
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CliError(
            f"{shown}: corrupt safetensors header ({_one_line(str(exc), 120)})"
        ) from None
    if not isinstance(header, dict):
        raise CliError(f"{shown}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CliError(
            f"{shown}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    available = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{shown}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CliError(f"{where}: corrupt header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
            raise CliError(f"{where}: unknown dtype {dtype!r}")
        if dtype not in _ST_FLOAT:
            raise CliError(
                f"{where}: has dtype {dtype}; "
                "only floating-point tensors (F32, F16, BF16, F64) can be merged"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CliError(f"{where}: invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CliError(f"{where}: invalid data offsets {offsets!r}")
        begin, end = offsets
        if end > available:
            raise CliError(
                f"{where}: data offsets [{begin}, {end}] run past the end of the file "
                f"({available} data bytes): truncated or corrupt"
            )
        need = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if need != end - begin:
            raise CliError(
                f"{where}: shape {shape} in {dtype} needs {need} bytes "
                f"but its data spans {end - begin}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CliError(
                f"{shown}: tensor {name!r}: data overlaps another tensor or leaves a gap: "
                "corrupt file"
            )
        position = end
    if position != available:
        raise CliError(
            f"{shown}: {available - position} bytes after the last tensor's data: corrupt file"
        )
    try:
        return dict(safetensors.torch.load(data))
    except Exception as exc:
        raise CliError(f"{shown}: cannot read the tensors ({_one_line(str(exc), 160)})") from None


def _parse_bin(data: bytes, shown: str) -> dict[str, Any]:
    """Load a legacy PyTorch adapter file, unpickling only through ``weights_only`` loading."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(
            f"{shown}: cannot be loaded as plain tensors ({_one_line(first, 160)})"
        ) from None
    if not isinstance(state, dict):
        raise CliError(f"{shown}: expected a dictionary of tensors, got {type(state).__name__}")
    tensors = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise CliError(f"{shown}: tensor names must be strings, got {name!r}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise CliError(f"{shown}: {name!r} is not a dense tensor")
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise CliError(
                f"{shown}: tensor {name!r} has dtype {str(value.dtype).replace('torch.', '')}; "
                "only floating-point tensors (float32, float16, bfloat16, float64) can be merged"
            )
        tensors[name] = value.detach()
    return tensors


def _load_config(adapter: _Adapter) -> None:
    path = adapter.path / CONFIG_NAME
    shown = _show(os.path.join(adapter.arg, CONFIG_NAME))
    if not os.path.lexists(path):
        raise CliError(f"{adapter.shown}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    raw = _read_regular_file(path, shown, _MAX_CONFIG_BYTES)
    adapter.config = _parse_config(raw, shown)
    adapter.files.append({"name": CONFIG_NAME, "bytes": len(raw), "sha256": _sha256(raw)})


def _load_tensors(adapter: _Adapter) -> None:
    for name, parse in ((SAFETENSORS_NAME, _parse_safetensors), (BIN_NAME, _parse_bin)):
        path = adapter.path / name
        if os.path.lexists(path):
            shown = _show(os.path.join(adapter.arg, name))
            data = _read_regular_file(path, shown)
            adapter.files.append({"name": name, "bytes": len(data), "sha256": _sha256(data)})
            adapter.tensors = parse(data, shown)
            del data
            if not adapter.tensors:
                raise CliError(f"{shown}: holds no tensors")
            return
    raise CliError(
        f"{adapter.shown}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in the adapter folder"
    )


# ------------------------------------------------------------------------------------------- output
def _check_output(
    output: Path, output_arg: str, inputs: Sequence[_Adapter], overwrite: bool
) -> None:
    shown = _show(output_arg)
    if os.path.islink(output):
        raise CliError(f"--output {shown} is a symbolic link; give the real folder")
    ancestor = output.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"--output {shown}: {_show(ancestor)} is not a folder")
    real_out = os.path.realpath(output)
    for adapter in inputs:
        real_in = os.path.realpath(adapter.path)
        if real_out == real_in or real_out.startswith(real_in.rstrip(os.sep) + os.sep):
            raise CliError(f"--output {shown} is inside the input adapter folder {adapter.shown}")
        if real_in.startswith(real_out.rstrip(os.sep) + os.sep):
            raise CliError(f"--output {shown} contains the input adapter folder {adapter.shown}")
    if os.path.lexists(output):
        if not output.is_dir():
            raise CliError(f"--output {shown} exists and is not a folder")
        try:
            with os.scandir(output) as entries:
                empty = next(entries, None) is None
        except OSError as exc:
            raise CliError(
                f"--output {shown}: cannot read the existing folder ({exc.strerror or exc})"
            ) from None
        if not empty and not overwrite:
            raise CliError(
                f"--output {shown} exists and is not empty (pass --overwrite to replace it)"
            )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale_temporaries(output: Path) -> None:
    """Remove temporary folders that an earlier, killed run for the same output left behind."""
    try:
        entries = list(os.scandir(output.parent))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_RE.fullmatch(entry.name)
        if match is None or match["base"] != output.name:
            continue
        if entry.is_dir(follow_symlinks=False) and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """Write the merged tensors as a safetensors file (PEFT's metadata) and flush it to disk."""
    import safetensors.torch

    _write_file(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync folders
        pass
    finally:
        os.close(fd)


def _commit(temporary: Path, output: Path) -> None:
    """Move the finished temporary folder to the output path (replacing an existing folder)."""
    try:
        os.rename(temporary, output)  # atomic; replaces a missing or empty output folder
    except OSError:
        if not os.path.isdir(output):
            raise
        aside = (
            output.parent / f".{output.name}.lorax-merge-old-{os.getpid()}-{secrets.token_hex(4)}"
        )
        os.rename(output, aside)
        try:
            os.rename(temporary, output)
        except BaseException:
            os.rename(aside, output)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_path(output.parent)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------- progress
class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.done = total, label, enabled and total > 0, 0
        self._last = 0.0
        if self.enabled:
            self._draw()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // self.total
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} tensors")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- run
def _format_count(n: int) -> str:
    return f"{n:,}"


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    _check_numbers(args)

    import torch

    import lorax_merge
    from lorax_merge import adapters as adapter_lib

    device = _resolve_device(args.device)
    inputs = [_Adapter(arg, _check_input_dir(arg)) for arg in args.adapters]
    output = Path(os.path.abspath(args.output))
    _check_output(output, args.output, inputs, args.overwrite)

    for adapter in inputs:
        _load_config(adapter)
    labels = [adapter.shown for adapter in inputs]
    try:
        merged_config = adapter_lib.merge_adapter_configs(
            [a.config for a in inputs], labels, weighting=args.weighting
        )
        scalings = (
            [adapter_lib.peft_scaling(a.config, a.shown) for a in inputs]
            if args.weighting == "peft"
            else None
        )
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    for adapter in inputs:
        _load_tensors(adapter)

    weights = list(args.weights) if args.weights is not None else [1.0] * len(inputs)
    strategy = args.strategy
    if args.weighting == "peft" and len(inputs) == 1:
        strategy = LINEAR  # PEFT merges a single adapter linearly whatever the strategy
    seed = None
    if strategy in _RANDOM:
        seed = args.seed if args.seed is not None else secrets.randbelow(_MAX_SEED + 1)
    out_dtype = "input" if args.dtype == "auto" else getattr(torch, args.dtype)
    total = len({name for a in inputs for name in a.tensors})

    progress = _Progress(total, "merging", _stderr_is_terminal())
    try:
        merged = adapter_lib.merge_adapters(
            [a.tensors for a in inputs],
            weights,
            strategy=strategy,
            density=args.density,
            majority_sign_method=args.majority_sign_method,
            seed=seed,
            device=device,
            out_dtype=out_dtype,
            weighting=args.weighting,
            scalings=scalings,
            names=labels,
            progress=progress.update,
        )
    except (ValueError, TypeError) as exc:
        raise CliError(_one_line(str(exc))) from None
    finally:
        progress.close()
    for adapter in inputs:
        adapter.tensors = {}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in merged.items()}
    del merged
    parameters = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})

    _remove_stale_temporaries(output)
    temporary = (
        output.parent / f".{output.name}.lorax-merge-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    try:
        os.makedirs(output.parent, exist_ok=True)
        os.mkdir(temporary)
    except OSError as exc:
        raise CliError(
            f"--output {_show(args.output)}: cannot create a folder beside it ({exc.strerror})"
        ) from None
    try:
        _save_tensors(tensors, temporary / SAFETENSORS_NAME)
        config_bytes = _json_bytes(merged_config)
        _write_file(temporary / CONFIG_NAME, config_bytes)
        weights_sha = _file_sha256(temporary / SAFETENSORS_NAME)
        provenance = {
            "format": PROVENANCE_FORMAT,
            "format_version": PROVENANCE_VERSION,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "lorax_merge_version": str(lorax_merge.__version__),
            "torch_version": str(torch.__version__),
            "inputs": [{"path": str(a.path), "files": a.files} for a in inputs],
            "strategy": strategy,
            "weighting": args.weighting,
            "weights": weights,
            "density": args.density,
            "majority_sign_method": args.majority_sign_method,
            "seed": seed,
            "seed_derivation": _SEED_DERIVATION if seed is not None else None,
            "dtype": args.dtype,
            "device": str(device),
            "output": {
                "tensors": len(tensors),
                "parameters": parameters,
                "files": [
                    {"name": SAFETENSORS_NAME, "sha256": weights_sha},
                    {"name": CONFIG_NAME, "sha256": _sha256(config_bytes)},
                ],
            },
        }
        _write_file(temporary / PROVENANCE_NAME, _json_bytes(provenance))
        _fsync_path(temporary)
        if os.path.lexists(output) and not args.overwrite and any(os.scandir(output)):
            raise CliError(
                f"--output {_show(args.output)} was filled by someone else while merging"
            )
        _commit(temporary, output)
    except OSError as exc:
        raise CliError(
            f"--output {_show(args.output)}: "
            f"cannot write the merged adapter ({exc.strerror or exc})"
        ) from None
    finally:
        if os.path.lexists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)

    elapsed = time.perf_counter() - started
    names = ", ".join(os.path.basename(os.path.normpath(a.arg)) or a.arg for a in inputs)
    params = [f"weights {' '.join(f'{w:g}' for w in weights)}", f"{args.weighting} weighting"]
    if STRATEGIES[strategy].uses_density:
        params.insert(0, f"density {args.density:g}")
    if STRATEGIES[strategy].elects_sign:
        params.insert(1, f"majority sign {args.majority_sign_method}")
    if seed is not None:
        params.append(f"seed {seed}" + ("" if args.seed is not None else " (drawn)"))
    modules = merged_config.get("target_modules")
    modules_text = ", ".join(modules) if isinstance(modules, list) else str(modules)
    plural = "s" if len(inputs) != 1 else ""
    print(
        f"Merged {len(inputs)} adapter{plural} ({_one_line(names, 200)}) with {strategy} "
        f"({', '.join(params)}) into {_show(args.output)}: {len(tensors)} tensors, "
        f"{_format_count(parameters)} parameters, rank {merged_config.get('r')}, "
        f"target modules {modules_text}, {'/'.join(dtypes)}, merged on {device} in "
        f"{elapsed:.2f} s; provenance in {PROVENANCE_NAME}."
    )
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {_one_line(message, 1000)}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorax-merge`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Exit codes: 0 merged; 2 bad input (one line on stderr); 1 unexpected failure; 130 / 143
    interrupted / terminated.  With the environment variable ``LORAX_MERGE_DEBUG=1`` unexpected
    errors are re-raised with their traceback.
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
        if os.environ.get("LORAX_MERGE_DEBUG"):
            raise
        _error(f"unexpected error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if handler_installed:
            signal.signal(signal.SIGTERM, previous)
