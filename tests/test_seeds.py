"""Seeds: the derivations, and one seed rule (any int, taken modulo 2**64) in every API."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import make_tasks

import lorax_merge
from lorax_merge import adapters, utils

MASK64 = (1 << 64) - 1
#: seeds that are the same seed modulo 2**64, and two that are not
SAME_SEEDS = (-1, 2**64 - 1, 2**65 - 1)


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


# ------------------------------------------------------------------------------ group seeds
@pytest.mark.parametrize("seed", [0, 5, 2**63 - 1, 2**63, -1, -(2**70)])
@pytest.mark.parametrize("index", [0, 1, 77])
def test_group_seed_follows_the_documented_formula(seed, index):
    expected = splitmix64(splitmix64(seed & MASK64) ^ index) >> 1
    assert lorax_merge.derive_group_seed(seed, index) == expected
    assert 0 <= expected <= lorax_merge.seeds.MAX_SEED


def test_derive_seed_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="derive_group_seed"):
        old = lorax_merge.derive_seed(123, 4)
    assert old == lorax_merge.derive_group_seed(123, 4)


# ----------------------------------------------------------------------------- tensor seeds
@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**63 - 1, 2**63, 2**64 - 1])
@pytest.mark.parametrize("name", ["", "base_model.model.q_proj.lora_A.weight", "modül.λ"])
def test_tensor_seed_follows_the_documented_formula(seed, name):
    digest = hashlib.blake2b(
        seed.to_bytes(8, "little") + name.encode("utf-8"), digest_size=8, person=b"lorax-merge/seed"
    ).digest()
    assert lorax_merge.derive_tensor_seed(seed, name) == int.from_bytes(digest, "little") & (
        2**63 - 1
    )


def test_tensor_seeds_differ_between_names_and_seeds():
    names = [f"layers.{i}.q_proj.lora_{ab}.weight" for i in range(50) for ab in "AB"]
    derive = lorax_merge.derive_tensor_seed
    seeds = {derive(7, n) for n in names} | {derive(8, n) for n in names}
    assert len(seeds) == 2 * len(names)
    assert all(0 <= s < 2**63 for s in seeds)


def test_tensor_seed_takes_any_int_modulo_2_64():
    values = {lorax_merge.derive_tensor_seed(s, "x") for s in SAME_SEEDS}
    assert len(values) == 1
    assert lorax_merge.derive_tensor_seed(0, "x") != lorax_merge.derive_tensor_seed(2**63, "x")


@pytest.mark.parametrize("seed", [None, 1.0, True, "1"])
def test_tensor_seed_rejects_what_is_not_an_int(seed):
    with pytest.raises(TypeError, match="seed"):
        lorax_merge.derive_tensor_seed(seed, "x")


def test_tensor_seed_rejects_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="name"):
        lorax_merge.derive_tensor_seed(1, b"x")


# ----------------------------------------------------------------- one rule in every API
def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_merge_takes_any_int_seed_modulo_2_64(strategy):
    tasks = make_tasks(3, (40, 40), torch.float32, seed=1)
    results = [
        lorax_merge.merge(tasks, [1.0, 0.5, 2.0], strategy, density=0.5, seed=s) for s in SAME_SEEDS
    ]
    assert all(_equal(results[0], r) for r in results[1:])
    other = lorax_merge.merge(tasks, [1.0, 0.5, 2.0], strategy, density=0.5, seed=2**63 - 1)
    assert not _equal(results[0], other)


def test_merge_many_takes_any_int_seed_modulo_2_64():
    groups = [make_tasks(2, (30,), torch.float32, seed=g) for g in range(3)]
    kw = dict(strategy="dare_linear", density=0.5)
    results = [lorax_merge.merge_many(groups, [1.0, -1.0], seed=s, **kw) for s in SAME_SEEDS]
    for g, tasks in enumerate(groups):
        alone = lorax_merge.merge(
            tasks, [1.0, -1.0], seed=lorax_merge.derive_group_seed(-1, g), **kw
        )
        assert all(_equal(r[g], alone) for r in results)


def test_merge_adapters_takes_any_int_seed_as_merge_does():
    states = [
        {"a.lora_A.weight": t, "a.lora_B.weight": 2 * t}
        for t in make_tasks(2, (8, 8), torch.float32, seed=3)
    ]
    kw = dict(strategy="dare_ties", density=0.5)
    results = [adapters.merge_adapters(states, [1.0, 0.5], seed=s, **kw) for s in SAME_SEEDS]
    for name in results[0]:
        expected = lorax_merge.merge(
            [s[name] for s in states],
            [1.0, 0.5],
            seed=lorax_merge.derive_tensor_seed(-1, name),
            **kw,
        )
        assert all(_equal(r[name], expected) for r in results)


def test_prune_takes_any_int_seed_modulo_2_64():
    x = torch.randn(1000)
    pruned = [utils.prune(x, 0.3, "random", seed=s) for s in SAME_SEEDS]
    assert all(_equal(pruned[0], p) for p in pruned[1:])


@pytest.mark.parametrize("seed", [1.5, "7", True])
def test_every_api_rejects_a_seed_that_is_not_an_int(seed):
    tasks = make_tasks(2, (4,), torch.float32)
    with pytest.raises(TypeError, match="seed"):
        lorax_merge.merge(tasks, [1.0, 1.0], "dare_linear", density=0.5, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        lorax_merge.merge_many([tasks], [1.0, 1.0], strategy="dare_linear", seed=seed)
    with pytest.raises(TypeError, match="seed"):
        adapters.merge_adapters([{"w": t} for t in tasks], strategy="dare_linear", seed=seed)
    with pytest.raises(TypeError, match="seed"):
        utils.prune(tasks[0], 0.5, "random", seed=seed)
