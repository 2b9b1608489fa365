"""End to end on a tiny local Llama: three adapters of different ranks and alphas (one with
rsLoRA) merged with every combination type, saved, reloaded with ``PeftModel.from_pretrained``,
and run: finite logits, equal to those of the merged adapter before saving. The factor-space
types need equal ranks (PEFT's rule), so they merge three rank-8 adapters instead."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("peft")
from adapter_tools import examples  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

import lorax_merge.peft as lm_peft  # noqa: E402
from lorax_merge.delta_adapters import merge_adapters_delta  # noqa: E402
from lorax_merge.strategy_table import STRATEGIES, strategy_names  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> (r, lora_alpha, use_rslora, target modules)
ADAPTERS = {
    "sql": (4, 8, False, MODULES[:4]),
    "chat": (8, 32, True, MODULES),
    "code": (6, 16, False, ["q_proj", "v_proj", "down_proj"]),
    "e1": (8, 16, False, MODULES),
    "e2": (8, 8, False, MODULES[:4]),
    "e3": (8, 4, True, MODULES),
}
DIFFERENT_RANKS = ["sql", "chat", "code"]
EQUAL_RANKS = ["e1", "e2", "e3"]
TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 88, 41]])


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = None
        for name, (r, alpha, rslora, targets) in ADAPTERS.items():
            config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                target_modules=targets, init_lora_weights=False)  # fmt: skip
            if peft_model is None:
                peft_model = get_peft_model(examples().build_base_model(), config, name)
            else:
                peft_model.add_adapter(name, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()


def _logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("combination_type", strategy_names(in_peft=True))
def test_every_combination_type_round_trips_through_peft(model, tmp_path, combination_type):
    spec = STRATEGIES[combination_type]
    chosen = DIFFERENT_RANKS if spec.space == "delta" else EQUAL_RANKS
    name = f"m_{combination_type}"
    lm_peft.add_weighted_adapter(model, chosen, [1.0, 0.6, -0.4], name, combination_type,
                                 density=0.5, seed=5)  # fmt: skip
    expected = _logits(model, name)
    assert bool(torch.isfinite(expected).all())
    assert not torch.equal(expected, _logits(model, chosen[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path), selected_adapters=[name])
        reloaded = PeftModel.from_pretrained(examples().build_base_model(), str(tmp_path / name))
    with torch.no_grad():
        logits = reloaded(TOKENS).logits
    assert bool(torch.isfinite(logits).all())
    torch.testing.assert_close(logits, expected)
    ranks = [ADAPTERS[n][0] for n in chosen]
    assert reloaded.peft_config["default"].r == (sum(ranks) if combination_type == "cat" else 8)


@pytest.mark.parametrize("combination_type", ["ties_svd", "cat"])
def test_state_dicts_and_configs_merge_like_the_drop_in(model, tmp_path, combination_type):
    """The whole-adapter function (what the command uses) writes a loadable adapter that
    behaves as the drop-in's merge of the same adapters."""
    states = [get_peft_model_state_dict(model, adapter_name=n) for n in DIFFERENT_RANKS]
    configs = [model.peft_config[n] for n in DIFFERENT_RANKS]
    tensors, config = merge_adapters_delta(states, configs, [1.0, 0.6, -0.4],
                                           strategy=combination_type, density=0.5)  # fmt: skip
    assert config.lora_alpha == config.r and config.use_rslora is False
    from safetensors.torch import save_file

    config.save_pretrained(str(tmp_path))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(examples().build_base_model(), str(tmp_path))
    with torch.no_grad():
        logits = reloaded(TOKENS).logits
    name = f"s_{combination_type}"
    lm_peft.add_weighted_adapter(model, DIFFERENT_RANKS, [1.0, 0.6, -0.4], name,
                                 combination_type, density=0.5)  # fmt: skip
    torch.testing.assert_close(logits, _logits(model, name))
