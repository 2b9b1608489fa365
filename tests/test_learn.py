"""``lorax_merge.learn_weights``: merge weights learned by gradient descent through the merge."""

from __future__ import annotations

import math

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


_NOT_FINITE_L1 = "l1 must be a finite number >= 0"
_NOT_POSITIVE_LR = "lr must be a finite number > 0"


@pytest.mark.parametrize(
    ("arg", "value", "error", "message"),
    [("l1", v, ValueError, _NOT_FINITE_L1) for v in (-1.0, -1e-9, math.nan, math.inf)]
    + [("lr", v, ValueError, _NOT_POSITIVE_LR) for v in (0.0, -0.1, math.nan)]
    + [
        (arg, v, TypeError, f"{arg} must be a real number")
        for arg in ("l1", "lr")
        for v in ("0.1", None, True, torch.tensor(True))
    ],
)
def test_an_l1_or_lr_that_is_not_a_number_in_range_is_refused_by_name(arg, value, error, message):
    adapters = _adapters()
    with pytest.raises(error, match=message):
        lorax_merge.learn_weights(
            adapters, _distance_loss(adapters[0]), [None], steps=1, **{arg: value}
        )


def test_one_element_tensors_are_numbers_for_l1_and_lr():
    adapters = _adapters()
    loss = _distance_loss(adapters[0])
    as_floats = lorax_merge.learn_weights(adapters, loss, [None], steps=3, lr=0.1, l1=0.01)
    as_tensors = lorax_merge.learn_weights(
        adapters,
        loss,
        [None],
        steps=3,
        lr=torch.tensor(0.1, dtype=torch.float64),
        l1=torch.tensor([0.01], dtype=torch.float64),
    )
    assert torch.equal(as_tensors.weights, as_floats.weights)
    assert as_tensors.losses == as_floats.losses


@pytest.mark.parametrize(
    "init",
    [
        torch.tensor([0.5 + 1j, 0.25, 0.25]),
        [0.5j, 0.25, 0.25],
        torch.tensor([True, False, True]),
    ],
    ids=["complex tensor", "complex numbers", "bool tensor"],
)
def test_an_init_that_is_not_real_is_refused_by_name_rather_than_cut_to_its_real_part(init):
    adapters = _adapters()
    with pytest.raises(TypeError, match="init must hold real numbers"):
        lorax_merge.learn_weights(adapters, _distance_loss(adapters[0]), [None], steps=1, init=init)


def test_an_init_that_is_not_numbers_is_refused_by_name():
    adapters = _adapters()
    with pytest.raises(TypeError, match="init must be a tensor or a sequence of numbers"):
        lorax_merge.learn_weights(adapters, _distance_loss(adapters[0]), [None], init="abc")


@pytest.mark.parametrize("per_module", ["yes", 1, None])
def test_a_per_module_that_is_not_a_bool_is_refused_by_name(per_module):
    adapters = _adapters()
    with pytest.raises(TypeError, match="per_module must be a bool"):
        lorax_merge.learn_weights(
            adapters, _distance_loss(adapters[0]), [None], steps=1, per_module=per_module
        )


def _constant_loss(merged, batch):
    return torch.tensor(1.0)


def _detached_loss(merged, batch):
    return merged[NAMES[0]].detach().square().mean()


def _no_grad_loss(merged, batch):
    with torch.no_grad():
        return merged[NAMES[0]].square().mean()


_other = torch.nn.Parameter(torch.ones(3))


def _other_parameter_loss(merged, batch):
    return (_other * 2).sum()  # depends on a parameter, not on the merge weights


@pytest.mark.parametrize("l1", [0.0, 0.1])
@pytest.mark.parametrize(
    "loss_fn", [_constant_loss, _detached_loss, _no_grad_loss, _other_parameter_loss]
)
def test_a_loss_that_does_not_depend_on_the_weights_is_refused_naming_loss_fn(loss_fn, l1):
    with pytest.raises(ValueError, match="loss_fn: the loss does not depend on the weights"):
        lorax_merge.learn_weights(_adapters(), loss_fn, [None], steps=2, l1=l1)


def test_a_loss_whose_gradient_is_zero_still_depends_on_the_weights():
    result = lorax_merge.learn_weights(
        _adapters(), lambda m, b: m[NAMES[0]].sum() * 0, [None], steps=2
    )
    assert result.losses == [0.0, 0.0]
    assert torch.equal(result.weights, torch.full((3,), 1 / 3))  # Adam does not move at grad 0
