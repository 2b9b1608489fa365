"""The output folder: checks before merging, and an atomic write.

The merged adapter is written into a hidden temporary folder beside the output, flushed to disk
and renamed into place only when it is complete, so that an interrupted or failed run leaves no
partial adapter behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import CliError, show
from .inputs import Adapter

_TEMP_RE = re.compile(r"\.(?P<base>.+)\.lorax-merge-(?:tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]+")


def check_output(output: Path, output_arg: str, inputs: Sequence[Adapter], overwrite: bool) -> None:
    shown = show(output_arg)
    if os.path.islink(output):
        raise CliError(f"--output {shown} is a symbolic link; give the real folder")
    ancestor = output.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"--output {shown}: {show(ancestor)} is not a folder")
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


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """Write the merged tensors as a safetensors file (PEFT's metadata) and flush it to disk."""
    import safetensors.torch

    write_file(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))


def write_file(path: Path, data: bytes) -> None:
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


@contextmanager
def atomic_output(output: Path, output_arg: str, overwrite: bool) -> Iterator[Path]:
    """Yield a new temporary folder beside ``output``; move it to ``output`` when the block ends.

    An exception in the block (or a signal turned into one) removes the temporary folder and
    leaves ``output`` as it was.
    """
    shown = show(output_arg)
    _remove_stale_temporaries(output)
    temporary = (
        output.parent / f".{output.name}.lorax-merge-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    try:
        os.makedirs(output.parent, exist_ok=True)
        os.mkdir(temporary)
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot create a folder beside it ({exc.strerror})"
        ) from None
    try:
        yield temporary
        _fsync_path(temporary)
        if os.path.lexists(output) and not overwrite and any(os.scandir(output)):
            raise CliError(f"--output {shown} was filled by someone else while merging")
        _commit(temporary, output)
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot write the merged adapter ({exc.strerror or exc})"
        ) from None
    finally:
        if os.path.lexists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
