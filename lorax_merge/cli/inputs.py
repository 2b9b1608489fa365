"""Reading input adapter folders: files, ``adapter_config.json`` as strict JSON, and tensors.

Nothing here trusts a file: a file must be a regular file (no FIFO or device is opened
blocking), a configuration is strict JSON, and a safetensors file's header is read first and
checked against the file's size before its tensors are mapped (``safetensors.safe_open``), so
a file larger than its header says is refused without reading it. Legacy ``.bin`` files are
unpickled only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    CliError,
    json_type,
    one_line,
    quoted,
    sha256_bytes,
    sha256_file,
    show,
)

_MAX_CONFIG_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100_000_000
#: Deepest nesting of JSON arrays and objects accepted (PEFT configurations use 3 or 4 levels).
MAX_JSON_DEPTH = 64
_MERGEABLE = "only F32, F16, BF16 and F64 tensors can be merged"
# safetensors dtype names and their sizes in bytes; only the first four can be merged.
_ST_FLOAT = ("F32", "F16", "BF16", "F64")
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "F6_E2M3": 1, "F6_E3M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip
_ST_LOW_PRECISION_FLOAT = re.compile(r"F(?P<bits>[468])(_.*)?")


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


# -------------------------------------------------------------------------------------- folders
def check_input_dir(arg: str, position: int) -> Path:
    """The absolute path of the adapter folder ``arg`` (the ``position``-th, from 1)."""
    if arg == "":
        raise CliError(
            f"ADAPTER_DIR {position} is an empty path (an unset shell variable?); "
            "give the adapter folder"
        )
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
    return Path(os.path.realpath(path))  # the folder the kernel reached (`link/..` included)


def _open_regular_file(path: Path, shown: str) -> tuple[int, os.stat_result]:
    """Open a file for reading without blocking, refusing folders, FIFOs and devices."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CliError(f"{shown}: file not found") from None
    except OSError as exc:
        raise CliError(f"{shown}: cannot open ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return fd, info
    os.close(fd)
    if stat.S_ISDIR(info.st_mode):
        raise CliError(f"{shown}: is a folder, expected a file")
    raise CliError(f"{shown}: is not a regular file")


def _read_exactly(fd: int, count: int, shown: str) -> bytes:
    chunks, left = [], count
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                raise CliError(f"{shown}: the file shrank while being read")
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise CliError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    return b"".join(chunks)


def _read_regular_file(path: Path, shown: str, limit: int | None = None) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes."""
    fd, info = _open_regular_file(path, shown)
    try:
        if limit is not None and info.st_size > limit:
            raise CliError(f"{shown}: too large ({info.st_size} bytes; at most {limit} expected)")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise CliError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- JSON
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {quoted(key)}")
        result[key] = value
    return result


def _strict_json(text: str, shown: str, what: str) -> Any:
    """Parse JSON text: no NaN or Infinity, no duplicate keys, at most MAX_JSON_DEPTH levels.

    ``what`` starts the message of a refusal ("malformed JSON").
    """
    try:
        value = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{shown}: {what} ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise CliError(f"{shown}: {what} (nested too deeply)") from None
    except ValueError as exc:
        raise CliError(f"{shown}: {what} ({exc})") from None
    # Walk without recursion: a value nested deeper than Python's stack must not crash us.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise CliError(
                    f"{shown}: {what} (nested too deeply: more than {MAX_JSON_DEPTH} levels)"
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def _out_of_range(value: Any) -> bool:
    """A JSON number no field can use: a float literal beyond the float range (parsed as
    inf), or an integer beyond 64 bits; looked for inside lists and objects too."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, int) and not -(2**63) <= item < 2**63:
            return True
        if isinstance(item, (list, dict)):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


def _parse_config(raw: bytes, shown: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{shown}: not UTF-8 text") from None
    config = _strict_json(text, shown, "malformed JSON")
    if not isinstance(config, dict):
        raise CliError(f"{shown}: expected a JSON object, got JSON {json_type(config)}")
    for key, value in config.items():
        if _out_of_range(value):
            raise CliError(f"{shown}: {quoted(key)} holds a number out of range")
    peft_type = config.get("peft_type")
    if peft_type is not None and peft_type != "LORA":
        raise CliError(
            f"{shown}: peft_type is {peft_type!r}; "
            "only LoRA adapters (peft_type 'LORA') can be merged"
        )
    return config


def load_config(adapter: Adapter) -> None:
    """Read and parse the adapter's ``adapter_config.json`` (fields are checked elsewhere)."""
    path = adapter.path / CONFIG_NAME
    shown = show(os.path.join(adapter.arg, CONFIG_NAME))
    if not os.path.lexists(path):
        raise CliError(f"{adapter.shown}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    raw = _read_regular_file(path, shown, _MAX_CONFIG_BYTES)
    adapter.config = _parse_config(raw, shown)
    adapter.files.append({"name": CONFIG_NAME, "bytes": len(raw), "sha256": sha256_bytes(raw)})


# ---------------------------------------------------------------------------------- safetensors
def _dtype_refusal(where: str, dtype: str) -> CliError:
    low = _ST_LOW_PRECISION_FLOAT.fullmatch(dtype)
    if low is not None:
        article = "an" if low["bits"] == "8" else "a"
        return CliError(
            f"{where}: has dtype {dtype}, {article} {low['bits']}-bit float format; {_MERGEABLE}"
        )
    return CliError(f"{where}: has dtype {dtype}, not a floating-point type; {_MERGEABLE}")


def _check_header(header: Any, shown: str, available: int) -> None:
    """Check every entry's dtype, shape and data offsets against the ``available`` data bytes."""
    if not isinstance(header, dict):
        raise CliError(f"{shown}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CliError(
            f"{shown}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{shown}: tensor {quoted(name)}"
        if not isinstance(entry, dict):
            raise CliError(f"{where}: corrupt header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
            raise CliError(f"{where}: unknown dtype {dtype!r}")
        if dtype not in _ST_FLOAT:
            raise _dtype_refusal(where, dtype)
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
                f"{shown}: tensor {quoted(name)}: data overlaps another tensor or leaves a gap: "
                "corrupt file"
            )
        position = end
    if position != available:
        raise CliError(
            f"{shown}: {available - position} bytes after the last tensor's data "
            "(the file is larger than its header declares): corrupt file"
        )


def _read_safetensors(path: Path, shown: str) -> dict[str, Any]:
    """Check the header against the file's size, then map the tensors with ``safe_open``."""
    from safetensors import safe_open

    fd, info = _open_regular_file(path, shown)
    try:
        size = info.st_size
        if size < 8:
            raise CliError(
                f"{shown}: truncated ({size} bytes; "
                "a safetensors file starts with an 8-byte header size)"
            )
        header_len = int.from_bytes(_read_exactly(fd, 8, shown), "little")
        if header_len > size - 8:
            raise CliError(
                f"{shown}: truncated or corrupt "
                f"(the header claims {header_len} bytes but only {size - 8} follow)"
            )
        if header_len > _MAX_HEADER_BYTES:
            raise CliError(f"{shown}: header of {header_len} bytes is too large")
        raw = _read_exactly(fd, header_len, shown)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{shown}: corrupt safetensors header ({exc.reason})") from None
    header = _strict_json(text, shown, "corrupt safetensors header")
    _check_header(header, shown, size - 8 - header_len)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        after = os.stat(path)
    except Exception as exc:
        raise CliError(f"{shown}: cannot read the tensors ({one_line(str(exc), 160)})") from None
    if (after.st_ino, after.st_size, after.st_mtime_ns) != (
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
    ):
        raise CliError(f"{shown}: the file changed while being read")
    return tensors


# ------------------------------------------------------------------------------------ .bin files
def _unpickling_refusal(exc: Exception) -> str:
    """The useful part of torch's weights-only refusal: the refused global, or its reason."""
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused is not None:
        return f"it refers to {refused.group(1)}, which is not a plain tensor type"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines()]
    useful = [line for line in lines if line and not line.startswith(boilerplate)]
    return one_line(" ".join(useful) or type(exc).__name__, 200)


def _parse_bin(data: bytes, shown: str) -> dict[str, Any]:
    """Load a legacy PyTorch adapter file, unpickling only through ``weights_only`` loading."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _unpickling_refusal(exc)
        raise CliError(f"{shown}: cannot be loaded as plain tensors ({reason})") from None
    if not isinstance(state, dict):
        kind = "None" if state is None else type(state).__name__
        raise CliError(f"{shown}: expected a dictionary of tensors, got {kind}")
    tensors = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise CliError(f"{shown}: tensor names must be strings, got {name!r}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise CliError(f"{shown}: {quoted(name)} is not a dense tensor")
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            dtype = str(value.dtype).replace("torch.", "")
            kind = "a low-precision float format" if value.is_floating_point() else (
                "not a floating-point type"
            )  # fmt: skip
            raise CliError(
                f"{shown}: tensor {quoted(name)} has dtype {dtype}, {kind}; "
                "only float32, float16, bfloat16 and float64 tensors can be merged"
            )
        tensors[name] = value.detach()
    return tensors


def load_tensors(adapter: Adapter) -> None:
    """Read the adapter's tensors (safetensors, else the legacy ``.bin``) and hash the file."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = adapter.path / name
        if not os.path.lexists(path):
            continue
        shown = show(os.path.join(adapter.arg, name))
        if name == SAFETENSORS_NAME:
            adapter.tensors = _read_safetensors(path, shown)
            size, digest = os.stat(path).st_size, sha256_file(path)
        else:
            data = _read_regular_file(path, shown)
            size, digest = len(data), sha256_bytes(data)
            adapter.tensors = _parse_bin(data, shown)
            del data
        adapter.files.append({"name": name, "bytes": size, "sha256": digest})
        if not adapter.tensors:
            raise CliError(f"{shown}: holds no tensors")
        return
    raise CliError(
        f"{adapter.shown}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in the adapter folder"
    )
