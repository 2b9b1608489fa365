"""The output folder: what may be written or replaced, and an atomic write.

The merged adapter is written into a hidden temporary folder beside the output, flushed to disk
and renamed into place only when complete. Every hidden name holds the creating process's id,
``.lorax-merge-PID-TOKEN.{tmp,old,commit}``, so that any later run writing into the same parent
folder can tell what a killed run left behind and tidy it: a temporary folder is deleted, an old
adapter that was moved aside is deleted once its replacement is in place and put back when it
is not. The old adapter is never deleted before its replacement is in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .common import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, CliError, show
from .inputs import Adapter

_LEFTOVER = re.compile(
    r"\.lorax-merge-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{8})\.(?P<kind>tmp|old|commit)"
)
#: Files an adapter folder usually carries besides its weights: --overwrite may delete them.
_ADAPTER_FILES = frozenset({
    CONFIG_NAME, "merge_provenance.json", "README.md", ".gitattributes",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "training_args.bin", "trainer_state.json", "all_results.json", "train_results.json",
    "eval_results.json", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth",
})  # fmt: skip
_ADAPTER_FILE_PATTERN = re.compile(r".+\.(safetensors|bin)|rng_state_[0-9]+\.pth")


# ---------------------------------------------------------------------------------------- checks
def output_path(output_arg: str) -> Path:
    """The absolute output path; an empty argument is refused (it would mean the current folder)."""
    if output_arg == "":
        raise CliError("--output is an empty path (an unset shell variable?); give the folder")
    return Path(os.path.abspath(output_arg))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unexpected_entries(folder: Path) -> list[str]:
    """Entries of an existing output folder that an adapter folder does not usually hold."""
    unexpected = []
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        is_file = not entry.is_dir(follow_symlinks=False)
        known = entry.name in _ADAPTER_FILES or _ADAPTER_FILE_PATTERN.fullmatch(entry.name)
        if not (is_file and known):
            unexpected.append(show(entry.name) + ("" if is_file else "/"))
    return unexpected


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_replaceable(output: Path, shown: str) -> None:
    """Refuse to replace a folder that is neither empty nor an adapter folder."""
    try:
        names = sorted(os.listdir(output))
        unexpected = _unexpected_entries(output)
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot read the existing folder ({exc.strerror or exc})"
        ) from None
    if not names:
        return
    if CONFIG_NAME not in names:
        raise CliError(
            f"--output {shown} is not an adapter folder (no {CONFIG_NAME}), so --overwrite will "
            f"not replace it; it holds {_listed(unexpected or [show(n) for n in names])}"
        )
    if unexpected:
        raise CliError(
            f"--output {shown} holds what an adapter folder does not ({_listed(unexpected)}), so "
            "--overwrite will not replace it; move those away or choose another folder"
        )


def _protected(real_out: str) -> str | None:
    """Why the output may never be replaced: the root, home or current folder, or one above."""
    folders = {
        "the root folder": os.sep,
        "the home folder": os.path.realpath(os.path.expanduser("~")),
        "the current folder": os.path.realpath(os.getcwd()),
    }
    for what, folder in folders.items():
        if real_out == folder:
            return f"is {what}"
    for what, folder in folders.items():
        if _inside(folder, real_out):
            return f"contains {what}"
    return None


def check_output(output: Path, output_arg: str, inputs: Sequence[Adapter], overwrite: bool) -> None:
    """Refuse an output that is a link, a file, a protected folder, overlaps an input (folders
    and the files read, links resolved), or exists and may not be replaced."""
    shown = show(output_arg)
    if os.path.islink(output):
        raise CliError(f"--output {shown} is a symbolic link; give the real folder")
    ancestor = output.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"--output {shown}: {show(ancestor)} is not a folder")
    remove_leftovers(output.parent)
    real_out = os.path.realpath(output)
    reason = _protected(real_out)
    if reason is not None:
        raise CliError(f"--output {shown} {reason}; give a new folder or an adapter folder")
    for adapter in inputs:
        real_in = os.path.realpath(adapter.path)
        if _inside(real_out, real_in):
            raise CliError(f"--output {shown} is inside the input adapter folder {adapter.shown}")
        if _inside(real_in, real_out):
            raise CliError(f"--output {shown} contains the input adapter folder {adapter.shown}")
        for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
            if os.path.lexists(adapter.path / name):
                if _inside(os.path.realpath(adapter.path / name), real_out):
                    raise CliError(
                        f"--output {shown} holds {name} of the input adapter folder "
                        f"{adapter.shown} (through a symbolic link)"
                    )
    if os.path.lexists(output):
        if not output.is_dir():
            raise CliError(f"--output {shown} exists and is not a folder")
        if not overwrite:
            try:
                empty = not os.listdir(output)
            except OSError as exc:
                raise CliError(
                    f"--output {shown}: cannot read the existing folder ({exc.strerror or exc})"
                ) from None
            if not empty:
                raise CliError(
                    f"--output {shown} exists and is not empty (pass --overwrite to replace it)"
                )
        _check_replaceable(output, shown)


# ------------------------------------------------------------------------------------- leftovers
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


def _journal_target(journal: str | None) -> str | None:
    """The output name a commit journal records, or None when there is none or it is unreadable."""
    if journal is None:
        return None
    try:
        with open(journal, encoding="utf-8") as handle:
            name = json.load(handle)["output"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name and os.sep not in name else None


def _settle_old_adapter(old: str, replacement_arrived: bool, output: Path | None) -> None:
    """Delete a replaced adapter whose replacement is in place; put it back where the kill came
    between the two renames; otherwise (unknown output, name taken) keep it."""
    if output is None:
        return
    if replacement_arrived and os.path.lexists(output):
        shutil.rmtree(old)
    elif not replacement_arrived and not os.path.lexists(output):
        os.rename(old, output)


def remove_leftovers(parent: Path) -> None:
    """Tidy what runs that no longer exist left in ``parent`` (see the module's docstring)."""
    try:
        with os.scandir(parent) as scan:
            entries = list(scan)
    except OSError:
        return
    runs: dict[tuple[str, str], dict[str, str]] = {}
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is not None and not _pid_alive(int(match["pid"])):
            runs.setdefault((match["pid"], match["token"]), {})[match["kind"]] = entry.path
    for parts in runs.values():
        old, temporary, journal = parts.get("old"), parts.get("tmp"), parts.get("commit")
        target = _journal_target(journal)
        try:
            if old is not None:
                output = parent / target if target is not None else None
                _settle_old_adapter(old, temporary is None, output)
            if temporary is not None:
                shutil.rmtree(temporary)  # never committed
            if journal is not None and (old is None or not os.path.lexists(old)):
                os.unlink(journal)
        except OSError:
            continue  # another run is tidying the same leftovers


# ---------------------------------------------------------------------------------------- writing
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


class CommitGuard:
    """When SIGINT and SIGTERM end a run: at once before the commit, right after it during the
    commit (which is never cut in half), and not at all once the new adapter is in place, since
    the merge has then succeeded. ``on_signal`` is the signal handler; ``stop(signum)`` raises
    the exception that ends the run."""

    def __init__(self, stop: Callable[[int], NoReturn]) -> None:
        self._stop = stop
        self.committing = False
        self.committed = False
        self._deferred: int | None = None

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.committed:
            return
        if self.committing:
            self._deferred = signum
            return
        self._stop(signum)

    @contextmanager
    def commit_section(self) -> Iterator[None]:
        self.committing = True
        try:
            yield
        finally:
            self.committing = False
            if not self.committed and self._deferred is not None:
                self._stop(self._deferred)


def _commit(temporary: Path, output: Path, base: str, overwrite: bool, shown: str) -> None:
    """Rename the finished folder to ``output``; with ``overwrite``, replace an adapter folder."""
    try:
        os.rename(temporary, output)  # atomic; replaces only a missing or empty folder
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise CliError(
                f"--output {shown} was filled by another process while merging; nothing was "
                "replaced (pass --overwrite to replace it)"
            ) from None
    _check_replaceable(output, shown)  # again: it may have changed while merging
    journal, old = output.parent / f"{base}.commit", output.parent / f"{base}.old"
    write_file(journal, json.dumps({"output": output.name}).encode("utf-8"))
    os.rename(output, old)
    try:
        os.rename(temporary, output)
    except BaseException:
        os.rename(old, output)
        os.unlink(journal)
        raise
    shutil.rmtree(old, ignore_errors=True)
    os.unlink(journal)


@contextmanager
def atomic_output(
    output: Path, output_arg: str, overwrite: bool, guard: CommitGuard
) -> Iterator[Path]:
    """Yield a new temporary folder beside ``output``; move it to ``output`` when the block ends.

    An exception in the block (or a signal turned into one) removes the temporary folder and
    leaves ``output`` as it was. ``guard`` learns when the new adapter is in place.
    """
    shown = show(output_arg)
    base = f".lorax-merge-{os.getpid()}-{secrets.token_hex(4)}"
    temporary = output.parent / f"{base}.tmp"
    try:
        os.makedirs(output.parent, exist_ok=True)
        os.mkdir(temporary)
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot create a folder beside it ({exc.strerror or exc})"
        ) from None
    try:
        yield temporary
        _fsync_path(temporary)
        with guard.commit_section():
            _commit(temporary, output, base, overwrite, shown)
            guard.committed = True
        try:
            _fsync_path(output.parent)
        except OSError:
            pass  # the adapter is in place; only its durability across a power loss is unsure
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot write the merged adapter ({exc.strerror or exc})"
        ) from None
    finally:
        if os.path.lexists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
