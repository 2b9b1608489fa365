"""lorax-merge never destroys data: empty paths, what --overwrite may replace, races, kills at
every step of the commit, leftovers of killed runs, long names, links out of an input, and
signals while torch loads or after the commit."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adapter_tools import ROOT, assert_one_line_error, make_adapter, run_cli, tree_digest

from lorax_merge.cli import output as out_folder

ST_NAME = "adapter_model.safetensors"
CFG_NAME = "adapter_config.json"
LEFTOVER = re.compile(
    r"\.lorax-merge-(?P<pid>[0-9]+)-[0-9a-f]{8}\.(?P<kind>lock|tmp|old|commit|trash)"
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("t") / "adapter", target_modules=["q_proj"])


@pytest.fixture
def adapter(template, tmp_path) -> Path:
    path = tmp_path / "inputs" / "a"
    shutil.copytree(template, path)
    return path


def _merge(adapter: Path, out: Path | str, *extra: str) -> tuple[int, str, str]:
    return run_cli([adapter, "-o", out, "--strategy", "linear", *extra])


def _merge_ok(adapter: Path, out: Path, *extra: str) -> None:
    code, _, err = _merge(adapter, out, *extra)
    assert code == 0, err


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------------------------ empty paths
def test_empty_output_path_is_refused_and_the_current_folder_kept(adapter, tmp_path, monkeypatch):
    home = tmp_path / "work"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(home)
    code, out, err = run_cli([adapter, "-o", "", "--strategy", "linear", "--overwrite"])
    assert_one_line_error(code, out, err)
    assert "--output is an empty path" in err
    assert os.listdir(home) == ["thesis.tex"]


def test_empty_adapter_path_is_refused(adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(adapter)  # "" would otherwise read the current folder as an adapter
    code, out, err = run_cli([adapter, "", "-o", tmp_path / "out", "--strategy", "linear"])
    assert_one_line_error(code, out, err)
    assert "ADAPTER_DIR 2 is an empty path" in err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- what --overwrite may do
def test_overwrite_replaces_an_adapter_folder_with_its_usual_files(adapter, tmp_path):
    out = tmp_path / "out"
    _merge_ok(adapter, out)
    carried = ["README.md", "tokenizer.json", "training_args.bin", "rng_state_0.pth", "x.bin"]
    for name in carried:
        (out / name).write_text("old")
    _merge_ok(adapter, out, "--overwrite", "--weights", "2")
    assert sorted(os.listdir(out)) == [CFG_NAME, ST_NAME, "merge_provenance.json"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["notes.txt"], "holds what an adapter folder does not (notes.txt)"),
        (["b.txt", "a.txt", "c.txt", "d.txt", "e/"], "(a.txt, b.txt, c.txt and 2 more)"),
        (["checkpoints/"], "(checkpoints/)"),
    ],
)
def test_overwrite_refuses_an_adapter_folder_with_unexpected_entries(
    adapter, tmp_path, entries, message
):
    out = tmp_path / "out"
    _merge_ok(adapter, out)
    for entry in entries:
        if entry.endswith("/"):
            (out / entry).mkdir()
            (out / entry / "data").write_text("keep")
        else:
            (out / entry).write_text("keep")
    before = tree_digest(out)
    code, stdout, stderr = _merge(adapter, out, "--overwrite", "--weights", "2")
    assert_one_line_error(code, stdout, stderr)
    assert message in stderr
    assert tree_digest(out) == before


def test_overwrite_refuses_a_folder_that_is_not_an_adapter(adapter, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("2019.jpg", "2020.jpg", "2021.jpg", "2022.jpg"):
        (out / name).write_bytes(b"\xff\xd8")
    code, stdout, stderr = _merge(adapter, out, "--overwrite")
    assert_one_line_error(code, stdout, stderr)
    assert "is not an adapter folder (no adapter_config.json)" in stderr
    assert "2019.jpg, 2020.jpg, 2021.jpg and 1 more" in stderr
    assert len(os.listdir(out)) == 4


@pytest.mark.parametrize("where", ["current folder", "home folder", "root folder", "input parent"])
def test_protected_folders_are_never_replaced(adapter, tmp_path, monkeypatch, where):
    looks_like_adapter = tmp_path / "folder"
    looks_like_adapter.mkdir()
    (looks_like_adapter / CFG_NAME).write_text("{}")
    if where == "current folder":
        monkeypatch.chdir(looks_like_adapter)
        out, message = Path("."), "is the current folder"
    elif where == "home folder":
        monkeypatch.setenv("HOME", str(looks_like_adapter))
        out, message = looks_like_adapter, "is the home folder"
    elif where == "root folder":
        out, message = Path("/"), "is the root folder"
    else:
        out, message = adapter.parent, "contains the input adapter folder"
    code, stdout, stderr = _merge(adapter, out, "--overwrite")
    assert_one_line_error(code, stdout, stderr)
    assert message in stderr
    assert os.listdir(looks_like_adapter) == [CFG_NAME]


def test_input_file_linked_into_the_output_is_refused(template, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(template, out)  # an adapter folder --overwrite could replace
    b = tmp_path / "b"
    shutil.copytree(template, b)
    (b / CFG_NAME).unlink()
    os.symlink(out / CFG_NAME, b / CFG_NAME)
    before = tree_digest(out, b)
    code, stdout, stderr = run_cli([b, "-o", out, "--strategy", "linear", "--overwrite"])
    assert_one_line_error(code, stdout, stderr)
    assert f"holds {CFG_NAME} of the input adapter folder {b}" in stderr
    assert tree_digest(out, b) == before


# --------------------------------------------------------------------------------------- the commit
def test_commit_without_overwrite_never_replaces_a_folder_filled_meanwhile(
    adapter, tmp_path, monkeypatch
):
    out = tmp_path / "outputs" / "merged"
    out.mkdir(parents=True)  # empty: accepted at the start
    save = out_folder.save_tensors

    def save_then_someone_writes(tensors, path):
        save(tensors, path)
        (out / "their-file.txt").write_text("not yours")

    monkeypatch.setattr(out_folder, "save_tensors", save_then_someone_writes)
    code, stdout, stderr = _merge(adapter, out)
    assert_one_line_error(code, stdout, stderr)
    assert "was filled by another process while merging; nothing was replaced" in stderr
    assert os.listdir(out) == ["their-file.txt"]
    assert os.listdir(out.parent) == ["merged"]


def test_long_output_names_work(adapter, tmp_path):
    out = tmp_path / ("m" * 240)
    _merge_ok(adapter, out)
    assert (out / ST_NAME).is_file()
    assert sorted(os.listdir(tmp_path)) == ["inputs", "m" * 240]


_KILLER = """
import os, signal, sys
import lorax_merge.cli as cli

moment = os.environ["KILL_AT"]
rename, delete_replaced = os.rename, cli.output._delete_replaced

def rename_then_die(src, dst):
    rename(src, dst)
    if moment == "old adapter moved aside" and str(dst).endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)

def die_before_deleting(path, *args):
    if moment == "new adapter in place" and str(path).endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)
    return delete_replaced(path, *args)

def die_while_writing(tensors, path):
    write(tensors, path)
    if moment == "tensors written":
        os.kill(os.getpid(), signal.SIGKILL)

os.rename, cli.output._delete_replaced = rename_then_die, die_before_deleting
write, cli.output.save_tensors = cli.output.save_tensors, die_while_writing
sys.exit(cli.main(sys.argv[1:]))
"""


def _killed_merge(adapter: Path, out: Path, moment: str) -> int:
    argv = [adapter, "-o", out, "--strategy", "linear", "--weights", "2", "--overwrite"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLER, *map(str, argv)],
        env=_env(KILL_AT=moment),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    return proc.pid


def _leftovers(parent: Path) -> dict[str, int]:
    found = {}
    for name in os.listdir(parent):
        match = LEFTOVER.fullmatch(name)
        if match:
            found[match["kind"]] = int(match["pid"])
    return found


@pytest.mark.parametrize(
    ("moment", "left", "kept"),
    [
        ("tensors written", {"lock", "tmp"}, "old"),
        ("old adapter moved aside", {"lock", "tmp", "old", "commit"}, "old"),
        ("new adapter in place", {"lock", "old", "commit"}, "new"),
    ],
)
def test_a_kill_during_the_commit_never_loses_both_adapters(adapter, tmp_path, moment, left, kept):
    parent = tmp_path / "outputs"
    out = parent / "merged"
    _merge_ok(adapter, out)
    old = (out / ST_NAME).read_bytes()
    pid = _killed_merge(adapter, out, moment)
    leftovers = _leftovers(parent)
    assert set(leftovers) == left and set(leftovers.values()) == {pid}
    assert all(len(name) < 40 for name in os.listdir(parent) if name != "merged")
    # any later run writing into the same parent folder tidies what the killed run left
    _merge_ok(adapter, parent / "other", "--weights", "2")
    assert sorted(os.listdir(parent)) == ["merged", "other"]
    if kept == "old":
        assert (out / ST_NAME).read_bytes() == old
    else:
        assert (out / ST_NAME).read_bytes() == (parent / "other" / ST_NAME).read_bytes() != old
        assert json.loads((out / "merge_provenance.json").read_text())["weights"] == [2.0]


def test_a_replaced_adapter_is_kept_when_its_name_was_taken_meanwhile(adapter, tmp_path):
    parent = tmp_path / "outputs"
    out = parent / "merged"
    _merge_ok(adapter, out)
    old = (out / ST_NAME).read_bytes()
    _killed_merge(adapter, out, "old adapter moved aside")
    out.mkdir()  # the free name is taken by someone else before the next run
    (out / "theirs.txt").write_text("theirs")
    _merge_ok(adapter, parent / "other")
    assert set(_leftovers(parent)) == {"old", "commit"}  # the old adapter is not deleted
    assert os.listdir(out) == ["theirs.txt"]
    (aside,) = (n for n in os.listdir(parent) if n.endswith(".old"))
    assert (parent / aside / ST_NAME).read_bytes() == old


def _files(folder: Path) -> dict[str, bytes]:
    """A folder's files by their path inside it (to compare a folder with its moved copy)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _killed(adapter: Path, tmp_path: Path, moment: str) -> tuple[Path, Path, dict[str, bytes]]:
    """An --overwrite run over a merged output, killed at ``moment``: the parent folder, the
    output, and the files the output held before."""
    parent = tmp_path / "outputs"
    out = parent / "merged"
    _merge_ok(adapter, out)
    old = _files(out)
    _killed_merge(adapter, out, moment)
    return parent, out, old


def _aside(parent: Path) -> Path:
    """The replaced adapter that a run moved aside."""
    (aside,) = (p for p in parent.iterdir() if p.name.endswith(".old"))
    return aside


def test_a_kept_adapter_survives_later_runs_and_returns_when_its_name_is_free(adapter, tmp_path):
    parent, out, old = _killed(adapter, tmp_path, "old adapter moved aside")
    out.mkdir()  # the free name is taken by someone else before the next runs
    (out / "theirs.txt").write_text("theirs")
    for other in ("other1", "other2", "other3"):  # each run tidies again
        _merge_ok(adapter, parent / other)
        assert set(_leftovers(parent)) == {"old", "commit"}
    assert os.listdir(out) == ["theirs.txt"]
    shutil.rmtree(out)  # the name is free again: the next run puts the old adapter back
    _merge_ok(adapter, parent / "other4")
    assert _leftovers(parent) == {} and _files(out) == old


def test_a_kept_adapter_given_as_an_input_is_merged_not_tidied(adapter, tmp_path):
    parent = tmp_path / "outputs"
    out = parent / "merged"
    _merge_ok(adapter, out)
    _killed_merge(adapter, out, "old adapter moved aside")
    shutil.rmtree(next(p for p in parent.iterdir() if p.name.endswith(".tmp")))
    out.mkdir()
    aside = _aside(parent)
    before = tree_digest(aside)
    _merge_ok(aside, parent / "recovered")
    assert tree_digest(aside) == before
    assert (parent / "recovered" / ST_NAME).read_bytes() == (aside / ST_NAME).read_bytes()


def test_a_name_taken_between_the_two_renames_keeps_both_and_says_where(
    adapter, tmp_path, monkeypatch
):
    parent = tmp_path / "outputs"
    out = parent / "merged"
    _merge_ok(adapter, out)
    old = _files(out)
    rename = os.rename

    def someone_takes_the_name(src, dst):
        rename(src, dst)
        if str(dst).endswith(".old"):
            os.mkdir(out)
            (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(os, "rename", someone_takes_the_name)
    code, stdout, stderr = _merge(adapter, out, "--weights", "2", "--overwrite")
    monkeypatch.setattr(os, "rename", rename)
    assert_one_line_error(code, stdout, stderr)
    aside = _aside(parent)
    assert f"the adapter that was there is kept in {aside}" in stderr
    assert _files(aside) == old
    for other in ("other1", "other2"):
        _merge_ok(adapter, parent / other)
        assert _files(aside) == old and os.listdir(out) == ["theirs.txt"]


def test_a_file_added_just_before_the_swap_is_not_deleted(adapter, tmp_path, monkeypatch):
    out = tmp_path / "outputs" / "merged"
    _merge_ok(adapter, out)
    old = tree_digest(out)
    write_journal = out_folder._write_journal

    def journal_then_someone_writes(path, output, temporary):
        fd = write_journal(path, output, temporary)
        (out / "notes.txt").write_text("user notes")
        return fd

    monkeypatch.setattr(out_folder, "_write_journal", journal_then_someone_writes)
    code, stdout, stderr = _merge(adapter, out, "--weights", "2", "--overwrite")
    assert_one_line_error(code, stdout, stderr)
    assert "notes.txt" in stderr and "it changed while merging" in stderr
    assert (out / "notes.txt").read_text() == "user notes"
    os.unlink(out / "notes.txt")
    assert tree_digest(out) == old and os.listdir(out.parent) == ["merged"]


def test_dot_dot_after_a_link_is_the_kernels(adapter, tmp_path, monkeypatch):
    # latest -> data/models/run7: latest/../merged is data/models/merged, never work/merged.
    (tmp_path / "data" / "models" / "run7").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "latest").symlink_to(tmp_path / "data" / "models" / "run7")
    _merge_ok(adapter, work / "merged")
    (work / "merged" / "README.md").write_text("mine")
    before = tree_digest(work / "merged")
    monkeypatch.chdir(work)
    _merge_ok(adapter, Path("latest/../merged"), "--weights", "3", "--overwrite")
    assert tree_digest(work / "merged") == before
    assert (tmp_path / "data" / "models" / "merged" / ST_NAME).is_file()


def test_an_input_reached_through_a_bind_mount_is_refused_as_output(adapter, tmp_path):
    alias = tmp_path / "alias"
    alias.mkdir()
    before = tree_digest(adapter)
    script = (
        f"mount --bind {adapter.parent} {alias} && "
        f"{sys.executable} -m lorax_merge {adapter} -o {alias / adapter.name} "
        "--strategy linear --weights 2 --overwrite"
    )
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no mount namespaces here (unshare -m)")
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "is inside the input adapter folder" in proc.stderr
    assert tree_digest(adapter) == before


@pytest.mark.parametrize("locked", ["lock file", "folder (earlier versions)"])
def test_leftovers_locked_by_a_run_elsewhere_are_left_alone(adapter, tmp_path, locked):
    # A run in another PID namespace, or on another host sharing the folder, has an id that
    # means nothing here (here: one of a process that has ended); its lock is what counts.
    parent = tmp_path / "outputs"
    parent.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    theirs = parent / f".lorax-merge-{ended.pid}-0123abcd.tmp"
    theirs.mkdir()
    (theirs / ST_NAME).write_bytes(b"being written")
    if locked == "lock file":
        lock = parent / f".lorax-merge-{ended.pid}-0123abcd.lock"
        lock.write_bytes(b"")
        holder = os.open(lock, os.O_RDWR)
    else:
        holder = os.open(theirs, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        _merge_ok(adapter, parent / "merged")
        assert (theirs / ST_NAME).read_bytes() == b"being written"
    finally:
        os.close(holder)
    _merge_ok(adapter, parent / "again")  # unlocked: its run is gone
    assert not theirs.exists()


@pytest.mark.parametrize("mode", [0o700, 0o555])
def test_a_replaced_folder_keeps_its_permissions(adapter, tmp_path, mode):
    out = tmp_path / "outputs" / "kept"
    out.mkdir(parents=True)
    os.chmod(out, mode)
    _merge_ok(adapter, out)
    assert stat.S_IMODE(os.stat(out).st_mode) == mode
    _merge_ok(adapter, out, "--weights", "2", "--overwrite")
    assert stat.S_IMODE(os.stat(out).st_mode) == mode
    assert os.listdir(out.parent) == ["kept"]  # nothing left behind


def test_a_reader_that_went_away_does_not_fail_a_finished_merge(adapter, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorax_merge", adapter, "-o", out, "--strategy", "linear"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # as `lorax-merge ... | head -0` would
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert stderr == "" and (out / ST_NAME).is_file()


def test_a_reused_inode_number_does_not_pass_for_the_replacement(adapter, tmp_path):
    # Killed after the old adapter was moved aside; its stray temporary folder deleted by hand;
    # a new folder takes the output name and (as ext4 readily does) the freed inode number.
    parent, out, old = _killed(adapter, tmp_path, "old adapter moved aside")
    shutil.rmtree(next(p for p in parent.iterdir() if p.name.endswith(".tmp")))
    out.mkdir()
    (out / "notes.txt").write_text("notes")
    journal = next(p for p in parent.iterdir() if p.name.endswith(".commit"))
    record = json.loads(journal.read_text())
    record["identity"] = [os.stat(out).st_dev, os.stat(out).st_ino]  # the reuse
    journal.write_text(json.dumps(record))
    _merge_ok(adapter, parent / "other")
    aside = _aside(parent)
    assert _files(aside) == old and os.listdir(out) == ["notes.txt"]


def test_files_that_reach_the_replaced_folder_after_the_swap_are_kept(
    adapter, tmp_path, monkeypatch
):
    # A process whose current folder is the output keeps writing there after the swap.
    out = tmp_path / "outputs" / "merged"
    _merge_ok(adapter, out)
    mark_committed = out_folder._mark_committed

    def committed_then_files_arrive(fd, offset, changed_before_ns):
        mark_committed(fd, offset, changed_before_ns)
        aside = _aside(out.parent)
        (aside / "checkpoint-notes.txt").write_text("late notes")
        # a file with an adapter file's name moved in after the swap, an hour-old mtime kept
        readme = tmp_path / "README.md"
        readme.write_text("late readme")
        earlier = time.time_ns() - 3600 * 10**9
        os.utime(readme, ns=(earlier, earlier))
        os.rename(readme, aside / "README.md")

    monkeypatch.setattr(out_folder, "_mark_committed", committed_then_files_arrive)
    code, _, stderr = _merge(adapter, out, "--weights", "2", "--overwrite")
    assert code == 0, stderr
    aside = _aside(out.parent)
    assert "warning" in stderr and str(aside) in stderr
    assert sorted(os.listdir(aside)) == ["README.md", "checkpoint-notes.txt"]
    monkeypatch.setattr(out_folder, "_mark_committed", mark_committed)
    (aside / "adapter_model.safetensors").write_bytes(b"a training job's own")
    _merge_ok(adapter, out.parent / "other")  # later runs never touch a kept folder
    assert (aside / "checkpoint-notes.txt").read_text() == "late notes"
    assert (aside / "adapter_model.safetensors").read_bytes() == b"a training job's own"


def test_the_tidy_keeps_files_that_reached_a_replaced_folder(adapter, tmp_path):
    parent, out, _ = _killed(adapter, tmp_path, "new adapter in place")
    aside = _aside(parent)
    (aside / "checkpoint-900").mkdir()
    (aside / "checkpoint-900" / "model.bin").write_bytes(b"weights")
    _merge_ok(adapter, parent / "other")
    assert (aside / "checkpoint-900" / "model.bin").read_bytes() == b"weights"
    assert json.loads((out / "merge_provenance.json").read_text())["weights"] == [2.0]


def test_a_link_swapped_in_just_before_the_swap_is_put_back_and_refused(
    adapter, tmp_path, monkeypatch
):
    out = tmp_path / "outputs" / "merged"
    _merge_ok(adapter, out)
    victim = tmp_path / "victim"
    _merge_ok(adapter, victim)
    before = _files(victim)
    write_journal = out_folder._write_journal

    def journal_then_a_link_replaces_the_output(path, output, temporary):
        result = write_journal(path, output, temporary)
        os.rename(out, out.parent / "moved-by-someone")
        out.symlink_to(victim)
        return result

    monkeypatch.setattr(out_folder, "_write_journal", journal_then_a_link_replaces_the_output)
    code, stdout, stderr = _merge(adapter, out, "--weights", "2", "--overwrite")
    assert_one_line_error(code, stdout, stderr)
    assert "became a link" in stderr
    assert out.is_symlink() and _files(victim) == before
    monkeypatch.setattr(out_folder, "_write_journal", write_journal)
    _merge_ok(adapter, out.parent / "other")
    assert _files(victim) == before


def test_files_an_input_links_into_a_leftover_are_not_tidied(adapter, tmp_path):
    parent, _, _ = _killed(adapter, tmp_path, "new adapter in place")
    aside = _aside(parent)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in (CFG_NAME, ST_NAME):
        (linked / name).symlink_to(aside / name)
    before = _files(aside)
    _merge_ok(linked, parent / "recovered")
    assert _files(aside) == before


def test_a_committed_replacement_moved_away_does_not_bring_the_old_adapter_back(adapter, tmp_path):
    parent, out, _ = _killed(adapter, tmp_path, "new adapter in place")
    os.rename(out, parent / "merged-v2")  # the user keeps the new adapter under another name
    _merge_ok(adapter, parent / "other")
    assert not out.exists()
    assert set(_leftovers(parent)) == {"old", "commit"}  # the old one is kept, aside


def test_the_tidy_keeps_a_file_moved_into_a_replaced_folder_with_its_old_times(adapter, tmp_path):
    # A shell whose current folder was the output follows it aside; `mv` keeps the file's
    # modification time (here an hour old), but not its status-change time.
    parent, _, _ = _killed(adapter, tmp_path, "new adapter in place")
    aside = _aside(parent)
    readme = tmp_path / "README.md"
    readme.write_text("my only copy")
    earlier = time.time_ns() - 3600 * 10**9
    os.utime(readme, ns=(earlier, earlier))
    os.rename(readme, aside / "README.md")
    _merge_ok(adapter, parent / "other")
    assert (aside / "README.md").read_text() == "my only copy"


@pytest.mark.parametrize("name", [".lorax-merge-999999-deadbeef.tmp", "lnk/."])
def test_outputs_named_as_leftovers_or_links_are_refused(adapter, tmp_path, name):
    (tmp_path / "target").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "target")
    code, stdout, stderr = _merge(adapter, f"{tmp_path}{os.sep}{name}")  # (a Path drops "/.")
    assert_one_line_error(code, stdout, stderr)
    assert os.listdir(tmp_path / "target") == []


def test_leftovers_of_a_running_process_are_left_alone(adapter, tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = parent / f".lorax-merge-{sleeper.pid}-0123abcd.tmp"
        theirs.mkdir()
        _merge_ok(adapter, parent / "merged")
        assert theirs.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    _merge_ok(adapter, parent / "again")
    assert not theirs.exists()


# ------------------------------------------------------------------------------------------ signals
_SIGNAL_WHEN_TORCH_LOADS = """
import os, signal, sys

class SignalWhenTorchLoads:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_AT_TORCH"]))
        return None

sys.meta_path.insert(0, SignalWhenTorchLoads())
"""


@pytest.mark.parametrize("how", ["lorax-merge script", "python -m lorax_merge", "library import"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_torch_loads(adapter, tmp_path, how, sig):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SIGNAL_WHEN_TORCH_LOADS)
    script = site / "lorax-merge"  # what pip writes for the console script
    script.write_text("import sys\nfrom lorax_merge.cli import main\nsys.exit(main())\n")
    args = [str(adapter), "-o", str(tmp_path / "out"), "--strategy", "linear"]
    command = {
        "lorax-merge script": [sys.executable, str(script), *args],
        "python -m lorax_merge": [sys.executable, "-m", "lorax_merge", *args],
        "library import": [sys.executable, "-c", "import lorax_merge"],
    }[how]
    env = _env(SIGNAL_AT_TORCH=sig)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    proc = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        # A test run started in the background has SIGINT ignored (a shell's `&` does that),
        # which children inherit, and Python then installs no KeyboardInterrupt handler: give
        # the child the default disposition an interactive command has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if sig == "SIGTERM":  # quiet, as a killed process: exit status 143 in a shell
        assert (proc.returncode, proc.stderr) == (-signal.SIGTERM, "")
    elif how == "library import":  # a library never swallows KeyboardInterrupt
        assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in proc.stderr
    else:
        assert (proc.returncode, proc.stderr) == (130, "lorax-merge: error: interrupted\n")
    assert not (tmp_path / "out").exists()


_TERMINATED_AFTER_COMMIT = """
import os, signal, sys, time
import lorax_merge.cli as cli

summary = cli.report.summary

def terminated_while_reporting(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs during the sleep
    return summary(*args)

cli.report.summary = terminated_while_reporting
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_after_the_commit_reports_success(adapter, tmp_path):
    out = tmp_path / "out"
    argv = [str(adapter), "-o", str(out), "--strategy", "linear"]
    proc = subprocess.run(
        [sys.executable, "-c", _TERMINATED_AFTER_COMMIT, *argv],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("Merged 1 adapter")
    assert (out / ST_NAME).is_file()


_SIGNALLED_AT_SHUTDOWN = """
import os, signal, sys, time
from lorax_merge.cli import main

code = main()
for sig in (signal.SIGTERM, signal.SIGINT):  # as the interpreter shuts down
    os.kill(os.getpid(), sig)
time.sleep(0.5)
sys.exit(code)
"""


def test_signals_after_a_successful_command_leave_its_exit_code_0(adapter, tmp_path):
    script = tmp_path / "lorax-merge"  # what pip writes for the console script
    script.write_text(_SIGNALLED_AT_SHUTDOWN)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), str(adapter), "-o", str(out), "--strategy", "linear"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (out / ST_NAME).is_file()


def test_sigterm_during_the_commit_waits_for_it(adapter, tmp_path, monkeypatch):
    """A signal in the middle of the commit is acted on once the commit is done: here after
    the new adapter is in place, so the run succeeds."""
    out = tmp_path / "out"
    _merge_ok(adapter, out)
    rename = os.rename

    def rename_and_signal(src, dst):
        rename(src, dst)
        if str(dst).endswith(".old"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    monkeypatch.setattr(os, "rename", rename_and_signal)
    code, stdout, stderr = _merge(adapter, out, "--overwrite", "--weights", "2")
    assert (code, stderr) == (0, "")
    assert json.loads((out / "merge_provenance.json").read_text())["weights"] == [2.0]
    assert sorted(os.listdir(out.parent)) == ["inputs", "out"]
