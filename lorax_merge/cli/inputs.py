"""Reading and validating input adapter folders: files, ``adapter_config.json``, tensors.

Nothing here trusts a file: a file must be a regular file (no FIFO or device is opened
blocking), a configuration is strict JSON, and a safetensors header is checked against the file
before any tensor is read. Legacy ``.bin`` files are unpickled only through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    CliError,
    one_line,
    sha256_bytes,
    show,
)

_MAX_CONFIG_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100_000_000
# safetensors dtype names and their sizes in bytes; only the first four can be merged.
_ST_FLOAT = ("F32", "F16", "BF16", "F64")
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "F6_E2M3": 1, "F6_E3M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip


@dataclass
class Adapter:
    """One input adapter folder."""

    arg: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shown(self) -> str:
        return show(self.arg)


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


def check_input_dir(arg: str) -> Path:
    path = Path(arg)
    shown = show(arg)
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
        raise CliError(f"{shown}: corrupt safetensors header ({one_line(str(exc), 120)})") from None
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
        raise CliError(f"{shown}: cannot read the tensors ({one_line(str(exc), 160)})") from None


def _parse_bin(data: bytes, shown: str) -> dict[str, Any]:
    """Load a legacy PyTorch adapter file, unpickling only through ``weights_only`` loading."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(
            f"{shown}: cannot be loaded as plain tensors ({one_line(first, 160)})"
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


def load_config(adapter: Adapter) -> None:
    path = adapter.path / CONFIG_NAME
    shown = show(os.path.join(adapter.arg, CONFIG_NAME))
    if not os.path.lexists(path):
        raise CliError(f"{adapter.shown}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    raw = _read_regular_file(path, shown, _MAX_CONFIG_BYTES)
    adapter.config = _parse_config(raw, shown)
    adapter.files.append({"name": CONFIG_NAME, "bytes": len(raw), "sha256": sha256_bytes(raw)})


def load_tensors(adapter: Adapter) -> None:
    for name, parse in ((SAFETENSORS_NAME, _parse_safetensors), (BIN_NAME, _parse_bin)):
        path = adapter.path / name
        if os.path.lexists(path):
            shown = show(os.path.join(adapter.arg, name))
            data = _read_regular_file(path, shown)
            adapter.files.append({"name": name, "bytes": len(data), "sha256": sha256_bytes(data)})
            adapter.tensors = parse(data, shown)
            del data
            if not adapter.tensors:
                raise CliError(f"{shown}: holds no tensors")
            return
    raise CliError(
        f"{adapter.shown}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in the adapter folder"
    )
