"""The output folder: what may be written or replaced, and an atomic write.

The merged adapter is written into a hidden temporary folder beside the output, flushed to disk
and renamed into place only when complete. Every hidden name holds the creating process's id,
``.lorax-merge-PID-TOKEN.{lock,tmp,old,commit,trash}``, so that any later run writing into the
same parent folder can tell what a killed run left behind and tidy it. A run holds a lock on its
lock file while it lives, so another run (on another host sharing the folder, or in another PID
namespace, where the id says nothing) leaves its leftovers alone. A temporary folder is deleted;
an old adapter that was moved aside is deleted only when the journal records the swap and the
output is still the very folder the run wrote (by file identity), put back when the swap never
happened and the output name is free, and otherwise kept. The old adapter is never deleted
before its replacement is in place, and only its adapter files are: a folder that holds
anything else is kept for good.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from .common import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, CliError, show
from .inputs import Adapter

_LEFTOVER = re.compile(
    r"\.lorax-merge-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{8})\.(?P<kind>lock|tmp|old|commit|trash)"
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
    """The absolute output path, with the links and ``..`` of the folders above it resolved as
    the kernel resolves them (``link/../name`` is beside the link's target, not beside the link)
    and the last part as given, so that a link there is seen and refused. An empty argument is
    refused (it would mean the current folder)."""
    if output_arg == "":
        raise CliError("--output is an empty path (an unset shell variable?); give the folder")
    joined = os.path.join(os.getcwd(), output_arg)
    parent, name = os.path.split(joined.rstrip(os.sep) or os.sep)
    if name in ("", ".", ".."):
        named = joined.rstrip(os.sep)
        while os.path.basename(named) == ".":
            named = os.path.dirname(named)
        if os.path.islink(named):  # `link/.` names the link's target, as `link` does
            raise CliError(f"--output {show(output_arg)} is a symbolic link; give the real folder")
        return Path(os.path.realpath(joined))
    return Path(os.path.realpath(parent)) / name


def _identities_up(path: str | Path) -> Iterator[os.stat_result]:
    """The identity of ``path`` (when it exists) and of every folder above it, links resolved."""
    current = os.path.realpath(path)
    while True:
        try:
            yield os.stat(current)
        except OSError:
            pass  # a part that does not exist yet
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, by file identity rather than by name:
    a bind mount, or another spelling on a case-insensitive filesystem, is no way around it."""
    try:
        target = os.stat(folder)
    except OSError:
        return False  # a folder that does not exist holds nothing
    return any(os.path.samestat(info, target) for info in _identities_up(path))


def _is_adapter_file(name: str) -> bool:
    """Whether an adapter folder usually holds a file of this name (--overwrite may delete it)."""
    return name in _ADAPTER_FILES or _ADAPTER_FILE_PATTERN.fullmatch(name) is not None


def _unexpected_entries(folder: Path) -> list[str]:
    """Entries of an existing output folder that an adapter folder does not usually hold."""
    unexpected = []
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        is_file = not entry.is_dir(follow_symlinks=False)
        if not (is_file and _is_adapter_file(entry.name)):
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


def _protected(output: Path) -> str | None:
    """Why the output may never be replaced: the root, home or current folder, or one above."""
    folders = {
        "the root folder": os.sep,
        "the home folder": os.path.expanduser("~"),
        "the current folder": os.getcwd(),
    }
    for what, folder in folders.items():
        try:
            if os.path.samestat(os.stat(output), os.stat(folder)):
                return f"is {what}"
        except OSError:
            pass
    for what, folder in folders.items():
        if _within(folder, output):
            return f"contains {what}"
    return None


def check_output(output: Path, output_arg: str, inputs: Sequence[Adapter], overwrite: bool) -> None:
    """Refuse an output that is a link, a file, a protected folder, overlaps an input (folders
    and the files read, links resolved), or exists and may not be replaced."""
    shown = show(output_arg)
    if _LEFTOVER.fullmatch(output.name):
        raise CliError(f"--output {shown} has the name of a lorax-merge leftover; choose another")
    if os.path.islink(output):
        raise CliError(f"--output {shown} is a symbolic link; give the real folder")
    ancestor = output.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"--output {shown}: {show(ancestor)} is not a folder")
    keep = [
        adapter.path / name
        for adapter in inputs
        for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)
    ]
    remove_leftovers(output.parent, keep=[adapter.path for adapter in inputs] + keep)
    reason = _protected(output)
    if reason is not None:
        raise CliError(f"--output {shown} {reason}; give a new folder or an adapter folder")
    for adapter in inputs:
        if _within(output, adapter.path):
            raise CliError(f"--output {shown} is inside the input adapter folder {adapter.shown}")
        if _within(adapter.path, output):
            raise CliError(f"--output {shown} contains the input adapter folder {adapter.shown}")
        for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
            if os.path.lexists(adapter.path / name):
                if _within(adapter.path / name, output):
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
    """Whether a process with this id runs here (one in another PID namespace, or on another
    host sharing the folder, does not show: the locks below are what count)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False where another process holds it
    or the filesystem cannot lock (then nobody can tell whether its owner still runs)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _lock_path(path: str, folder: bool = False) -> int | None:
    """An open descriptor of ``path``, locked, or None when its owner may still run."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if folder else os.O_RDWR
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    if _lock(fd):
        return fd
    os.close(fd)
    return None


class _Journal(NamedTuple):
    """What a commit journal records: the output's name, the identity (device, inode) of the
    folder that was to take that name, whether it did (the swap happened), and the status-change
    time before which the replaced adapter's files were last changed; None and False for what
    it does not hold or cannot be read."""

    output: str | None = None
    identity: tuple[int, int] | None = None
    committed: bool = False
    changed_before_ns: int | None = None


def _read_journal(journal: str | None) -> _Journal:
    if journal is None:
        return _Journal()
    try:
        with open(journal, encoding="utf-8") as handle:
            record = json.load(handle)
        name = record["output"]
    except (OSError, ValueError, KeyError, TypeError):
        return _Journal()
    if not (isinstance(name, str) and name and os.sep not in name and name not in (".", "..")):
        return _Journal()
    identity = record.get("identity")
    valid = isinstance(identity, list) and len(identity) == 2
    if not (valid and all(isinstance(v, int) for v in identity)):
        return _Journal(name)
    cutoff = record.get("changed_before_ns")
    committed = record.get("committed") is True and isinstance(cutoff, str) and cutoff.isdigit()
    return _Journal(name, (identity[0], identity[1]), committed, int(cutoff) if committed else None)


def _delete_replaced(folder: str | Path, changed_before_ns: int) -> str | None:
    """Delete a replaced adapter folder: the adapter files it held (by name, and only those whose
    status last changed before ``changed_before_ns``, a time taken before the folder was moved
    aside), then the folder. Anything else keeps it: a file that reached it later, written or
    moved there by a process that had it as its current folder say (a move, a copy that keeps
    its times, and a write all set the status-change time, which no one can set back).
    Returns None when the folder is gone, else why it is kept. A link is never followed."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(folder, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return f"it cannot be opened as a folder ({exc.strerror})"
    try:
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRWXU)
        kept = []
        with os.scandir(fd) as scan:
            entries = list(scan)
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            before = info.st_ctime_ns < changed_before_ns  # (in the same clock tick: kept)
            if _is_adapter_file(entry.name) and not stat.S_ISDIR(info.st_mode) and before:
                os.unlink(entry.name, dir_fd=fd)
            else:
                kept.append(show(entry.name))
        if kept:
            return f"it received {_listed(kept)} after the swap"
    except OSError as exc:
        return f"it cannot be emptied ({exc.strerror})"
    finally:
        os.close(fd)
    try:
        os.rmdir(folder)
    except OSError as exc:
        return f"it cannot be removed ({exc.strerror})"
    return None


def _settle_old_adapter(old: str, journal: str, record: _Journal, parent: Path) -> None:
    """A replaced adapter of a dead run. Before the swap (the journal does not record it) it is
    put back when the output name is free; after it, it is deleted when the output is still
    the folder the run wrote. Otherwise it is kept. Once its deletion stops short (something
    else reached it), it is kept for good: its journal goes, and with it any later attempt."""
    if record.output is None:
        return
    output = parent / record.output
    try:
        info = os.lstat(output)
    except FileNotFoundError:
        if not record.committed:
            os.rename(old, output)  # the kill came between the two renames
        return
    cutoff = record.changed_before_ns  # recorded with the swap
    if cutoff is not None and (info.st_dev, info.st_ino) == record.identity:
        if _delete_replaced(old, cutoff) is not None:
            os.unlink(journal)


def remove_leftovers(parent: Path, keep: Sequence[Path] = ()) -> None:
    """Tidy what runs that no longer exist left in ``parent`` (see the module's docstring),
    never touching one that is, or holds, a ``keep`` path (the inputs and their files)."""
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
        if any(_within(path, part) for path in keep for part in parts.values()):
            continue
        _tidy_run(parent, parts)


def _tidy_run(parent: Path, parts: dict[str, str]) -> None:
    """Tidy one dead run's leftovers under the lock its living owner would hold, its lock file.
    Leftovers of earlier versions have none: they are tidied under locks on their temporary
    folder and journal, which keep two tidies off one run at once."""
    lock, old, journal = parts.get("lock"), parts.get("old"), parts.get("commit")
    temporary, trash = parts.get("tmp"), parts.get("trash")
    held = []
    try:
        lockable = [(lock, False)] if lock is not None else [(temporary, True), (journal, False)]
        for path, folder in lockable:
            if path is not None:
                fd = _lock_path(path, folder)
                if fd is None:
                    return  # its run still holds it, or nobody can tell
                held.append(fd)
        if not held:
            return  # an old adapter alone: without its journal, nothing says where it belongs
        if old is not None and journal is not None:
            _settle_old_adapter(old, journal, _read_journal(journal), parent)
        if temporary is not None:
            # Renamed first: a run that still writes it (one whose lock this filesystem could
            # not show) then fails at its commit instead of committing a half-deleted folder.
            trash = temporary[: -len("tmp")] + "trash"
            os.rename(temporary, trash)
        if trash is not None:
            shutil.rmtree(trash)  # never committed
        if journal is not None and not (old is not None and os.path.lexists(old)):
            os.unlink(journal)
        if lock is not None:
            os.unlink(lock)
    except OSError:
        return  # another run is tidying the same leftovers
    finally:
        for fd in held:
            os.close(fd)


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
        except BaseException:
            self.committing = False
            raise  # the run ends anyway, and its error says more than the signal would
        self.committing = False
        if not self.committed and self._deferred is not None:
            self._stop(self._deferred)


_UNCOMMITTED = b'false, "changed_before_ns": "' + b"0" * 20 + b'"}'


def _write_journal(path: Path, output: Path, temporary: Path) -> tuple[int, int]:
    """Write the commit journal, flushed, and return its descriptor and the offset of its
    uncommitted tail, which _mark_committed overwrites. (The run's lock file guards it.)

    It records the output's name, the identity of the folder that is to take it, and whether it
    did: an identity alone proves nothing once its folder is gone (inode numbers are reused).
    """
    info = os.stat(temporary)
    record = json.dumps({"output": output.name, "identity": [info.st_dev, info.st_ino]})
    head = (record[:-1] + ', "committed": ').encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, head + _UNCOMMITTED)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, len(head)


def _mark_committed(fd: int, offset: int, changed_before_ns: int) -> None:
    """Record the swap, and the time before which the replaced adapter's files last changed:
    one small write of the journal's fixed-width tail, flushed."""
    tail = f'true , "changed_before_ns": "{changed_before_ns:020d}"}}'.encode()
    assert len(tail) == len(_UNCOMMITTED)
    os.pwrite(fd, tail, offset)
    os.fsync(fd)


def _refuse_putting_back(old: Path, output: Path, journal: Path, message: str) -> NoReturn:
    """Return the moved-aside adapter to its name and refuse with ``message``. Where the name
    was taken meanwhile, keep the adapter aside with its journal (which lets a later run put it
    back, never delete it: the commit did not happen) and say where it is."""
    try:
        os.rename(old, output)
    except OSError:
        raise CliError(
            f"{message}; its name was taken meanwhile, so the adapter that was there is kept "
            f"in {show(str(old))}"
        ) from None
    os.unlink(journal)
    raise CliError(message)


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
    journal_fd, committed_at = _write_journal(journal, output, temporary)
    # The status-change time of the journal, just written, is the filesystem's own clock:
    # every file of the replaced adapter changed before it; a file that reaches the folder
    # once it is moved aside changes after it.
    changed_before_ns = os.fstat(journal_fd).st_ctime_ns
    try:
        try:
            _fsync_path(output.parent)  # the journal is on disk before the old adapter moves
            os.rename(output, old)
        except OSError:
            os.unlink(journal)
            raise
        if not stat.S_ISDIR(os.lstat(old).st_mode):
            _refuse_putting_back(old, output, journal, f"--output {shown} became a link")
        try:
            _check_replaceable(old, shown)  # a file added since the last check is not lost
        except CliError as exc:
            _refuse_putting_back(old, output, journal, f"{exc} (it changed while merging)")
        try:
            os.rename(temporary, output)
        except OSError as exc:
            message = f"--output {shown}: cannot move the merged adapter in ({exc.strerror})"
            _refuse_putting_back(old, output, journal, message)
        try:  # the new adapter is in place: what follows tidies, and cannot fail the run
            _mark_committed(journal_fd, committed_at, changed_before_ns)
            _fsync_path(output.parent)  # the new name is on disk before the old adapter goes
            kept = _delete_replaced(old, changed_before_ns)
            os.unlink(journal)  # kept or not, nothing more is done to it
            if kept is not None:
                sys.stderr.write(
                    f"lorax-merge: warning: the replaced adapter folder is kept in "
                    f"{show(str(old))}: {kept}\n"
                )
        except OSError:
            pass  # a later run finishes the tidying from the journal
    finally:
        os.close(journal_fd)


def _take_run_lock(path: Path, shown: str) -> int:
    """Create and lock the run's lock file, held for as long as the run lives: other runs, on
    this host or another sharing the folder, then leave the run's hidden folders alone. (A
    filesystem that cannot lock leaves it unlocked; other runs then cannot tell, and wait.)"""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot create a file beside it ({exc.strerror or exc})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CliError(f"--output {shown}: another process took this run's lock") from None
    except OSError:
        pass
    return fd


@contextmanager
def atomic_output(
    output: Path, output_arg: str, overwrite: bool, guard: CommitGuard
) -> Iterator[Path]:
    """Yield a new temporary folder beside ``output``; move it to ``output`` when the block ends.

    An exception in the block (or a signal turned into one) removes the temporary folder and
    leaves ``output`` as it was. ``guard`` learns when the new adapter is in place. A folder that
    replaces an existing one takes its permissions.
    """
    shown = show(output_arg)
    base = f".lorax-merge-{os.getpid()}-{secrets.token_hex(4)}"
    lock, temporary = output.parent / f"{base}.lock", output.parent / f"{base}.tmp"
    try:
        os.makedirs(output.parent, exist_ok=True)
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot create the folder above it ({exc.strerror or exc})"
        ) from None
    lock_fd = _take_run_lock(lock, shown)
    folder_fd = None
    try:
        try:
            os.mkdir(temporary)
            folder_fd = os.open(temporary, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise CliError(
                f"--output {shown}: cannot create a folder beside it ({exc.strerror or exc})"
            ) from None
        yield temporary
        mode = None
        if os.path.isdir(output) and not os.path.islink(output):
            # The replaced folder's permissions; the owner keeps full access until the commit,
            # so that the folder can still be written, synced and deleted.
            mode = stat.S_IMODE(os.stat(output).st_mode)
            os.chmod(temporary, mode | stat.S_IRWXU)
        _fsync_path(temporary)
        with guard.commit_section():
            _commit(temporary, output, base, overwrite, shown)
            guard.committed = True
        if mode is not None:
            try:
                os.fchmod(folder_fd, mode)  # the descriptor follows the folder to its new name
            except OSError:
                pass
        try:
            _fsync_path(output.parent)
        except OSError:
            pass  # the adapter is in place; only its durability across a power loss is unsure
    except OSError as exc:
        raise CliError(
            f"--output {shown}: cannot write the merged adapter ({exc.strerror or exc})"
        ) from None
    finally:
        if folder_fd is not None:
            os.close(folder_fd)
        if os.path.lexists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(lock_fd)
