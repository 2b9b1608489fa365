"""The lorax-merge command: PEFT round trips and parity, provenance, bad inputs, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from adapter_tools import (
    ROOT,
    assert_one_line_error,
    examples,
    load_config,
    load_tensors,
    make_adapter,
    peft_add_weighted_adapter,
    run_cli,
    tree_digest,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from safetensors.torch import save_file

import lorax_merge
from lorax_merge import adapters as A
from lorax_merge.cli import command, report
from lorax_merge.strategy_table import strategy_names

STRATEGIES = strategy_names(space="factor")  # the command merges LoRA factors


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The example base model and adapters (rank 8, different target modules, alphas, rsLoRA)."""
    root = tmp_path_factory.mktemp("examples")
    base, adapters = examples().build_examples(root)
    return {"root": root, "base": base, "adapters": adapters}


@pytest.fixture
def adapters(work):
    return [str(p) for p in work["adapters"]]


def merge_ok(argv):
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert err == ""
    return out


def forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------- PEFT round trips
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_round_trips_through_peft(work, adapters, tmp_path, strategy):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    out = tmp_path / "merged"
    argv = [*adapters, "-o", out, "--strategy", strategy, "--weights", "1", "0.6", "0.4"]
    summary = merge_ok([*argv, "--density", "0.5", "--seed", "11"])
    assert summary.count("\n") == 1 and f"with {strategy}" in summary and "28 tensors" in summary
    assert sorted(os.listdir(out)) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "merge_provenance.json"]
    )

    config = load_config(out)
    first = load_config(work["adapters"][0])
    union = sorted({m for p in work["adapters"] for m in load_config(p)["target_modules"]})
    assert config == dict(first, target_modules=union)

    saved = load_tensors(out)
    expected = A.merge_adapters(
        [load_tensors(p) for p in work["adapters"]],
        [1.0, 0.6, 0.4],
        strategy=strategy,
        density=0.5,
        seed=11,
        out_dtype="input",
    )
    assert list(saved) == list(expected)
    for name in saved:
        torch.testing.assert_close(saved[name], expected[name], rtol=0, atol=0)

    base = examples().build_base_model()
    ids = torch.arange(1, 13).unsqueeze(0)
    base_logits = forward(base, ids)
    model = PeftModel.from_pretrained(examples().build_base_model(), str(out)).eval()
    loaded = get_peft_model_state_dict(model)
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0)
    logits = forward(model, ids)
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, base_logits)


def test_weights_apply_per_module_to_the_adapters_that_have_it(work, adapters, tmp_path):
    out = tmp_path / "merged"
    merge_ok([*adapters, "-o", out, "--strategy", "linear", "--weights", "1", "2", "-3"])
    merged = load_tensors(out)
    sql, support, extract = (load_tensors(p) for p in work["adapters"])
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # sql and support
    up = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"  # extract only
    v = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"  # all three
    torch.testing.assert_close(merged[q], sql[q] * 1 + support[q] * 2, rtol=0, atol=0)
    torch.testing.assert_close(merged[up], extract[up] * -3, rtol=0, atol=0)
    torch.testing.assert_close(merged[v], sql[v] + support[v] * 2 + extract[v] * -3, rtol=0, atol=0)
    names = set(sql) | set(support) | set(extract)
    assert set(merged) == names


# ------------------------------------------------------------------------------ parity with PEFT
@pytest.mark.parametrize(
    ("strategy", "method"),
    [("linear", "total"), ("ties", "total"), ("ties", "frequency"), ("magnitude_prune", "total")],
)
def test_peft_weighting_equals_add_weighted_adapter(work, adapters, tmp_path, strategy, method):
    out = tmp_path / "merged"
    weights = [1.0, -0.6, 0.4]
    argv = [*adapters, "-o", out, "--strategy", strategy, "--weighting", "peft", "--density", "0.5"]
    merge_ok([*argv, "--majority-sign-method", method, "--weights", *map(str, weights)])
    expected, peft_config = peft_add_weighted_adapter(
        work["adapters"], weights, strategy, density=0.5, majority_sign_method=method
    )
    ours = load_tensors(out)
    assert sorted(ours) == sorted(expected)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=0)

    config = load_config(out)
    reference = peft_config.to_dict()
    assert set(config["target_modules"]) == set(reference["target_modules"])
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout"):
        assert config[key] == reference[key], key
    assert config["lora_alpha"] == config["r"] == 8


def test_peft_weighting_of_one_adapter_equals_peft(work, tmp_path):
    extract = work["adapters"][2]  # rsLoRA: scaling 32 / sqrt(8)
    out = tmp_path / "merged"
    argv = [extract, "-o", out, "--strategy", "ties", "--density", "0.3", "--weights", "0.5"]
    merge_ok([*argv, "--weighting", "peft"])  # PEFT merges a single adapter linearly
    expected, _ = peft_add_weighted_adapter([extract], [0.5], "ties", density=0.3)
    ours = load_tensors(out)
    assert sorted(ours) == sorted(expected)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=0)


# ---------------------------------------------------------------------------- seeds, provenance
def test_dare_is_reproducible_with_seed(adapters, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        argv = [*adapters, "-o", out, "--strategy", "dare_ties", "--density", "0.4", *extra]
        merge_ok(argv)
        return (out / "adapter_model.safetensors").read_bytes(), json.loads(
            (out / "merge_provenance.json").read_text()
        )

    first, prov = run("a", "--seed", "7")
    again, _ = run("b", "--seed", "7")
    other, _ = run("c", "--seed", "8")
    assert prov["seed"] == 7
    assert first == again and first != other
    drawn, prov = run("d")
    assert isinstance(prov["seed"], int)
    replay, _ = run("e", "--seed", str(prov["seed"]))
    assert drawn == replay


def test_provenance_records_inputs_parameters_and_outputs(work, adapters, tmp_path):
    out = tmp_path / "merged"
    merge_ok(
        [*adapters, "-o", out, "--strategy", "ties", "--density", "0.7", "--weights", "2", "1", "1"]
    )
    prov = json.loads((out / "merge_provenance.json").read_text())
    assert prov["lorax_merge_version"] == lorax_merge.__version__
    assert prov["strategy"] == "ties" and prov["density"] == 0.7 and prov["weights"] == [2, 1, 1]
    assert prov["majority_sign_method"] == "total" and prov["weighting"] == "lorax"
    assert prov["seed"] is None  # ties draws nothing
    for entry, path in zip(prov["inputs"], work["adapters"]):
        assert entry["path"] == str(path)
        for f in entry["files"]:
            assert f["sha256"] == hashlib.sha256((path / f["name"]).read_bytes()).hexdigest()
        assert {f["name"] for f in entry["files"]} == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    for f in prov["output"]["files"]:
        assert f["sha256"] == hashlib.sha256((out / f["name"]).read_bytes()).hexdigest()
    assert prov["output"]["tensors"] == len(load_tensors(out))


def test_dtype_options(tmp_path):
    a = make_adapter(tmp_path / "a", target_modules=["q_proj"], seed=1, dtype=torch.bfloat16)
    b = make_adapter(tmp_path / "b", target_modules=["q_proj"], seed=2, dtype=torch.bfloat16)
    for dtype, expected in [
        ("auto", torch.bfloat16),
        ("float32", torch.float32),
        ("float16", torch.float16),
    ]:
        out = tmp_path / f"out-{dtype}"
        merge_ok([a, b, "-o", out, "--strategy", "ties", "--density", "0.5", "--dtype", dtype])
        assert {t.dtype for t in load_tensors(out).values()} == {expected}


def test_legacy_bin_adapters_merge_like_safetensors(tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], seed=4)
    legacy = make_adapter(tmp_path / "legacy", safe_serialization=False, **kwargs)
    modern = make_adapter(tmp_path / "modern", **kwargs)
    other = make_adapter(tmp_path / "other", target_modules=["v_proj"], seed=5)
    assert (legacy / "adapter_model.bin").exists()
    merge_ok([legacy, other, "-o", tmp_path / "x", "--strategy", "ties", "--density", "0.5"])
    merge_ok([modern, other, "-o", tmp_path / "y", "--strategy", "ties", "--density", "0.5"])
    x, y = load_tensors(tmp_path / "x"), load_tensors(tmp_path / "y")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------------- bad inputs
class _Boom:
    """Unpickling this would create a folder: weights-only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _good(tmp: Path, name: str = "good", **kwargs) -> Path:
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return make_adapter(tmp / name, **kwargs)


def _rewrite_safetensors(folder: Path, mutate) -> None:
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header, body = mutate(header, data[8 + n :])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _case(tmp: Path, name: str):
    """Build one bad input; returns (argv without --output, expected message part)."""
    good = _good(tmp)
    bad = _good(tmp, "bad", seed=3)
    st_file = bad / "adapter_model.safetensors"
    cfg_file = bad / "adapter_config.json"
    strategy = ["--strategy", "ties"]
    if name == "missing folder":
        return [good, tmp / "nope", *strategy], "adapter folder not found"
    if name == "folder is a file":
        return [good, st_file, *strategy], "not a folder"
    if name == "broken symlink":
        os.symlink(tmp / "gone", tmp / "link")
        return [good, tmp / "link", *strategy], "broken symbolic link"
    if name == "no config":
        cfg_file.unlink()
        return [good, bad, *strategy], "no adapter_config.json"
    if name == "malformed config":
        cfg_file.write_text('{"r": 8, "target_modules": ["q_proj"')
        return [good, bad, *strategy], "malformed JSON"
    if name == "config not an object":
        cfg_file.write_text("[8]")
        return [good, bad, *strategy], "expected a JSON object"
    if name == "config with NaN":
        cfg_file.write_text(
            cfg_file.read_text().replace('"lora_dropout": 0.0', '"lora_dropout": NaN')
        )
        return [good, bad, *strategy], "NaN is not a JSON number"
    if name == "config not utf-8":
        cfg_file.write_bytes(b'{"r": 8, "\xff": 1}')
        return [good, bad, *strategy], "not UTF-8"
    if name == "config r of wrong type":
        cfg = json.loads(cfg_file.read_text())
        cfg["r"] = "8"
        cfg_file.write_text(json.dumps(cfg))
        return [good, bad, *strategy], "'r' must be a positive integer"
    if name == "config target_modules of wrong type":
        cfg = json.loads(cfg_file.read_text())
        cfg["target_modules"] = 5
        cfg_file.write_text(json.dumps(cfg))
        return [good, bad, *strategy], "target_modules"
    if name == "not a LoRA adapter":
        cfg = json.loads(cfg_file.read_text())
        cfg["peft_type"] = "PREFIX_TUNING"
        cfg_file.write_text(json.dumps(cfg))
        return [good, bad, *strategy], "only LoRA adapters"
    if name == "differing ranks":
        other = _good(tmp, "rank4", r=4)
        return [good, other, *strategy], "(r=8)"
    if name == "no weights file":
        st_file.unlink()
        return [good, bad, *strategy], "no adapter_model.safetensors"
    if name == "weights file is a device":
        st_file.unlink()
        os.symlink("/dev/zero", st_file)
        return [good, bad, *strategy], "not a regular file"
    if name == "truncated safetensors":
        data = st_file.read_bytes()
        st_file.write_bytes(data[: len(data) // 2])
        return [good, bad, *strategy], "run past the end of the file"
    if name == "tiny safetensors":
        st_file.write_bytes(b"\x01\x02\x03")
        return [good, bad, *strategy], "truncated"
    if name == "header claims more than the file":
        data = st_file.read_bytes()
        st_file.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
        return [good, bad, *strategy], "the header claims"
    if name == "corrupt header":
        data = st_file.read_bytes()
        st_file.write_bytes(data[:8] + b"\x00\xff" * 20 + data[48:])
        return [good, bad, *strategy], "corrupt safetensors header"
    if name == "offsets past the end":

        def grow(header, body):
            header[_first_tensor(header)]["data_offsets"][1] += 10**9
            return header, body

        _rewrite_safetensors(bad, grow)
        return [good, bad, *strategy], "run past the end"
    if name == "overlapping tensors":

        def overlap(header, body):
            names = [k for k in header if k != "__metadata__"]
            header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
            return header, body

        _rewrite_safetensors(bad, overlap)
        return [good, bad, *strategy], "overlaps another tensor"
    if name == "integer tensor":
        tensors = load_tensors(bad)
        tensors[next(iter(tensors))] = torch.ones(8, 64, dtype=torch.int64)
        save_file(tensors, str(st_file))
        return [good, bad, *strategy], "has dtype I64, not a floating-point type"
    if name == "same name with different shapes":
        tensors = load_tensors(bad)
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = torch.ones(8, 48)
        save_file(tensors, str(st_file))
        return [good, bad, *strategy], "has shape [8, 64] in"
    if name == "no tensors":
        st_file.write_bytes(st_save({}))
        return [good, bad, *strategy], "holds no tensors"
    if name == "legacy file with integer tensor":
        st_file.unlink()
        torch.save(
            {"x.lora_A.weight": torch.ones(2, 2, dtype=torch.int32)}, bad / "adapter_model.bin"
        )
        return [good, bad, *strategy], "has dtype int32, not a floating-point type"
    if name == "legacy file with code":
        st_file.unlink()
        with open(bad / "adapter_model.bin", "wb") as handle:
            pickle.dump({"x": _Boom(str(tmp / "pwned"))}, handle)
        return [good, bad, *strategy], "cannot be loaded as plain tensors"
    if name == "rank_pattern with peft weighting":
        cfg = json.loads(cfg_file.read_text())
        cfg["rank_pattern"] = {"q_proj": 4}
        cfg_file.write_text(json.dumps(cfg))
        return [good, bad, *strategy, "--weighting", "peft"], "rank_pattern"
    if name == "negative density":
        return [good, bad, *strategy, "--density", "-0.5"], "--density"
    if name == "nan density":
        return [good, bad, *strategy, "--density", "nan"], "--density"
    if name == "weights count":
        return [good, bad, *strategy, "--weights", "1"], "--weights"
    if name == "nan weight":
        return [good, bad, *strategy, "--weights", "1", "nan"], "--weights"
    if name == "unknown strategy":
        return [good, bad, "--strategy", "average"], "invalid choice"
    if name == "missing strategy":
        return [good, bad], "--strategy"
    if name == "bad dtype":
        return [good, bad, *strategy, "--dtype", "int8"], "--dtype"
    if name == "bad device":
        return [good, bad, *strategy, "--device", "tpu"], "--device"
    if name == "negative seed":
        return [good, bad, "--strategy", "dare_ties", "--seed", "-1"], "--seed"
    raise AssertionError(name)


BAD_INPUTS = [
    "missing folder",
    "folder is a file",
    "broken symlink",
    "no config",
    "malformed config",
    "config not an object",
    "config not utf-8",
    "config with NaN",
    "config r of wrong type",
    "config target_modules of wrong type",
    "not a LoRA adapter",
    "differing ranks",
    "no weights file",
    "weights file is a device",
    "truncated safetensors",
    "tiny safetensors",
    "header claims more than the file",
    "corrupt header",
    "offsets past the end",
    "overlapping tensors",
    "integer tensor",
    "same name with different shapes",
    "no tensors",
    "legacy file with integer tensor",
    "legacy file with code",
    "rank_pattern with peft weighting",
    "negative density",
    "nan density",
    "weights count",
    "nan weight",
    "unknown strategy",
    "missing strategy",
    "bad dtype",
    "bad device",
    "negative seed",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, name):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    argv, message = _case(inputs, name)
    before = tree_digest(inputs)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([*argv, "--output", out])
    assert_one_line_error(code, stdout, stderr)
    assert message in stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["inputs"]  # no temporary folder either
    assert tree_digest(inputs) == before
    assert not (inputs / "pwned").exists()


def test_differing_ranks_name_each_adapter_and_rank(tmp_path):
    a = _good(tmp_path, "a8")
    b = _good(tmp_path, "b4", r=4)
    code, out, err = run_cli([a, b, "-o", tmp_path / "out", "--strategy", "linear"])
    assert_one_line_error(code, out, err)
    assert f"{a} (r=8), {b} (r=4)" in err


def test_cuda_device_without_cuda_is_a_bad_input(tmp_path):
    if torch.cuda.is_available() and lorax_merge.build_info()["cuda_compiled"]:
        pytest.skip("a usable CUDA device is present")
    a = _good(tmp_path)
    code, out, err = run_cli(
        [a, "-o", tmp_path / "out", "--strategy", "linear", "--device", "cuda"]
    )
    assert_one_line_error(code, out, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_unreadable_folder_is_a_bad_input(tmp_path):
    a = _good(tmp_path)
    os.chmod(a, 0)
    try:
        code, out, err = run_cli([a, "-o", tmp_path / "out", "--strategy", "linear"])
    finally:
        os.chmod(a, 0o755)
    assert_one_line_error(code, out, err)


# ---------------------------------------------------------------------------------- output rules
def test_existing_output_needs_overwrite(tmp_path):
    a = _good(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    merge_ok([a, "-o", out, "--strategy", "linear"])  # an empty folder is used as is
    first = (out / "adapter_model.safetensors").read_bytes()
    code, stdout, stderr = run_cli([a, "-o", out, "--strategy", "linear", "--weights", "2"])
    assert_one_line_error(code, stdout, stderr)
    assert "--overwrite" in stderr
    assert (out / "adapter_model.safetensors").read_bytes() == first
    (out / "README.md").write_text("old")  # a file adapter folders carry: replaced too
    merge_ok([a, "-o", out, "--strategy", "linear", "--weights", "2", "--overwrite"])
    assert not (out / "README.md").exists()
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ["good", "out"]


@pytest.mark.parametrize("where", ["inside input", "is input", "contains input", "is a file"])
def test_output_that_would_touch_an_input_is_refused(tmp_path, where):
    a = _good(tmp_path / "in")
    before = tree_digest(tmp_path)
    out = {
        "inside input": a / "merged",
        "is input": a,
        "contains input": tmp_path / "in",
        "is a file": a / "adapter_config.json",
    }[where]
    code, stdout, stderr = run_cli([a, "-o", out, "--strategy", "linear", "--overwrite"])
    assert_one_line_error(code, stdout, stderr)
    assert tree_digest(tmp_path) == before


def test_missing_output_parents_are_created(tmp_path):
    a = _good(tmp_path)
    merge_ok([a, "-o", tmp_path / "x" / "y" / "merged", "--strategy", "linear"])
    assert (tmp_path / "x" / "y" / "merged" / "adapter_model.safetensors").is_file()


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    a = _good(tmp_path)
    code, _, err = run_cli([a, "-o", tmp_path / "o1", "--strategy", "linear"])
    assert code == 0 and err == ""
    monkeypatch.setattr(report, "stderr_is_terminal", lambda: True)
    code, _, err = run_cli([a, "-o", tmp_path / "o2", "--strategy", "linear"])
    assert code == 0 and "merging [" in err and "/8 tensors" in err


def test_progress_bar_is_skipped_quietly_without_tqdm(tmp_path, monkeypatch):
    a = _good(tmp_path)
    monkeypatch.setattr(report, "stderr_is_terminal", lambda: True)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    code, _, err = run_cli([a, "-o", tmp_path / "o", "--strategy", "linear"])
    assert code == 0 and err == ""
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("value", "traceback"),
    [("", False), ("0", False), ("false", False), ("off", False), ("1", True), ("Yes", True)],
)
def test_traceback_switch_is_a_boolean(tmp_path, monkeypatch, value, traceback):
    def broken(spec):
        raise RuntimeError("broken device lookup")

    monkeypatch.setattr(command, "_resolve_device", broken)
    monkeypatch.setenv("LORAX_MERGE_TRACEBACK", value)
    monkeypatch.setenv("LORAX_MERGE_DEBUG", "1")  # the build's switch: not the command's
    argv = [_good(tmp_path), "-o", tmp_path / "o", "--strategy", "linear"]
    if traceback:
        with pytest.raises(RuntimeError, match="broken device lookup"):
            run_cli(argv)
    else:
        code, out, err = run_cli(argv)
        assert code == 1 and out == ""
        assert err == "lorax-merge: error: unexpected error: RuntimeError: broken device lookup\n"


def test_strategy_choices_and_seed_help_come_from_the_strategy_table(capsys):
    with pytest.raises(SystemExit):
        command._parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(strategy_names()) + "}" in text
    seed_help = text.split("options:", 1)[1].split("--seed S", 1)[1].split("--device", 1)[0]
    named = set(re.findall(r"[a-z_]+", seed_help)) & set(strategy_names())
    assert named == set(strategy_names(random=True))
    strategy_help = text.split("options:", 1)[1].split("--strategy {", 1)[1].split("--weights")[0]
    for space in ("factor", "delta"):
        listed = strategy_help.split(f"{space.capitalize()} space (", 1)[1].split(")", 1)[0]
        assert tuple(listed.split(", ")) == strategy_names(space=space)


# ------------------------------------------------------------------------------- real processes
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_python_dash_m_runs_the_command(tmp_path):
    a = _good(tmp_path)
    help_ = subprocess.run(
        [sys.executable, "-m", "lorax_merge", "--help"], capture_output=True, text=True, env=_env()
    )
    assert help_.returncode == 0 and "--strategy" in help_.stdout and "--weighting" in help_.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorax_merge",
            a,
            "-o",
            tmp_path / "o",
            "--strategy",
            "ties",
            "--density",
            "-1",
        ],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert_one_line_error(bad.returncode, bad.stdout, bad.stderr)


_SLOW_WRITER = """
import os, sys, time
import lorax_merge.cli as cli
from lorax_merge.cli import output
write = output.save_tensors
def slow(tensors, path):
    write(tensors, path)
    open(os.environ["READY_FILE"], "w").close()
    time.sleep(120)
output.save_tensors = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def _start_slow_merge(tmp_path, adapters, out):
    ready = tmp_path / "ready"
    env = _env()
    env["READY_FILE"] = str(ready)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, *adapters, "-o", out, "--strategy", "ties"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the merge never reached the write"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_write_leaves_no_adapter(adapters, tmp_path, how):
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "merged"
    proc = _start_slow_merge(tmp_path, adapters, out)
    # the tensors are written, but only into a hidden temporary folder
    assert not out.exists()
    proc.send_signal(getattr(signal, how))
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists()
    if how == "SIGTERM":
        assert proc.returncode == 143
        assert stderr == "lorax-merge: error: terminated\n"
        assert os.listdir(parent) == []
    else:
        assert proc.returncode == -signal.SIGKILL
        # a later run for the same output removes what the killed one left behind
        merge_ok([*adapters, "-o", out, "--strategy", "ties"])
        assert os.listdir(parent) == ["merged"]


# ----------------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def fuzz_template(tmp_path_factory):
    return _good(tmp_path_factory.mktemp("fuzz"), seed=9)


def _fuzz_run(template: Path, config: bytes | None, weights: bytes | None):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bad = root / "bad"
        shutil.copytree(template, bad)
        if config is not None:
            (bad / "adapter_config.json").write_bytes(config)
        if weights is not None:
            (bad / "adapter_model.safetensors").write_bytes(weights)
        argv = [template, bad, "-o", root / "out", "--strategy", "ties", "--density", "0.5"]
        result = run_cli(argv)
        if result[0] != 0:
            assert not (root / "out").exists()
            assert sorted(os.listdir(root)) == ["bad"]
        return result


@given(data=st.binary(max_size=512))
def test_random_bytes_as_weights_file(fuzz_template, data):
    assert_one_line_error(*_fuzz_run(fuzz_template, None, data))


@given(data=st.binary(max_size=512))
def test_random_bytes_as_config_file(fuzz_template, data):
    assert_one_line_error(*_fuzz_run(fuzz_template, data, None))


@given(data=st.data())
def test_damaged_safetensors_file(fuzz_template, data):
    original = (fuzz_template / "adapter_model.safetensors").read_bytes()
    damaged = bytearray(original)
    cut = data.draw(st.integers(0, len(damaged)), label="truncate at")
    flips = data.draw(st.lists(st.integers(0, len(damaged) - 1), max_size=4), label="flipped bytes")
    for i in flips:
        damaged[i] ^= data.draw(st.integers(1, 255))
    code, stdout, stderr = _fuzz_run(fuzz_template, None, bytes(damaged[:cut]))
    if code != 0:
        assert_one_line_error(code, stdout, stderr)
    else:  # only damage inside tensor data or header text can leave a loadable file
        assert cut == len(original)
