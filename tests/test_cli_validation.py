"""lorax-merge never writes a silently wrong adapter: rsLoRA under PEFT weighting,
modules_to_save, DoRA, settings that must agree, non-finite values, config types and ranks;
and the smaller points: huge sparse files, numbers argparse misreads, and clear messages."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from adapter_tools import (
    assert_one_line_error,
    examples,
    load_config,
    load_tensors,
    make_adapter,
    run_cli,
    tree_digest,
)
from safetensors.torch import save_file

import lorax_merge

ST_NAME = "adapter_model.safetensors"
CFG_NAME = "adapter_config.json"
BIN_NAME = "adapter_model.bin"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
LM_HEAD = "base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("t") / "adapter", target_modules=["q_proj"])


@pytest.fixture
def pair(template, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "inputs" / "a", tmp_path / "inputs" / "b"
    shutil.copytree(template, a)
    shutil.copytree(template, b)
    return a, b


def _edit_config(folder: Path, **fields) -> None:
    config = load_config(folder)
    config.update(fields)
    (folder / CFG_NAME).write_text(json.dumps(config))


def _refused(argv, message: str, tmp_path: Path) -> str:
    """Run; expect exit 2 with one line holding ``message``, no output, inputs untouched."""
    before = tree_digest(tmp_path / "inputs")
    code, stdout, stderr = run_cli([*argv, "-o", tmp_path / "out"])
    assert_one_line_error(code, stdout, stderr)
    assert message in stderr, stderr
    assert not (tmp_path / "out").exists()
    assert tree_digest(tmp_path / "inputs") == before
    return stderr


def _merged(argv, tmp_path: Path, name: str = "out") -> Path:
    code, _, stderr = run_cli([*argv, "-o", tmp_path / name])
    assert code == 0, stderr
    return tmp_path / name


def _peft_adapter(path: Path, seed: int, **config) -> Path:
    """An adapter saved by PEFT itself, its LoRA factors and full weights randomised."""
    from peft import LoraConfig, get_peft_model

    config.setdefault("target_modules", ["q_proj"])
    model = get_peft_model(examples().build_base_model(), LoraConfig(r=8, lora_alpha=16, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if ".lora_" in name or "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(str(path))
    return path


def _logits(adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(examples().build_base_model(), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 13).unsqueeze(0)).logits


# ----------------------------------------------------------------------- rsLoRA, PEFT weighting
def test_peft_weighting_of_an_rslora_adapter_keeps_its_effect(tmp_path):
    rslora = make_adapter(tmp_path / "inputs" / "rs", target_modules=["q_proj", "v_proj"], r=4,
                          lora_alpha=8, use_rslora=True, seed=3)  # fmt: skip
    out = _merged([rslora, "--strategy", "linear", "--weighting", "peft"], tmp_path)
    config = load_config(out)
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 4
    base = examples().build_base_model()
    with torch.no_grad():
        base_logits = base(input_ids=torch.arange(1, 13).unsqueeze(0)).logits
    original, merged = _logits(rslora), _logits(out)
    assert (original - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged, original, rtol=1e-4, atol=1e-5)
    provenance = json.loads((out / "merge_provenance.json").read_text())
    assert "use_rslora is written as false" in provenance["differences_from_peft"][0]


# ----------------------------------------------------------------------- modules_to_save, DoRA
@pytest.fixture(scope="module")
def saving_adapters(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mts")
    plain = _peft_adapter(root / "plain", seed=1)
    saving = _peft_adapter(root / "saving", seed=2, modules_to_save=["lm_head"])
    return plain, saving


def test_modules_to_save_are_refused_by_default(saving_adapters, tmp_path):
    plain, saving = saving_adapters
    message = "modules_to_save ['lm_head'] are full weights"
    stderr = _refused([plain, saving, "--strategy", "ties", "--density", "0.5"], message, tmp_path)
    assert "--average-modules-to-save" in stderr


def test_modules_to_save_are_averaged_unpruned_on_request(saving_adapters, tmp_path):
    plain, saving = saving_adapters
    other = _peft_adapter(tmp_path / "other", seed=3, modules_to_save=["lm_head"])
    argv = [plain, saving, other, "--strategy", "ties", "--density", "0.5", "--weights", "1", "1"]
    out = _merged([*argv, "3", "--average-modules-to-save"], tmp_path)
    head_1, head_2 = load_tensors(saving)[LM_HEAD], load_tensors(other)[LM_HEAD]
    expected = head_1 * 0.25 + head_2 * 0.75  # over the adapters that have it: weights 1 and 3
    merged = load_tensors(out)
    torch.testing.assert_close(merged[LM_HEAD], expected, rtol=1e-6, atol=1e-8)
    assert int((merged[LM_HEAD] == 0).sum()) == int((expected == 0).sum())  # nothing pruned
    assert load_config(out)["modules_to_save"] == ["lm_head"]  # the first adapter had none
    from peft import PeftModel

    model = PeftModel.from_pretrained(examples().build_base_model(), str(out))
    assert torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight,
                       merged[LM_HEAD])  # fmt: skip
    assert json.loads((out / "merge_provenance.json").read_text())["average_modules_to_save"]


def test_a_full_weight_without_modules_to_save_is_refused(pair, tmp_path):
    a, b = pair
    tensors = load_tensors(b)
    tensors[LM_HEAD] = torch.ones(256, 64)
    save_file(tensors, str(b / ST_NAME))
    _refused([a, b, "--strategy", "linear"], f"tensor '{LM_HEAD}' is not a LoRA factor", tmp_path)


def test_dora_adapters_are_refused(tmp_path):
    plain = _peft_adapter(tmp_path / "inputs" / "plain", seed=1)
    dora = _peft_adapter(tmp_path / "inputs" / "dora", seed=2, use_dora=True)
    _refused([plain, dora, "--strategy", "linear"], "a DoRA adapter (use_dora: true)", tmp_path)
    _edit_config(dora, use_dora=False)  # the magnitude vectors still give it away
    _refused([plain, dora, "--strategy", "linear"], "is a DoRA magnitude vector", tmp_path)


# ------------------------------------------------------------------ settings that must agree
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layers_to_transform", [0]),
        ("layers_pattern", "layers"),
        ("rank_pattern", {"q_proj": 8}),
        ("alpha_pattern", {"q_proj": 32}),
        ("fan_in_fan_out", True),
        ("bias", "all"),
        ("lora_bias", True),
    ],
)
def test_settings_that_change_how_tensors_apply_must_agree(pair, tmp_path, field, value):
    a, b = pair
    _edit_config(a, **{field: value})
    stderr = _refused([a, b, "--strategy", "linear"], f"disagree on '{field}'", tmp_path)
    assert f"{a}: {json.dumps(value, sort_keys=True)}" in stderr and str(b) in stderr
    _edit_config(b, **{field: value})
    _merged([a, b, "--strategy", "linear"], tmp_path)


def test_a_missing_setting_agrees_with_its_default(pair, tmp_path):
    a, b = pair
    _edit_config(a, bias="none", rank_pattern={}, layers_to_transform=None)
    config = load_config(b)
    for key in ("bias", "rank_pattern", "layers_to_transform"):
        config.pop(key, None)
    (b / CFG_NAME).write_text(json.dumps(config))
    _merged([a, b, "--strategy", "linear"], tmp_path)


def test_different_base_models_need_allow_different_base(pair, tmp_path):
    a, b = pair
    _edit_config(a, base_model_name_or_path="org/llama")
    _edit_config(b, base_model_name_or_path=None)  # unknown: not a different base
    _merged([a, b, "--strategy", "linear"], tmp_path, "unknown")
    _edit_config(b, base_model_name_or_path="org/mistral")
    stderr = _refused([a, b, "--strategy", "linear"], "trained on different base models", tmp_path)
    assert "'org/llama'" in stderr and "'org/mistral'" in stderr
    out = _merged([a, b, "--strategy", "linear", "--allow-different-base"], tmp_path)
    assert json.loads((out / "merge_provenance.json").read_text())["allow_different_base"]


# ---------------------------------------------------------------------------- non-finite values
def test_weight_beyond_float32_is_refused(pair, tmp_path):
    a, b = pair
    stderr = _refused([a, b, "--strategy", "linear", "--weights", "1", "1e39"],
                      "the weight 1e+39 is beyond float32's range", tmp_path)  # fmt: skip
    assert "merged tensor 'base_model.model" in stderr and "infinite values" in stderr


def test_huge_lora_alpha_with_peft_weighting_is_refused(pair, tmp_path):
    a, b = pair
    _edit_config(b, lora_alpha=1e300)
    argv = [a, b, "--strategy", "linear", "--weighting", "peft"]
    _refused(argv, f"the weight times lora_alpha/r of {b} (1 x 1.25e+299)", tmp_path)


def test_float16_overflow_is_refused(tmp_path):
    big = make_adapter(tmp_path / "inputs" / "big", target_modules=["q_proj"], scale=3e4)
    argv = [big, "--strategy", "linear", "--dtype", "float16"]
    _refused(argv, "exceed float16's range (largest 65504); try --dtype float32", tmp_path)
    _merged([big, "--strategy", "linear", "--dtype", "float32"], tmp_path)


def test_nan_inputs_are_refused_unless_allowed(pair, tmp_path):
    a, b = pair
    tensors = load_tensors(b)
    tensors[Q_A][3, 5] = float("nan")
    save_file(tensors, str(b / ST_NAME))
    _refused([a, b, "--strategy", "linear"], f"{b}: tensor '{Q_A}' holds 1 NaN", tmp_path)
    out = _merged([a, b, "--strategy", "linear", "--allow-nonfinite"], tmp_path)
    merged = load_tensors(out)[Q_A]
    assert torch.isnan(merged).nonzero().tolist() == [[3, 5]]
    assert json.loads((out / "merge_provenance.json").read_text())["allow_nonfinite"]


def test_the_library_still_passes_nan_through():
    task = torch.ones(2, 3)
    task[1, 2] = float("nan")
    merged = lorax_merge.merge_adapters([{Q_A: task}, {Q_A: torch.ones(2, 3)}], [1.0, 1e39])
    assert torch.isnan(merged[Q_A][1, 2]) and torch.isinf(merged[Q_A][0, 0])


# ------------------------------------------------------------------------ config types, ranks
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lora_alpha", "abc", "'lora_alpha' must be a finite number, got \"abc\""),
        ("lora_dropout", 2, "'lora_dropout' must be a number in [0, 1], got 2"),
        ("bias", "some", "'bias' must be 'none', 'all' or 'lora_only'"),
        ("layers_to_transform", [-1], "'layers_to_transform' must be a layer index"),
        ("modules_to_save", "lm_head", "'modules_to_save' must be a list of module names"),
        ("use_dora", "no", "'use_dora' must be true or false"),
        ("rank_pattern", {"q_proj": 0}, "'rank_pattern' must be an object mapping"),
        ("alpha_pattern", [], "'alpha_pattern' must be an object mapping"),
        ("target_modules", ["q_proj", ""], "'target_modules' must be a list of module names"),
        ("base_model_name_or_path", 3, "'base_model_name_or_path' must be a string, got 3"),
    ],
)
def test_config_fields_are_checked(pair, tmp_path, field, value, message):
    a, b = pair
    _edit_config(b, **{field: value})
    _refused([a, b, "--strategy", "linear"], f"{b}: {message}", tmp_path)


@pytest.mark.parametrize("r", [4, 2**62])
def test_r_must_match_every_factor(template, tmp_path, r):
    a = tmp_path / "inputs" / "a"
    shutil.copytree(template, a)
    _edit_config(a, r=r)
    message = f"tensor '{Q_A}' has shape [8, 64], but 'r' is {r}"
    _refused([a, "--strategy", "linear"], message, tmp_path)


def test_rank_pattern_ranks_are_accepted(tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    a = _peft_adapter(tmp_path / "inputs" / "a", seed=1, **kwargs)
    b = _peft_adapter(tmp_path / "inputs" / "b", seed=2, **kwargs)
    out = _merged([a, b, "--strategy", "ties", "--density", "0.5"], tmp_path)
    ranks = {t.shape[0] for name, t in load_tensors(out).items() if "lora_A" in name}
    assert ranks == {8, 4}


# ------------------------------------------------------------------------------------- smaller
def test_a_file_larger_than_its_header_says_is_refused_without_reading_it(pair, tmp_path):
    a, b = pair
    size = (b / ST_NAME).stat().st_size
    os.truncate(b / ST_NAME, 200 << 30)  # sparse: 200 GiB that take no disk space
    code, stdout, stderr = run_cli([a, b, "--strategy", "linear", "-o", tmp_path / "out"])
    assert_one_line_error(code, stdout, stderr)
    assert f"{(200 << 30) - size} bytes after the last tensor's data" in stderr
    assert "(the file is larger than its header declares)" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "1", "-inf"], "--weights must be finite numbers, got -inf"),
        (["--weights", "1", "-nan"], "--weights must be finite numbers, got nan"),
        (["--density", "-1e-3"], "--density must be a finite number >= 0, got -0.001"),
    ],
)
def test_negative_numbers_are_read_as_numbers(pair, tmp_path, args, message):
    _refused([*pair, "--strategy", "ties", *args], message, tmp_path)


def test_negative_exponent_weights_merge(pair, tmp_path):
    out = _merged([*pair, "--strategy", "linear", "--weights", "-1e-3", "-2E+0"], tmp_path)
    assert json.loads((out / "merge_provenance.json").read_text())["weights"] == [-0.001, -2.0]


def test_an_empty_tensor_name_is_named(pair, tmp_path):
    a, b = pair
    tensors = load_tensors(b)
    tensors[""] = tensors.pop(Q_A)
    save_file(tensors, str(b / ST_NAME))
    _refused([a, b, "--strategy", "linear"], "tensor <empty name> is not a LoRA factor", tmp_path)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_bin_refusal_names_the_refused_global(pair, tmp_path):
    a, b = pair
    (b / ST_NAME).unlink()
    torch.save({Q_A: _Boom()}, b / BIN_NAME)
    _refused([a, b, "--strategy", "linear"], "it refers to posix.system, which is not", tmp_path)


def test_a_bin_float8_tensor_is_called_a_float(pair, tmp_path):
    a, b = pair
    (b / ST_NAME).unlink()
    torch.save({Q_A: torch.zeros(8, 64, dtype=torch.float8_e4m3fn)}, b / BIN_NAME)
    message = "has dtype float8_e4m3fn, a low-precision float format"
    _refused([a, b, "--strategy", "linear"], message, tmp_path)


def test_json_null_is_called_null(pair, tmp_path):
    a, b = pair
    (b / CFG_NAME).write_text("null")
    _refused([a, b, "--strategy", "linear"], "expected a JSON object, got JSON null", tmp_path)


@pytest.mark.parametrize("where", ["config", "header"])
def test_deep_nesting_is_reported_plainly(pair, tmp_path, where):
    a, b = pair
    deep = "[" * 500 + "]" * 500  # parses in Python; deeper than any configuration
    if where == "config":
        (b / CFG_NAME).write_text('{"r": 8, "target_modules": ["q_proj"], "x": ' + deep + "}")
    else:
        raw = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
        (b / ST_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw)
    stderr = _refused([a, b, "--strategy", "linear"], "(nested too deeply", tmp_path)
    assert "recursion" not in stderr


def test_a_legacy_bin_input_is_recorded_in_the_provenance(pair, tmp_path):
    """The size and hash recorded are those of the .bin file that was unpickled."""
    a, b = pair
    (b / ST_NAME).unlink()
    buf = io.BytesIO()
    torch.save(load_tensors(a), buf)
    (b / BIN_NAME).write_bytes(buf.getvalue())
    out = _merged([a, b, "--strategy", "linear"], tmp_path)
    files = json.loads((out / "merge_provenance.json").read_text())["inputs"][1]["files"]
    recorded = {f["name"]: (f["bytes"], f["sha256"]) for f in files}[BIN_NAME]
    assert recorded == (len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest())
