"""``lorax_merge.learn_weights``: merge weights learned by gradient descent through the merge."""

from __future__ import annotations

import pytest
import torch
from helpers import STRATEGIES, merge_kwargs

import lorax_merge
from lorax_merge.learn import module_name

NAMES = ("m.layers.0.q.lora_A.weight", "m.layers.0.q.lora_B.weight", "m.layers.1.v.lora_A.weight")


def _adapters(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(6, 10, generator=gen) for n in NAMES} for _ in range(count)]


def _distance_loss(target: dict[str, torch.Tensor]):
    def loss(merged, batch):
        return sum(((merged[n] - target[n]) ** 2).mean() for n in target)

    return loss


def test_module_name():
    assert module_name("a.b.q_proj.lora_A.weight") == "a.b.q_proj"
    assert module_name("a.b.q_proj.lora_embedding_B") == "a.b.q_proj"
    assert module_name("lm_head.weight") == "lm_head.weight"


def test_recovers_the_weights_of_a_linear_target():
    adapters = _adapters()
    wanted = [0.7, -0.2, 0.4]
    target = lorax_merge.merge_adapters(adapters, wanted)
    result = lorax_merge.learn_weights(adapters, _distance_loss(target), [None], steps=300, lr=0.05)
    assert result.losses[-1] < 1e-3 * result.losses[0]
    assert torch.allclose(result.weights, torch.tensor(wanted), atol=2e-2)
    assert result.modules == () and result.seed is None
    assert result.weights_of("m.layers.0.q").shape == (3,)


def test_one_weight_per_adapter_and_module():
    adapters = _adapters(seed=1)
    per_module = {"m.layers.0.q": [0.9, 0.1, -0.3], "m.layers.1.v": [0.2, 0.5, 0.6]}
    target = {}
    for name in NAMES:
        weights = per_module[module_name(name)]
        target[name] = lorax_merge.merge([a[name] for a in adapters], weights)
    result = lorax_merge.learn_weights(
        adapters, _distance_loss(target), [None], per_module=True, steps=300, lr=0.05
    )
    assert result.modules == ("m.layers.0.q", "m.layers.1.v")
    assert result.weights.shape == (2, 3)
    for module, wanted in per_module.items():
        assert torch.allclose(result.weights_of(module), torch.tensor(wanted), atol=2e-2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_falls_and_the_result_is_merge_adapters(strategy):
    adapters = _adapters(seed=2)
    target = lorax_merge.merge_adapters(adapters, [0.5, 0.5, 0.5])
    kw = merge_kwargs(strategy, 0.6, seed=11)
    result = lorax_merge.learn_weights(
        adapters, _distance_loss(target), [None, None], strategy=strategy, steps=40, lr=0.05, **kw
    )
    assert result.losses[-1] < result.losses[0]
    again = lorax_merge.merge_adapters(adapters, result.weights, strategy=strategy, **kw)
    assert again.keys() == result.merged.keys()
    for name in again:
        assert torch.equal(again[name], result.merged[name]), name


def test_a_drawn_seed_is_reported_and_kept_for_the_whole_run():
    adapters = _adapters(seed=3)
    target = lorax_merge.merge_adapters(adapters, [1.0, 0.0, 0.0])
    result = lorax_merge.learn_weights(
        adapters, _distance_loss(target), [None], strategy="dare_ties", density=0.5, steps=30
    )
    assert result.seed is not None
    again = lorax_merge.merge_adapters(
        adapters, result.weights, strategy="dare_ties", density=0.5, seed=result.seed
    )
    for name in again:
        assert torch.equal(again[name], result.merged[name])


def test_batches_are_used_in_turn_and_l1_shrinks_the_weights():
    adapters = _adapters(seed=4)
    seen = []

    def loss(merged, batch):
        seen.append(batch)
        return merged[NAMES[0]].square().mean() * 0

    result = lorax_merge.learn_weights(adapters, loss, ["a", "b", "c"], steps=7, l1=1.0, lr=0.1)
    assert seen[:7] == ["a", "b", "c", "a", "b", "c", "a"]
    assert bool((result.weights.abs() < 1 / 3).all())
    assert result.losses == [0.0] * 7


def test_bad_arguments():
    adapters = _adapters()
    loss = _distance_loss(adapters[0])
    with pytest.raises(ValueError, match="init"):
        lorax_merge.learn_weights(adapters, loss, [None], init=[1.0, 2.0])
    with pytest.raises(ValueError, match="batches"):
        lorax_merge.learn_weights(adapters, loss, [])
    with pytest.raises(ValueError, match="strategy"):
        lorax_merge.learn_weights(adapters, loss, [None], strategy="nope")
    with pytest.raises(ValueError, match="scalar"):
        lorax_merge.learn_weights(adapters, lambda m, b: m[NAMES[0]], [None], steps=1)
