"""What every part of the command shares: its error type, file names and message helpers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

PROG = "lorax-merge"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PROVENANCE_NAME = "merge_provenance.json"


class CliError(Exception):
    """A bad input or an unusable environment: reported as one line on stderr, exit code 2."""


def show(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: as given, escaped if it holds unprintable characters."""
    text = os.fspath(path)
    return text if text.isprintable() else ascii(text)


def quoted(name: str) -> str:
    """A tensor, field or module name for a message: quoted, or ``<empty name>``."""
    return repr(name) if name else "<empty name>"


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace runs collapsed to single spaces, cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def json_type(value: Any) -> str:
    """The JSON name of a parsed JSON value's type (``null``, ``boolean``, ``array``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(value: Any) -> bytes:
    """``value`` as indented, sorted, strict JSON text (no NaN), UTF-8, ending with a newline."""
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
