"""Whole-adapter merging: merge_adapters, the LoRAX config rules, seeds and PEFT weighting."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from adapter_tools import examples
from peft.utils import merge_utils as peft_merge

import lorax_merge
from lorax_merge import adapters as A
from lorax_merge import lorax_server

SHAPES = {
    "model.layers.0.q_proj.lora_A.weight": (4, 16),
    "model.layers.0.q_proj.lora_B.weight": (24, 4),
    "model.layers.0.v_proj.lora_A.weight": (4, 16),
    "model.layers.0.v_proj.lora_B.weight": (8, 4),
    "model.layers.0.up_proj.lora_A.weight": (4, 16),
    "model.layers.0.up_proj.lora_B.weight": (32, 4),
}
# adapter 0 targets q and v, adapter 1 q only, adapter 2 v and up
MODULES = (("q_proj", "v_proj"), ("q_proj",), ("v_proj", "up_proj"))


def make_state(modules, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for name, shape in SHAPES.items()
        if name.split(".")[3] in modules
    }


@pytest.fixture
def states():
    return [make_state(m, 10 + i) for i, m in enumerate(MODULES)]


def members(states, name):
    return [i for i, s in enumerate(states) if name in s]


# -------------------------------------------------------------------------------- merge_adapters
def test_linear_merges_each_name_over_the_adapters_that_have_it(states):
    weights = [1.0, 2.0, -3.0]
    merged = A.merge_adapters(states, weights, strategy="linear")
    assert list(merged) == sorted(SHAPES)
    for name, result in merged.items():
        idx = members(states, name)
        expected = peft_merge.task_arithmetic(
            [states[i][name] for i in idx], torch.tensor(weights)[idx]
        )
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
    # up_proj lives only in adapter 2: its weight alone applies
    up = "model.layers.0.up_proj.lora_B.weight"
    torch.testing.assert_close(merged[up], -3.0 * states[2][up], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("strategy", "method"),
    [("ties", "total"), ("ties", "frequency"), ("magnitude_prune", "total")],
)
def test_pruning_strategies_match_the_lorax_reference(states, strategy, method):
    weights = [0.7, 1.3, -0.4]
    merged = A.merge_adapters(
        states, weights, strategy=strategy, density=0.5, majority_sign_method=method
    )
    for name, result in merged.items():
        idx = members(states, name)
        tensors = [states[i][name] for i in idx]
        w = torch.tensor(weights)[idx]
        if strategy == "ties":
            expected = peft_merge.ties(tensors, w, 0.5, method)
        else:
            expected = peft_merge.magnitude_prune(tensors, w, 0.5)
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_merges_every_tensor_with_its_derived_seed(states, strategy):
    weights = [1.0, 0.5, 2.0]
    merged = A.merge_adapters(states, weights, strategy=strategy, density=0.3, seed=42)
    for name, result in merged.items():
        idx = members(states, name)
        expected = lorax_merge.merge(
            [states[i][name] for i in idx],
            [weights[i] for i in idx],
            strategy,
            density=0.3,
            seed=A.derive_tensor_seed(42, name),
        )
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_result_depends_neither_on_dict_order_nor_on_batching(states, monkeypatch):
    kwargs = dict(strategy="dare_ties", density=0.5, seed=3)
    reference = A.merge_adapters(states, [1.0, 2.0, 3.0], **kwargs)
    rng = random.Random(0)
    shuffled = []
    for state in states:
        items = list(state.items())
        rng.shuffle(items)
        shuffled.append(dict(items))
    monkeypatch.setattr(A, "_CHUNK_GROUPS", 2)  # many small batches instead of one
    again = A.merge_adapters(shuffled, [1.0, 2.0, 3.0], **kwargs)
    assert list(again) == list(reference)
    for name in reference:
        torch.testing.assert_close(again[name], reference[name], rtol=0, atol=0)
        alone = A.merge_adapters(
            [{name: s[name]} if name in s else {} for s in states], [1.0, 2.0, 3.0], **kwargs
        )
        torch.testing.assert_close(alone[name], reference[name], rtol=0, atol=0)


def test_without_a_seed_torch_manual_seed_makes_dare_reproducible(states):
    torch.manual_seed(5)
    first = A.merge_adapters(states, strategy="dare_linear", density=0.5)
    torch.manual_seed(5)
    second = A.merge_adapters(states, strategy="dare_linear", density=0.5)
    torch.manual_seed(6)
    third = A.merge_adapters(states, strategy="dare_linear", density=0.5)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not all(torch.equal(first[n], third[n]) for n in first)


def test_dare_mask_does_not_depend_on_the_device(states, device):
    cpu = A.merge_adapters(states, strategy="dare_linear", density=0.5, seed=9)
    moved = A.merge_adapters(states, strategy="dare_linear", density=0.5, seed=9, device=device)
    for name in cpu:
        assert moved[name].device.type == device
        assert torch.equal(moved[name].cpu() == 0, cpu[name] == 0)
        torch.testing.assert_close(moved[name].cpu(), cpu[name], rtol=1e-6, atol=1e-7)


def test_output_dtypes(states):
    bf16 = [{k: v.to(torch.bfloat16) for k, v in s.items()} for s in states]
    default = A.merge_adapters(bf16, [1.0, 0.5, 0.25])
    kept = A.merge_adapters(bf16, [1.0, 0.5, 0.25], out_dtype="input")
    half = A.merge_adapters(bf16, [1.0, 0.5, 0.25], out_dtype=torch.float16)
    double_weights = A.merge_adapters(bf16, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    for name in default:
        assert default[name].dtype == torch.float32  # bf16 tasks times float32 weights, as in LoRAX
        assert kept[name].dtype == torch.bfloat16
        assert half[name].dtype == torch.float16
        assert double_weights[name].dtype == torch.float64
        assert torch.equal(kept[name], default[name].to(torch.bfloat16))


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_ties"])
def test_a_tensor_of_weights_merges_as_the_list(states, strategy):
    # Names held by some adapters only take their entries of the tensor.
    weights = [0.7, -1.3, 0.4]
    kw = {"strategy": strategy, "density": 0.5, "seed": 3}
    expected = A.merge_adapters(states, weights, **kw)
    got = A.merge_adapters(states, torch.tensor(weights), **kw)
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name].view(torch.int32), expected[name].view(torch.int32)), name
    scalings = [2.0, 1.0, 0.25]
    peft = {"weighting": "peft", "scalings": scalings, "strategy": "linear"}
    by_list = A.merge_adapters(states, weights, **peft)
    by_tensor = A.merge_adapters(states, torch.tensor(weights, dtype=torch.float64), **peft)
    for name in by_list:
        assert torch.equal(by_tensor[name], by_list[name]), name


def test_mixed_input_dtypes_are_promoted(states):
    mixed = [dict(states[0]), {k: v.to(torch.float16) for k, v in states[1].items()}, states[2]]
    merged = A.merge_adapters(mixed, [1.0, 1.0, 1.0], out_dtype="input")
    promoted = [dict(states[0]), {k: v.to(torch.float16).float() for k, v in states[1].items()}]
    promoted.append(states[2])
    expected = A.merge_adapters(promoted, [1.0, 1.0, 1.0])
    for name in merged:
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)


def test_progress_reports_every_tensor_once(states, monkeypatch):
    monkeypatch.setattr(A, "_CHUNK_GROUPS", 4)
    calls = []
    A.merge_adapters(states, strategy="ties", density=0.5, progress=calls.append)
    assert sum(calls) == len(SHAPES) and len(calls) == 2


def test_peft_weighting_folds_the_scalings_into_the_factors(states):
    weights, scalings = [1.0, -0.5, 2.0], [2.0, 1.0, 0.25]
    merged = A.merge_adapters(
        states, weights, strategy="linear", weighting="peft", scalings=scalings
    )
    for name, result in merged.items():
        idx = members(states, name)
        side = 0 if ".lora_A." in name else 1
        w = torch.tensor([A.peft_factor_weights(weights[i], scalings[i])[side] for i in idx])
        expected = peft_merge.task_arithmetic([states[i][name] for i in idx], w)
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_peft_weighting_of_a_single_adapter_is_linear(states):
    one = A.merge_adapters(
        states[:1], [0.5], strategy="ties", density=0.2, weighting="peft", scalings=[4.0]
    )
    for name, result in one.items():
        torch.testing.assert_close(result, states[0][name] * math.sqrt(2.0), rtol=0, atol=0)


def _bad_inputs(states):
    ints = [
        dict(states[0]),
        {"model.layers.0.q_proj.lora_A.weight": torch.ones(4, 16, dtype=torch.int32)},
    ]
    reshaped = [dict(states[0]), {"model.layers.0.q_proj.lora_A.weight": torch.ones(5, 16)}]
    extra = [dict(states[0], **{"model.layers.0.q_proj.bias": torch.ones(24)})]
    return [
        ("no adapters", [], {}, ValueError, "no adapters"),
        ("weights count", states, {"weights": [1.0, 2.0]}, ValueError, "weights"),
        ("non-float", ints, {}, TypeError, r"adapter 1.*lora_A.*int32"),
        ("shapes", reshaped, {}, ValueError, r"\[4, 16\] in adapter 0 but \[5, 16\] in adapter 1"),
        ("strategy", states, {"strategy": "average"}, ValueError, "strategy"),
        ("density", states, {"strategy": "ties", "density": -0.1}, ValueError, "density"),
        ("method", states, {"majority_sign_method": "vote"}, ValueError, "majority_sign_method"),
        ("single dict", states[0], {}, TypeError, "sequence of state dicts"),
        ("no scalings", states, {"weighting": "peft"}, ValueError, "scalings"),
        ("not a factor", extra, {"weighting": "peft", "scalings": [1.0]}, ValueError, "bias"),
        ("out_dtype", states, {"out_dtype": torch.int8}, ValueError, "out_dtype"),
        ("weighting", states, {"weighting": "mergekit"}, ValueError, "weighting"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_inputs_name_the_problem(states, case):
    _, adapters, kwargs, error, pattern = _bad_inputs(states)[case]
    with pytest.raises(error, match=pattern):
        A.merge_adapters(adapters, **kwargs)


# ------------------------------------------------------------------------------------- configs
def test_config_merge_takes_the_first_config_and_the_sorted_union():
    first = {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "bias": "none"}
    second = {"r": 8, "lora_alpha": 32, "target_modules": ["up_proj", "q_proj"], "bias": "all"}
    merged = A.merge_adapter_configs([first, second])
    assert merged == {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "up_proj", "v_proj"],
        "bias": "none",
    }
    assert first["target_modules"] == ["v_proj", "q_proj"]  # inputs untouched


def test_config_merge_with_peft_weighting_resets_alpha_and_patterns():
    first = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {}}
    merged = A.merge_adapter_configs([first, dict(first)], weighting="peft")
    assert (
        merged["lora_alpha"] == 4 and merged["rank_pattern"] == {} and merged["alpha_pattern"] == {}
    )


def test_differing_ranks_name_every_adapter_and_its_rank():
    configs = [{"r": 8, "target_modules": ["q"]}, {"r": 16, "target_modules": ["q"]}]
    with pytest.raises(ValueError, match=r"sql \(r=8\), chat \(r=16\)"):
        A.merge_adapter_configs(configs, ["sql", "chat"])


@pytest.mark.parametrize(
    ("configs", "pattern"),
    [
        ([], "no adapters"),
        ([{"r": 8, "target_modules": []}, {"r": 8}], "no target modules"),
        ([{"r": "8", "target_modules": ["q"]}], "'r' must be a positive integer"),
        ([{"r": 0, "target_modules": ["q"]}], "'r' must be a positive integer"),
        ([{"r": True, "target_modules": ["q"]}], "'r' must be a positive integer"),
        ([{"target_modules": ["q"]}], "'r' must be a positive integer"),
        ([{"r": 8, "target_modules": 5}], "target_modules"),
        ([{"r": 8, "target_modules": ["q"]}, {"r": 8, "target_modules": ".*q"}], "mix"),
    ],
)
def test_invalid_configs_are_refused(configs, pattern):
    with pytest.raises(ValueError, match=pattern):
        A.merge_adapter_configs(configs)


def test_one_adapter_without_target_modules_is_fine():
    merged = A.merge_adapter_configs(
        [{"r": 8, "target_modules": None}, {"r": 8, "target_modules": ["k"]}]
    )
    assert merged["target_modules"] == ["k"]


def test_regular_expression_target_modules_are_combined():
    configs = [{"r": 2, "target_modules": ".*q_proj"}, {"r": 2, "target_modules": ".*v_proj"}]
    assert A.merge_adapter_configs(configs)["target_modules"] == "(.*q_proj)|(.*v_proj)"
    assert A.merge_adapter_configs(configs[:1] * 2)["target_modules"] == ".*q_proj"


def test_peft_config_objects_are_merged_into_a_copy():
    from peft import LoraConfig

    first = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    second = LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj"])
    merged = A.merge_adapter_configs([first, second], weighting="peft")
    assert isinstance(merged, LoraConfig) and merged is not first
    assert merged.target_modules == ["k_proj", "q_proj", "v_proj"]
    assert merged.lora_alpha == 8
    assert first.lora_alpha == 16 and first.target_modules == {"q_proj", "v_proj"}


# ------------------------------------------------------------------------- PEFT scaling, factors
@pytest.mark.parametrize(("r", "alpha", "rslora"), [(8, 16, False), (8, 32, True), (4, 3, False)])
def test_peft_scaling_is_the_scaling_peft_applies(r, alpha, rslora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj"])
    model = get_peft_model(examples().build_base_model(), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert A.peft_scaling(config.to_dict()) == layer.scaling["default"]
    assert A.peft_scaling(config) == layer.scaling["default"]


def test_peft_scaling_defaults_and_refusals():
    assert A.peft_scaling({"r": 4}) == 2.0  # PEFT's default lora_alpha is 8
    with pytest.raises(ValueError, match="rank_pattern"):
        A.peft_scaling({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}})
    with pytest.raises(ValueError, match="lora_alpha"):
        A.peft_scaling({"r": 4, "lora_alpha": "8"})


@pytest.mark.parametrize(("w", "s"), [(1.0, 2.0), (-0.6, 0.5), (0.0, 4.0), (3.0, -1.0)])
def test_peft_factor_weights_split_the_product(w, s):
    wa, wb = A.peft_factor_weights(w, s)
    assert wb >= 0 and wb == math.sqrt(abs(w * s))
    assert math.isclose(wa * wb, w * s, rel_tol=1e-12, abs_tol=0)
    assert math.copysign(1.0, wa) == (1.0 if w * s >= 0 else -1.0)


def test_lora_factor_names():
    assert A.lora_factor("base_model.model.layers.0.q_proj.lora_A.weight") == "A"
    assert A.lora_factor("base_model.model.embed_tokens.lora_embedding_B") == "B"
    assert A.lora_factor("base_model.model.layers.0.q_proj.lora_magnitude_vector") is None


# ----------------------------------------------------------------------------- LoRAX server format
@dataclass
class ServerLoraConfig:
    """The fields of the LoRAX server's LoRA configuration object."""

    base_model_name_or_path: str
    r: int
    target_modules: list
    fan_in_fan_out: bool
    lora_alpha: int
    use_rslora: bool


def module_maps(states):
    """The states as LoRAX module maps: module_map[weight_name][k] = (tensor, param_name)."""
    maps = []
    for state in states:
        module_map = {}
        for name, tensor in state.items():
            weight_name, k, _ = name.rsplit(".", 2)
            module_map.setdefault(weight_name, {})[k] = (tensor, f"base_model.{name}")
        maps.append(module_map)
    return maps


@pytest.mark.parametrize(
    ("merge_strategy", "majority_sign_method"), [(0, 0), (1, 0), (1, 1), ("TIES", "FREQUENCY")]
)
def test_module_maps_merge_like_the_lorax_server(states, merge_strategy, majority_sign_method):
    configs = [
        ServerLoraConfig("base", 4, list(m), False, 8 * (i + 1), False)
        for i, m in enumerate(MODULES)
    ]
    params = SimpleNamespace(
        adapter_ids=["a", "b", "c"],
        weights=[0.5, 1.5, -1.0],
        merge_strategy=merge_strategy,
        density=0.5,
        majority_sign_method=majority_sign_method,
    )
    merged, config = lorax_server.merge_module_maps(list(zip(module_maps(states), configs)), params)
    assert isinstance(config, ServerLoraConfig) and config.lora_alpha == 8
    assert config.target_modules == ["q_proj", "up_proj", "v_proj"]
    strategy = (
        lorax_server.LORAX_MERGE_STRATEGIES[merge_strategy] if merge_strategy != "TIES" else "ties"
    )
    method = "frequency" if majority_sign_method in (1, "FREQUENCY") else "total"
    count = 0
    for name in SHAPES:
        weight_name, k, _ = name.rsplit(".", 2)
        tensor, param_name = merged[weight_name][k]
        idx = members(states, name)
        tensors, w = [states[i][name] for i in idx], torch.tensor(params.weights)[idx]
        if strategy == "linear":
            expected = peft_merge.task_arithmetic(tensors, w)
        else:
            expected = peft_merge.ties(tensors, w, 0.5, method)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
        assert param_name == f"base_model.{name}"
        count += 1
    assert sum(len(v) for v in merged.values()) == count


def test_module_maps_dare_uses_the_seed_and_refuses_bad_params(states):
    configs = [ServerLoraConfig("base", 4, list(m), False, 8, False) for m in MODULES]
    pairs = list(zip(module_maps(states), configs))
    params = {"weights": [], "merge_strategy": 3, "density": 0.5, "majority_sign_method": 0}
    one, _ = lorax_server.merge_module_maps(pairs, params, seed=5)
    two, _ = lorax_server.merge_module_maps(pairs, params, seed=5)
    # the same seeds as merge_adapters (and so lorax-merge) on the adapter files' tensor names
    files = [{f"base_model.{n}": t for n, t in s.items()} for s in states]
    plain = A.merge_adapters(files, strategy="dare_ties", density=0.5, seed=5)
    for name, expected in plain.items():
        weight_name, k, _ = name[len("base_model.") :].rsplit(".", 2)
        assert torch.equal(one[weight_name][k][0], two[weight_name][k][0])
        assert torch.equal(one[weight_name][k][0], expected)
    with pytest.raises(ValueError, match="merge_strategy"):
        lorax_server.merge_module_maps(pairs, dict(params, merge_strategy=7))
    with pytest.raises(ValueError, match=r"\(r=4\).*\(r=8\)"):
        lorax_server.merge_module_maps(
            [pairs[0], (pairs[1][0], ServerLoraConfig("base", 8, ["q_proj"], False, 8, False))],
            params,
        )


def test_module_maps_are_still_importable_from_adapters():
    from lorax_merge.adapters import merge_module_maps

    assert merge_module_maps is lorax_server.merge_module_maps
    with pytest.raises(AttributeError, match="no_such_name"):
        A.no_such_name  # noqa: B018


def test_batches_share_dtype_and_device_and_respect_the_limits():
    f32 = [torch.zeros(4, 4)]  # 64 bytes per name
    bf16 = [torch.zeros(4, 4, dtype=torch.bfloat16)]  # 32 bytes
    groups = {"a": f32, "b": bf16, "c": f32, "d": f32, "e": bf16, "big": [torch.zeros(100)]}
    plan = A.plan_batches(groups, "input", max_groups=2, max_bytes=1000)
    assert [(b.names, b.out_dtype) for b in plan] == [
        (("a", "c"), torch.float32),
        (("d", "big"), torch.float32),
        (("b", "e"), torch.bfloat16),
    ]
    # a byte limit smaller than one name: that name alone
    plan = A.plan_batches(groups, torch.float64, max_groups=64, max_bytes=100)
    assert [b.names for b in plan] == [("a", "b"), ("c",), ("d", "e"), ("big",)]
    assert {b.out_dtype for b in plan} == {torch.float64}
    # every name in exactly one batch, in order
    plan = A.plan_batches(groups, None)
    assert [n for b in plan for n in b.names] == list(groups) and len(plan) == 1


def test_the_submodules_are_reachable_from_the_package_alone():
    """``import lorax_merge`` then ``lorax_merge.delta_adapters.…`` works as the README writes
    it, and the plain import leaves PEFT unloaded until ``lorax_merge.peft`` is used."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, lorax_merge\n"
        "assert 'peft' not in sys.modules\n"
        "assert callable(lorax_merge.delta_adapters.merge_adapters_delta)\n"
        "assert callable(lorax_merge.lowrank.peft_factors)\n"
        "assert callable(lorax_merge.lorax_server.merge_module_maps)\n"
        "assert callable(lorax_merge.delta.merged_delta)\n"
        "assert callable(lorax_merge.peft.add_weighted_adapter)\n"
        "try:\n    lorax_merge.no_such_module\nexcept AttributeError:\n    print('ok')\n"
    )
    root = str(Path(lorax_merge.__file__).resolve().parent.parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
