"""lorax-merge with the delta-space strategies: every one through the command on adapters of
different ranks, alphas and rsLoRA flags, equal to the library's merge and loadable by PEFT;
``--rank``, ``--svd-driver`` and ``--weighting`` validation; DARE seeds; full weights and
non-finite values as in factor space."""

from __future__ import annotations

import json
import shutil
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

from lorax_merge.adapter_configs import peft_scaling
from lorax_merge.delta_adapters import merge_adapters_delta
from lorax_merge.strategy_table import STRATEGIES, strategy_names

DELTA = strategy_names(space="delta")
SVD_TYPES = tuple(n for n in DELTA if STRATEGIES[n].uses_svd)
CONCAT_TYPES = tuple(n for n in DELTA if not STRATEGIES[n].uses_svd)
RANDOM_SVD_TYPES = strategy_names(space="delta", random=True)
FACTOR = strategy_names(space="factor")
WEIGHTS = [1.0, 0.6, -0.4]
#: name -> (r, lora_alpha, use_rslora, target modules): ranks, alphas and rsLoRA all differ
ADAPTERS = {
    "sql": (4, 8, False, ["q_proj", "v_proj"]),
    "chat": (8, 32, True, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "code": (6, 16, False, ["v_proj", "down_proj"]),
}
IDS = torch.arange(1, 13).unsqueeze(0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("delta")
    return [
        make_adapter(
            root / name,
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=targets,
            seed=10 + i,
        )  # fmt: skip
        for i, (name, (r, alpha, rslora, targets)) in enumerate(ADAPTERS.items())
    ]


def _merge(argv) -> tuple[int, str, str]:
    return run_cli([str(a) for a in argv])


def _merged(argv) -> str:
    code, out, err = _merge(argv)
    assert code == 0 and err == "", err
    return out


def _library(folders, strategy, **options):
    return merge_adapters_delta(
        [load_tensors(f) for f in folders],
        [load_config(f) for f in folders],
        WEIGHTS,
        strategy=strategy,
        density=0.5,
        seed=11,
        out_dtype="input",
        **options,
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _logits(folder: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(examples().build_base_model(), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("strategy", DELTA)
def test_every_delta_strategy_equals_the_library_and_loads_in_peft(folders, tmp_path, strategy):
    out = tmp_path / "merged"
    argv = [*folders, "-o", out, "--strategy", strategy, "--weights", *map(str, WEIGHTS)]
    summary = _merged([*argv, "--density", "0.5", "--seed", "11"])
    ranks = [v[0] for v in ADAPTERS.values()]
    rank = sum(ranks) if strategy in CONCAT_TYPES else max(ranks)
    assert f"with {strategy}" in summary and f"rank {rank}," in summary
    assert "weighting" not in summary

    expected, expected_config = _library(folders, strategy)
    saved = load_tensors(out)
    assert list(saved) == list(expected)
    for name in saved:
        assert torch.equal(_bits(saved[name]), _bits(expected[name])), name
    config = load_config(out)
    assert config == json.loads(json.dumps(expected_config))
    assert config["r"] == config["lora_alpha"] == rank and config["use_rslora"] is False
    union = sorted({m for v in ADAPTERS.values() for m in v[3]})
    assert config["target_modules"] == union

    provenance = json.loads((out / "merge_provenance.json").read_text())
    assert provenance["strategy"] == strategy and provenance["rank"] == rank
    assert provenance["svd_driver"] is None and provenance["weighting"] is None
    assert provenance["seed"] == (11 if STRATEGIES[strategy].is_random else None)

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model = PeftModel.from_pretrained(examples().build_base_model(), str(out)).eval()
    loaded = get_peft_model_state_dict(model)
    for name in saved:
        assert torch.equal(_bits(loaded[name]), _bits(saved[name])), name
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        base_logits = examples().build_base_model()(input_ids=IDS).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, base_logits)


def test_cat_is_the_exact_weighted_sum_of_the_scaled_deltas(folders, tmp_path):
    out = tmp_path / "merged"
    _merged([*folders, "-o", out, "--strategy", CONCAT_TYPES[0], "--weights", *map(str, WEIGHTS)])
    merged = load_tensors(out)
    scalings = [peft_scaling(load_config(f)) for f in folders]
    inputs = [load_tensors(f) for f in folders]
    for name_a in (n for n in merged if ".lora_A." in n):
        name_b = name_a.replace(".lora_A.", ".lora_B.")
        expected = sum(
            w * s * (t[name_b].double() @ t[name_a].double())
            for w, s, t in zip(WEIGHTS, scalings, inputs)
            if name_a in t
        )
        got = merged[name_b].double() @ merged[name_a].double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_cat_of_float16_adapters_into_float32_does_not_overflow(folders, tmp_path):
    """float16 factors near float16's largest value, scaled by w * s = 20: the float32 output
    holds the product, which float16 arithmetic would have turned into infinities."""
    inputs = []
    for i, folder in enumerate(folders[:2]):
        half = tmp_path / f"half{i}"
        shutil.copytree(folder, half)
        tensors = load_tensors(half)
        for name, t in tensors.items():
            tensors[name] = (t / t.abs().max() * 60000 if ".lora_A." in name else t).half()
        save_file(tensors, str(half / "adapter_model.safetensors"))
        inputs.append(half)
    out = tmp_path / "merged"
    argv = [*inputs, "-o", out, "--strategy", CONCAT_TYPES[0], "--dtype", "float32"]
    _merged([*argv, "--weights", "10", "1"])
    merged = load_tensors(out)
    scalings = [peft_scaling(load_config(f)) for f in inputs]
    sources = [load_tensors(f) for f in inputs]
    for name_a in (n for n in merged if ".lora_A." in n):
        name_b = name_a.replace(".lora_A.", ".lora_B.")
        assert merged[name_a].dtype == torch.float32
        expected = sum(
            w * s * (t[name_b].double() @ t[name_a].double())
            for w, s, t in zip([10.0, 1.0], scalings, sources)
            if name_a in t
        )
        got = merged[name_b].double() @ merged[name_a].double()
        torch.testing.assert_close(
            got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())
        )


def test_rank_and_svd_driver_reach_the_merge(folders, tmp_path):
    out = tmp_path / "merged"
    argv = [*folders, "-o", out, "--strategy", SVD_TYPES[0], "--weights", *map(str, WEIGHTS)]
    _merged([*argv, "--rank", "3", "--svd-driver", "exact"])
    expected, _ = _library(folders, SVD_TYPES[0], rank=3, svd_driver="exact")
    saved = load_tensors(out)
    for name in saved:
        assert torch.equal(_bits(saved[name]), _bits(expected[name])), name
    a_name = next(n for n in saved if ".lora_A." in n)
    assert saved[a_name].shape[0] == 3 and load_config(out)["r"] == 3
    provenance = json.loads((out / "merge_provenance.json").read_text())
    assert (provenance["rank"], provenance["svd_driver"]) == (3, "exact")
    # concatenation above the sum of the ranks: zero-padded, the same adapter in effect
    out_18, out_20 = tmp_path / "merged18", tmp_path / "merged20"
    _merged([*folders, "-o", out_18, "--strategy", CONCAT_TYPES[0]])
    _merged([*folders, "-o", out_20, "--strategy", CONCAT_TYPES[0], "--rank", "20"])
    assert (load_config(out_18)["r"], load_config(out_20)["r"]) == (18, 20)
    padded = load_tensors(out_20)
    assert padded[a_name].shape[0] == 20 and not padded[a_name][18:].any()
    torch.testing.assert_close(_logits(out_20), _logits(out_18), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "strategy, extra, message",
    [
        (FACTOR[0], ["--rank", "4"], "--rank applies to the strategies cat, svd,"),
        (FACTOR[1], ["--svd-driver", "exact"], "--svd-driver applies to the strategies svd,"),
        (SVD_TYPES[0], ["--rank", "0"], "--rank must be an integer >= 1, got 0"),
        (SVD_TYPES[0], ["--rank", "-2"], "--rank must be an integer >= 1, got -2"),
        (SVD_TYPES[0], ["--rank", "2.5"], "argument --rank: invalid int value"),
        (SVD_TYPES[0], ["--svd-driver", "fast"], "argument --svd-driver: invalid choice"),
        (SVD_TYPES[0], ["--svd-driver", "gesvdj", "--device", "cpu"], "needs CUDA tensors"),
        (CONCAT_TYPES[0], ["--svd-driver", "exact"], "concatenates the factors exactly"),
        (CONCAT_TYPES[0], ["--rank", "17"], "needs a rank >= 18"),
        (SVD_TYPES[1], ["--weighting", "peft"], "--weighting does not apply"),
        (SVD_TYPES[1], ["--weighting", "lorax"], "--weighting does not apply"),
    ],
)
def test_bad_rank_driver_and_weighting_are_one_line_errors(
    folders, tmp_path, strategy, extra, message
):
    before = tree_digest(*folders)
    code, out, err = _merge([*folders, "-o", tmp_path / "out", "--strategy", strategy, *extra])
    assert_one_line_error(code, out, err)
    assert message in err, err
    assert not (tmp_path / "out").exists()
    assert tree_digest(*folders) == before


def test_factor_space_strategies_still_refuse_different_ranks(folders, tmp_path):
    code, out, err = _merge([*folders, "-o", tmp_path / "out", "--strategy", FACTOR[0]])
    assert_one_line_error(code, out, err)
    assert "same rank" in err


@pytest.mark.parametrize("strategy", RANDOM_SVD_TYPES)
def test_dare_svd_with_a_seed_is_byte_identical(folders, tmp_path, strategy):
    def run(name: str, seed: str | None) -> bytes:
        argv = [*folders, "-o", tmp_path / name, "--strategy", strategy, "--density", "0.5"]
        _merged(argv + (["--seed", seed] if seed is not None else []))
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    first, again, other = run("a", "7"), run("b", "7"), run("c", "8")
    assert first == again and first != other
    drawn = run("d", None)
    seed = json.loads((tmp_path / "d" / "merge_provenance.json").read_text())["seed"]
    assert run("e", str(seed)) == drawn


def _with_lm_head(path: Path, r: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"],
                        modules_to_save=["lm_head"])  # fmt: skip
    model = get_peft_model(examples().build_base_model(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if ".lora_" in name or "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(str(path))
    return path


def test_modules_to_save_are_refused_or_averaged_as_in_factor_space(tmp_path):
    a = _with_lm_head(tmp_path / "in" / "a", 4, 1)
    b = _with_lm_head(tmp_path / "in" / "b", 8, 2)
    argv = [a, b, "--strategy", SVD_TYPES[0], "--weights", "1", "3"]
    code, out, err = _merge([*argv, "-o", tmp_path / "refused"])
    assert_one_line_error(code, out, err)
    assert "--average-modules-to-save" in err
    merged_dir = tmp_path / "merged"
    _merged([*argv, "-o", merged_dir, "--average-modules-to-save"])
    head = "base_model.model.lm_head.weight"
    merged = load_tensors(merged_dir)
    expected = load_tensors(a)[head] * 0.25 + load_tensors(b)[head] * 0.75
    torch.testing.assert_close(merged[head], expected, rtol=1e-6, atol=1e-8)
    config = load_config(merged_dir)
    assert config["modules_to_save"] == ["lm_head"] and config["r"] == 8
    assert torch.isfinite(_logits(merged_dir)).all()


@pytest.mark.parametrize("strategy", [SVD_TYPES[0], CONCAT_TYPES[0]])
def test_non_finite_inputs_are_refused(folders, tmp_path, strategy):
    broken = tmp_path / "broken"
    shutil.copytree(folders[1], broken)
    tensors = load_tensors(broken)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    code, out, err = _merge([folders[0], broken, "-o", tmp_path / "out", "--strategy", strategy])
    assert_one_line_error(code, out, err)
    assert "1 NaN" in err and "--allow-nonfinite" in err


def test_a_weight_beyond_float32_is_refused_after_the_merge(folders, tmp_path):
    argv = [*folders[:2], "-o", tmp_path / "out", "--strategy", SVD_TYPES[0], "--svd-driver"]
    code, out, err = _merge([*argv, "exact", "--weights", "1", "1e39"])
    assert_one_line_error(code, out, err)
    assert "although every input is finite" in err and not (tmp_path / "out").exists()
