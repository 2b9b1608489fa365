"""Hostile adapter folders for ``lorax-merge``, beyond the bad inputs of ``test_cli.py``.

Configurations with missing, wrong-typed or out-of-range fields, safetensors headers that lie
in every field, legacy ``.bin`` files that are not plain dictionaries of tensors, FIFOs and
folders where files should be, symbolic-link loops, output paths that reach an input through
``..`` or a symbolic link, and fuzzed configurations, headers and ``.bin`` files. Every bad
input must give exit code 2 and exactly one line on stderr, with no traceback, no output
folder or temporary left behind, and the inputs untouched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from adapter_tools import (
    ROOT,
    assert_one_line_error,
    load_tensors,
    make_adapter,
    run_cli,
    tree_digest,
)
from hypothesis import given
from hypothesis import strategies as st

ST_NAME = "adapter_model.safetensors"
CFG_NAME = "adapter_config.json"
BIN_NAME = "adapter_model.bin"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One valid adapter (rank 8, q_proj and v_proj), copied for every case."""
    return make_adapter(
        tmp_path_factory.mktemp("template") / "adapter", target_modules=["q_proj", "v_proj"]
    )


# ------------------------------------------------------------------------------------ helpers


def _config(folder: Path) -> dict:
    return json.loads((folder / CFG_NAME).read_text())


def _set_config(folder: Path, **fields) -> None:
    config = _config(folder)
    for key, value in fields.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    (folder / CFG_NAME).write_text(json.dumps(config))


def _replace_in_config(folder: Path, old: str, new: str) -> None:
    text = (folder / CFG_NAME).read_text()
    assert old in text
    (folder / CFG_NAME).write_text(text.replace(old, new))


_DROP = object()


def _read_safetensors(folder: Path) -> tuple[dict, bytes]:
    data = (folder / ST_NAME).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_safetensors(folder: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (folder / ST_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_header(folder: Path, edit) -> None:
    header, body = _read_safetensors(folder)
    first = next(k for k in header if k != "__metadata__")
    result = edit(header, header[first], body)
    _write_safetensors(folder, header, body if result is None else result)


def _to_bin(folder: Path, state: object) -> None:
    (folder / ST_NAME).unlink()
    torch.save(state, folder / BIN_NAME)


def _assert_rejected(argv, root: Path, out: Path, message: str | None, inputs: Path) -> None:
    before = tree_digest(inputs)
    listing = sorted(os.listdir(out.parent))
    code, stdout, stderr = run_cli([*argv, "-o", out])
    assert_one_line_error(code, stdout, stderr)
    if message is not None:
        assert message in stderr, stderr
    assert not os.path.lexists(out), "an output appeared"
    assert sorted(os.listdir(out.parent)) == listing, "something was left beside the output"
    assert tree_digest(inputs) == before, "an input was modified"


def _gap_after_first(header: dict, first: dict, body: bytes) -> bytes:
    """Move every tensor but the first 4 bytes on: a gap after the first one's data."""
    for name, value in header.items():
        if value is not first and name != "__metadata__":
            value["data_offsets"] = [o + 4 for o in value["data_offsets"]]
    return body + b"\0" * 4


def _surrogate_name(header: dict, first: dict, body: bytes) -> None:
    """Rename the first tensor to a name holding an unpaired UTF-16 surrogate."""
    name = next(k for k in header if k != "__metadata__")
    header["x\ud800." + name] = header.pop(name)


def _all_scalars(folder: Path) -> None:
    """Replace every tensor by a 0-D one (the other adapter has the matrices)."""
    names = [k for k in _read_safetensors(folder)[0] if k != "__metadata__"]
    header = {k: {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]}
              for i, k in enumerate(names)}  # fmt: skip
    _write_safetensors(folder, header, b"\0" * (4 * len(names)))


# ------------------------------------------------------------------------- one case at a time

# name -> (mutation of the "bad" adapter folder, extra arguments, expected message part).
# The command merges [bad, good] (the bad adapter first, so that its config is the one copied
# into the merged adapter) with --strategy ties.
CASES = {
    # configurations: missing, wrong-typed and out-of-range fields
    "config without r": (lambda f: _set_config(f, r=_DROP), [], "'r' must be a positive integer"),
    "config r is a boolean": (lambda f: _set_config(f, r=True), [], "'r' must be a positive"),
    "config r is zero": (lambda f: _set_config(f, r=0), [], "'r' must be a positive integer"),
    "config r is a float": (lambda f: _set_config(f, r=8.0), [], "'r' must be a positive"),
    "config r is null": (lambda f: _set_config(f, r=None), [], "'r' must be a positive integer"),
    "config target_modules holds numbers": (
        lambda f: _set_config(f, target_modules=["q_proj", 3]),
        [],
        "'target_modules' must be",
    ),
    "config target_modules is an object": (
        lambda f: _set_config(f, target_modules={"q_proj": True}),
        [],
        "'target_modules' must be",
    ),
    "config peft_type is a number": (lambda f: _set_config(f, peft_type=5), [], "only LoRA"),
    "config lora_alpha is a string, peft weighting": (
        lambda f: _set_config(f, lora_alpha="16"),
        ["--weighting", "peft"],
        "'lora_alpha' must be a finite number",
    ),
    "config use_rslora is a string, peft weighting": (
        lambda f: _set_config(f, use_rslora="yes"),
        ["--weighting", "peft"],
        "'use_rslora' must be true or false",
    ),
    "config lora_alpha overflows a float, peft weighting": (
        lambda f: _replace_in_config(f, '"lora_alpha": 16', '"lora_alpha": 1' + "0" * 400),
        ["--weighting", "peft"],
        "lora_alpha",
    ),
    "config number out of the float range": (
        lambda f: _replace_in_config(f, '"lora_dropout": 0.0', '"lora_dropout": 1e999'),
        [],
        "lora_dropout",
    ),
    "config with duplicate keys": (
        lambda f: (f / CFG_NAME).write_text('{"r": 8, "target_modules": ["q_proj"], "r": 4}'),
        [],
        "duplicate key 'r'",
    ),
    "config nested too deeply": (
        lambda f: (f / CFG_NAME).write_text('{"r": 8, "x": ' + "[" * 200_000 + "]" * 200_000 + "}"),
        [],
        "nested too deeply",
    ),
    "config too large": (
        lambda f: (f / CFG_NAME).write_text('{"r": 8, "pad": "' + "x" * (17 << 20) + '"}'),
        [],
        "too large",
    ),
    "config is a folder": (
        lambda f: ((f / CFG_NAME).unlink(), (f / CFG_NAME).mkdir()),
        [],
        "is a folder, expected a file",
    ),
    # safetensors headers that lie
    "header size near 2**64": (
        lambda f: (f / ST_NAME).write_bytes(b"\xff" * 8 + (f / ST_NAME).read_bytes()[8:]),
        [],
        "the header claims",
    ),
    "header is a JSON array": (
        lambda f: _write_safetensors(f, b"[1, 2, 3]", b""),
        [],
        "not a JSON object",
    ),
    "header nested too deeply": (
        lambda f: _write_safetensors(f, b"[" * 100_000 + b"]" * 100_000, b""),
        [],
        "corrupt safetensors header",
    ),
    "header not UTF-8": (
        lambda f: _write_safetensors(f, b'{"\xff\xfe": 1}', b""),
        [],
        "corrupt safetensors header",
    ),
    "header names a tensor twice": (
        lambda f: _write_safetensors(
            f,
            b'{"a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            b"\0" * 8,
        ),
        [],
        "duplicate key",
    ),
    "header entry is not an object": (
        lambda f: _edit_header(f, lambda h, e, b: h.update({"x.lora_A.weight": [1, 2]})),
        [],
        "corrupt header entry",
    ),
    "header metadata is not strings": (
        lambda f: _edit_header(f, lambda h, e, b: h.update({"__metadata__": {"format": 1}})),
        [],
        "__metadata__ must map strings to strings",
    ),
    "unknown dtype": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(dtype="F128")),
        [],
        "unknown dtype 'F128'",
    ),
    "dtype is not a string": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(dtype=32)),
        [],
        "unknown dtype 32",
    ),
    "boolean tensor": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(dtype="BOOL")),
        [],
        "has dtype BOOL, not a floating-point type",
    ),
    "8-bit float tensor": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(dtype="F8_E4M3")),
        [],
        "has dtype F8_E4M3, an 8-bit float format; only F32, F16, BF16 and F64",
    ),
    "negative shape": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(shape=[-8, -64])),
        [],
        "invalid shape",
    ),
    "shape of booleans": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(shape=[True, 512])),
        [],
        "invalid shape",
    ),
    "shape larger than its data": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(shape=[8, 65])),
        [],
        "needs 2080 bytes but its data spans 2048",
    ),
    "shape whose size overflows 64 bits": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(shape=[2**62, 2**62, 2**62])),
        [],
        "but its data spans 2048",
    ),
    "offsets are floats": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(data_offsets=[0.0, 2048.0])),
        [],
        "invalid data offsets",
    ),
    "offsets reversed": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(data_offsets=e["data_offsets"][::-1])),
        [],
        "invalid data offsets",
    ),
    "offsets missing": (
        lambda f: _edit_header(f, lambda h, e, b: e.update(data_offsets=None)),
        [],
        "invalid data offsets None",
    ),
    "gap between tensors": (lambda f: _edit_header(f, _gap_after_first), [], "leaves a gap"),
    "bytes after the last tensor": (
        lambda f: _edit_header(f, lambda h, e, b: b + b"\0" * 16),
        [],
        "16 bytes after the last tensor's data",
    ),
    "tensor name with a lone surrogate": (
        lambda f: _edit_header(f, _surrogate_name),
        [],
        "cannot read the tensors",
    ),
    "scalars where the other adapter has matrices": (_all_scalars, [], "has shape [], but 'r'"),
    "weights file is a folder": (
        lambda f: ((f / ST_NAME).unlink(), (f / ST_NAME).mkdir()),
        [],
        "is a folder, expected a file",
    ),
    # legacy .bin files that are not plain dictionaries of tensors
    "bin of random bytes": (
        lambda f: ((f / ST_NAME).unlink(), (f / BIN_NAME).write_bytes(os.urandom(4096))),
        [],
        "cannot be loaded as plain tensors",
    ),
    "truncated bin": (
        lambda f: (
            _to_bin(f, load_tensors(f)),
            (f / BIN_NAME).write_bytes((f / BIN_NAME).read_bytes()[:1500]),
        ),
        [],
        "cannot be loaded as plain tensors",
    ),
    "bin holding a list": (
        lambda f: _to_bin(f, [torch.ones(2)]),
        [],
        "expected a dictionary of tensors, got list",
    ),
    "bin with integer keys": (
        lambda f: _to_bin(f, {1: torch.ones(2)}),
        [],
        "tensor names must be strings",
    ),
    "bin with a number instead of a tensor": (
        lambda f: _to_bin(f, {"x.lora_A.weight": 3.0}),
        [],
        "is not a dense tensor",
    ),
    "bin with a sparse tensor": (
        lambda f: _to_bin(f, {"x.lora_A.weight": torch.eye(3).to_sparse()}),
        [],
        "is not a dense tensor",
    ),
    "bin with a nested dictionary": (
        lambda f: _to_bin(f, {"x": {"lora_A.weight": torch.ones(2)}}),
        [],
        "is not a dense tensor",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_adapter_is_one_line_and_exit_2(template, tmp_path, name):
    mutate, extra, message = CASES[name]
    inputs = tmp_path / "inputs"
    good = inputs / "good"
    bad = inputs / "bad"
    shutil.copytree(template, good)
    shutil.copytree(template, bad)
    mutate(bad)
    argv = [bad, good, "--strategy", "ties", *extra]
    _assert_rejected(argv, tmp_path, tmp_path / "out", message, inputs)


# ------------------------------------------------------------------ folders, links and outputs


def _two(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    inputs = tmp_path / "inputs"
    a, b = inputs / "a", inputs / "b"
    shutil.copytree(template, a)
    shutil.copytree(template, b)
    return a, b


def test_symlink_loop_as_adapter_folder(template, tmp_path):
    a, _ = _two(template, tmp_path)
    loop1, loop2 = tmp_path / "inputs" / "loop1", tmp_path / "inputs" / "loop2"
    os.symlink(loop2, loop1)
    os.symlink(loop1, loop2)
    argv = [a, loop1, "--strategy", "linear"]
    _assert_rejected(argv, tmp_path, tmp_path / "out", "cannot access adapter folder", a.parent)


def test_symlink_to_a_file_as_adapter_folder(template, tmp_path):
    a, _ = _two(template, tmp_path)
    link = tmp_path / "inputs" / "link"
    os.symlink(a / CFG_NAME, link)
    argv = [a, link, "--strategy", "linear"]
    _assert_rejected(argv, tmp_path, tmp_path / "out", "not a folder", a.parent)


def test_weights_file_linked_to_a_folder(template, tmp_path):
    a, b = _two(template, tmp_path)
    (b / ST_NAME).unlink()
    os.symlink(a, b / ST_NAME)
    argv = [a, b, "--strategy", "linear"]
    _assert_rejected(argv, tmp_path, tmp_path / "out", "is a folder, expected a file", a.parent)


def test_symlinked_adapter_folder_merges_like_the_real_one(template, tmp_path):
    """A link to a valid adapter (as in the Hugging Face cache) is followed, not refused."""
    a, b = _two(template, tmp_path)
    link = tmp_path / "inputs" / "link"
    os.symlink(b, link)
    code, _, err = run_cli([a, link, "-o", tmp_path / "via_link", "--strategy", "ties"])
    assert code == 0, err
    code, _, err = run_cli([a, b, "-o", tmp_path / "direct", "--strategy", "ties"])
    assert code == 0, err
    assert (tmp_path / "via_link" / ST_NAME).read_bytes() == (
        tmp_path / "direct" / ST_NAME
    ).read_bytes()


@pytest.mark.parametrize("how", ["through a linked parent", "through ..", "into the second input"])
def test_output_that_resolves_into_an_input_is_refused(template, tmp_path, how):
    a, b = _two(template, tmp_path)
    if how == "through a linked parent":
        os.symlink(b, tmp_path / "elsewhere")
        out = tmp_path / "elsewhere" / "merged"
    elif how == "through ..":
        out = Path(str(a) + "/../b/merged")
    else:
        out = b / "sub" / "merged"
    before = tree_digest(tmp_path / "inputs")
    code, stdout, stderr = run_cli([a, b, "-o", out, "--strategy", "linear", "--overwrite"])
    assert_one_line_error(code, stdout, stderr)
    assert "is inside the input adapter folder" in stderr
    assert tree_digest(tmp_path / "inputs") == before
    assert sorted(os.listdir(b)) == sorted(os.listdir(template))


def test_output_that_is_a_symlink_is_refused(template, tmp_path):
    a, b = _two(template, tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(target, tmp_path / "out")
    code, stdout, stderr = run_cli([a, b, "-o", tmp_path / "out", "--strategy", "linear"])
    assert_one_line_error(code, stdout, stderr)
    assert "symbolic link" in stderr
    assert os.listdir(target) == []


def test_path_with_a_newline_stays_one_line(template, tmp_path):
    a, _ = _two(template, tmp_path)
    argv = [a, tmp_path / "no\nsuch\nadapter", "--strategy", "linear"]
    _assert_rejected(argv, tmp_path, tmp_path / "out", "adapter folder not found", a.parent)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_weights_file(template, tmp_path):
    a, b = _two(template, tmp_path)
    os.chmod(b / ST_NAME, 0)
    try:
        code, stdout, stderr = run_cli([a, b, "-o", tmp_path / "out", "--strategy", "linear"])
    finally:
        os.chmod(b / ST_NAME, 0o644)
    assert_one_line_error(code, stdout, stderr)
    assert "cannot open" in stderr
    assert not (tmp_path / "out").exists()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("which", [CFG_NAME, ST_NAME])
def test_fifo_instead_of_a_file_does_not_block(template, tmp_path, which):
    """A FIFO with no writer would block a plain open(): run in a process with a deadline."""
    a, b = _two(template, tmp_path)
    (b / which).unlink()
    os.mkfifo(b / which)
    proc = subprocess.run(
        [sys.executable, "-m", "lorax_merge", a, b, "-o", tmp_path / "out", "--strategy", "ties"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "is not a regular file" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ fuzzing


def _fuzz(template: Path, files: dict[str, bytes]) -> tuple[int, str, str]:
    """Merge [template, bad copy with ``files`` replaced]; check the invariants of a refusal."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bad = root / "bad"
        shutil.copytree(template, bad)
        for name, data in files.items():
            if name == BIN_NAME and (bad / ST_NAME).exists():
                (bad / ST_NAME).unlink()
            (bad / name).write_bytes(data)
        before = tree_digest(bad)
        result = run_cli([bad, template, "-o", root / "out", "--strategy", "ties"])
        assert tree_digest(bad) == before
        if result[0] != 0:
            assert_one_line_error(*result)
            assert not (root / "out").exists()
            assert sorted(os.listdir(root)) == ["bad"]
        else:
            assert json.loads((root / "out" / CFG_NAME).read_text())  # a valid merged config
        return result


@given(data=st.binary(max_size=2048))
def test_random_bytes_as_bin_file(template, data):
    code, stdout, stderr = _fuzz(template, {BIN_NAME: data})
    assert_one_line_error(code, stdout, stderr)


@given(data=st.data())
def test_damaged_bin_file(template, data):
    buf = io.BytesIO()
    torch.save({"x.lora_A.weight": torch.ones(2, 2)}, buf)
    damaged = bytearray(buf.getvalue())
    cut = data.draw(st.integers(0, len(damaged)), label="truncate at")
    for i in data.draw(st.lists(st.integers(0, len(damaged) - 1), max_size=4), label="flips"):
        damaged[i] ^= data.draw(st.integers(1, 255))
    _fuzz(template, {BIN_NAME: bytes(damaged[:cut])})  # refused cleanly, or merged


#: JSON number literals Python's parser turns into awkward values
_NUMBER_TEXT = st.sampled_from(
    ["0", "-0", "8", "-8", "8.0", "1e999", "-1e999", "1e-400", "1" + "0" * 400, "4.5", "1e308"]
)
_JSON_TEXT = st.recursive(
    st.one_of(
        _NUMBER_TEXT,
        st.sampled_from(['"q_proj"', '"LORA"', '""', "true", "false", "null", '"\\ud800"']),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(['"r"', '"q_proj"', '"a"']), inner, max_size=2).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=6,
)
_CONFIG_KEYS = ["r", "target_modules", "lora_alpha", "use_rslora", "peft_type", "lora_dropout",
                "rank_pattern", "alpha_pattern", "bias"]  # fmt: skip


@given(st.dictionaries(st.sampled_from(_CONFIG_KEYS), _JSON_TEXT, max_size=5), st.booleans())
def test_config_fields_of_any_type_are_refused_cleanly_or_merged(template, fields, peft):
    config = _config(template)
    text = json.dumps(config)[:-1]
    for key, value in fields.items():
        text += f', "{key}": {value}' if key not in config else ""
    for key, value in fields.items():  # overwrite existing keys textually
        if key in config:
            old = f'"{key}": {json.dumps(config[key])}'
            text = text.replace(old, f'"{key}": {value}', 1)
    text += "}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bad = root / "bad"
        shutil.copytree(template, bad)
        (bad / CFG_NAME).write_text(text)
        argv = [bad, template, "-o", root / "out", "--strategy", "ties"]
        code, stdout, stderr = run_cli([*argv, "--weighting", "peft" if peft else "lorax"])
        if code != 0:
            assert_one_line_error(code, stdout, stderr)
            assert not (root / "out").exists()
        else:
            merged = json.loads((root / "out" / CFG_NAME).read_text())
            assert isinstance(merged, dict)


_ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "BOOL", "F8_E5M2", "X", 7]


@st.composite
def _headers(draw):
    """A safetensors header with plausible but unchecked entries, and a body."""
    header = {}
    for i in range(draw(st.integers(0, 3))):
        entry = {}
        if draw(st.booleans()):
            entry["dtype"] = draw(st.sampled_from(_ST_DTYPES))
        if draw(st.booleans()):
            entry["shape"] = draw(st.lists(st.integers(-2, 70), max_size=3))
        if draw(st.booleans()):
            entry["data_offsets"] = draw(st.lists(st.integers(-5, 5000), max_size=3))
        name = draw(st.sampled_from([
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            f"extra.{i}.lora_A.weight",
        ]))  # fmt: skip
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x"]))
    body = b"\0" * draw(st.integers(0, 5000))
    return header, body


@given(_headers())
def test_random_safetensors_headers_are_refused_cleanly_or_merged(template, case):
    header, body = case
    raw = json.dumps(header).encode()
    _fuzz(template, {ST_NAME: struct.pack("<Q", len(raw)) + raw + body})
