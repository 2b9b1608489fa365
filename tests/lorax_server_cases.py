"""Module maps, requests and bit-for-bit checks shared by the LoRAX server tests.

The adapters are Llama-shaped module maps ``{weight_name: {"lora_A": (tensor, param_name),
"lora_B": (tensor, param_name)}}``; ``ours(option, ...)`` merges a request through one of the two
integration options of ``docs/lorax-server.md``:

* Option 1: ``lorax_merge.adapters.merge_module_maps`` in place of the server's function;
* Option 2: the server's ``merge_adapters`` with ``lorax_merge.strategies.strategy_registry``.
"""

from __future__ import annotations

import functools

import lorax_server_model as server
import torch
from helpers import random_mask, tie_free
from lorax_server_model import AdapterParameters, LoraConfig

from lorax_merge import adapters as A
from lorax_merge.strategies import strategy_registry

RANK, IN_FEATURES, LAYERS = 8, 48, 2
OUT_FEATURES = {"q_proj": 40, "v_proj": 24, "up_proj": 56}
ADAPTER_IDS = ("sql", "support", "extract")
WEIGHTS = (0.75, -0.5, 1.25)
SEED = 2024
#: the adapters' target modules in each adapter set
ADAPTER_SETS = {
    "overlapping": (("q_proj", "v_proj"), ("q_proj",), ("v_proj", "up_proj")),
    "one adapter": (("q_proj", "v_proj"),),
    "disjoint": (("q_proj",), ("v_proj",), ("up_proj",)),
}
DTYPES = {
    "float32": (torch.float32,) * 3,
    "bfloat16": (torch.bfloat16,) * 3,
    "float16": (torch.float16,) * 3,
    "mixed": (torch.float32, torch.bfloat16, torch.float16),
}


# --------------------------------------------------------------------------------------- helpers
def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().cpu().contiguous().reshape(-1).view(view)


def assert_same_bits(got, expected, what="", negative_zero=None):
    """Same dtype, shape and bits; NaN where expected is NaN.  ``negative_zero`` marks where the
    documented sign-of-zero difference applies: there the server has +0 and we have -0."""
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {expected.shape}"
    expected = expected.detach().cpu().reshape(-1)
    if negative_zero is not None:
        negative_zero = negative_zero.reshape(-1)
        assert bool((_bits(expected)[negative_zero] == 0).all()), f"{what}: server has no +0 there"
        expected = torch.where(negative_zero, -torch.zeros_like(expected), expected)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got.detach().cpu().reshape(-1)), nan), f"{what}: NaN positions"
    differ = (_bits(got) != _bits(expected)) & ~nan
    assert not bool(differ.any()), f"{what}: {int(differ.sum())} of {differ.numel()} differ"


def assert_maps_same_bits(got, expected, negative_zero=None):
    """Same (weight_name, k) entries and param names, and bit-identical tensors."""
    assert sorted((w, k) for w in got for k in got[w]) == sorted(
        (w, k) for w in expected for k in expected[w]
    )
    for weight_name, by_k in expected.items():
        for k, (tensor, param_name) in by_k.items():
            got_tensor, got_name = got[weight_name][k]
            assert got_name == param_name
            zeros = None if negative_zero is None else negative_zero.get(param_name)
            assert_same_bits(got_tensor, tensor, f"{weight_name}.{k}", zeros)


def all_terms_negative_zero(tensors, weights, kept=None):
    """Where every term ``v_i * w_i`` of a weighted sum is -0 (``v_i`` is ``x_i`` if kept, else
    ``x_i * 0``): the server's ``sum(dim=0)`` gives +0 there, our merge -0."""
    result = None
    for i, x in enumerate(tensors):
        v = x if kept is None else torch.where(kept[i], x, x * 0)
        term = v.to(torch.float64) * float(weights[i])
        here = (term == 0) & torch.signbit(term)
        result = here if result is None else result & here
    return result


def sum_negative_zeros(pairs, params, kept=None) -> dict[str, torch.Tensor]:
    """:func:`all_terms_negative_zero` for every tensor of a weighted-sum merge, by param name;
    ``kept`` holds the keep-masks of every tensor's tasks by param name (None: no pruning)."""
    return {
        name: all_terms_negative_zero(
            tensors, group_weights(pairs, name, params), None if kept is None else kept[name]
        )
        for name, tensors in server.merge_order(pairs)
    }


def param_name(weight_name: str, k: str) -> str:
    return f"base_model.model.{weight_name}.{k}.weight"


def module_map(modules, dtype, adapter: int, make=tie_free):
    """One adapter's module map: ``{weight_name: {k: (tensor, param_name)}}``."""
    result = {}
    for layer in range(LAYERS):
        for module in modules:
            block = "mlp" if module == "up_proj" else "self_attn"
            weight_name = f"model.layers.{layer}.{block}.{module}"
            seed = 1000 * adapter + 10 * layer + 2 * list(OUT_FEATURES).index(module)
            shapes = {"lora_A": (RANK, IN_FEATURES), "lora_B": (OUT_FEATURES[module], RANK)}
            result[weight_name] = {
                k: (make(shape, dtype, seed=seed + j), param_name(weight_name, k))
                for j, (k, shape) in enumerate(shapes.items())
            }
    return result


def adapter_pairs(adapter_set: str, dtypes, make=tie_free):
    modules = ADAPTER_SETS[adapter_set]
    return [
        (module_map(m, dtypes[i], i, make), LoraConfig(RANK, list(m), lora_alpha=8 * (i + 1)))
        for i, m in enumerate(modules)
    ]


def request(count: int, strategy="LINEAR", density=1.0, method="TOTAL", weights=WEIGHTS):
    return AdapterParameters(
        adapter_ids=list(ADAPTER_IDS[:count]),
        weights=list(weights[:count]),
        merge_strategy=strategy,
        density=density,
        majority_sign_method=method,
    )


def by_name(params: AdapterParameters) -> dict:
    """The same request as a mapping whose enums are names."""
    return {
        "adapter_ids": params.adapter_ids,
        "weights": params.weights,
        "merge_strategy": server.MERGE_STRATEGY_ENUM[params.merge_strategy],
        "density": params.density,
        "majority_sign_method": server.MAJORITY_SIGN_METHOD_ENUM[params.majority_sign_method],
    }


def seeded_registry(seed: int) -> dict:
    """Our strategy classes, built as the server builds them, with a DARE seed."""
    return {name: functools.partial(cls, seed=seed) for name, cls in strategy_registry.items()}


def ours(option: int, pairs, params, seed=SEED):
    if option == 1:
        return A.merge_module_maps(pairs, params, seed=seed)
    return server.merge_adapters(pairs, params, registry=seeded_registry(seed))


def group_weights(pairs, name: str, params) -> list[float]:
    """The request's weights of the adapters that have tensor ``name``."""
    return [
        params.weights[i]
        for i, (module_map_, _) in enumerate(pairs)
        if any(n == name for entries in module_map_.values() for _, n in entries.values())
    ]


def dare_masks(option: int, pairs, density: float) -> dict[str, list[torch.Tensor]]:
    """The keep-masks our DARE draws for every tensor, by param name (task i: stream i)."""
    masks = {}
    for name, tensors in server.merge_order(pairs):
        seed = A.derive_tensor_seed(SEED, name) if option == 1 else SEED
        masks[name] = [random_mask(t.shape, density, seed, i) for i, t in enumerate(tensors)]
    return masks
