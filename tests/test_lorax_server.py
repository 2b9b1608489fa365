"""The drop-ins for the LoRAX server merge requests as the server does, to the bit.

``lorax_server_model.merge_adapters`` is the server's ``merge_adapters`` step by step, over its
strategy code (``benchmarks/upstream.py``).  Both integration options (``lorax_server_cases.ours``)
are compared with it wherever no difference listed in ``docs/lorax-server.md`` applies: tensors
are compared bit for bit (NaN positions must match; NaN payloads are not compared).  The listed
differences are asserted in ``test_lorax_server_differences.py``.
"""

from __future__ import annotations

import lorax_server_model as server
import pytest
import torch
import upstream
from helpers import bernoulli_returns, tie_free
from lorax_server_cases import (
    ADAPTER_SETS,
    DTYPES,
    RANK,
    WEIGHTS,
    adapter_pairs,
    assert_maps_same_bits,
    assert_same_bits,
    by_name,
    dare_masks,
    ours,
    request,
    sum_negative_zeros,
)
from lorax_server_model import LoraConfig

from lorax_merge import adapters as A
from lorax_merge import utils

# ----------------------------------------------------------------------- equal to the server
NO_MASK_CASES = [("LINEAR", "TOTAL", 1.0)] + [
    ("TIES", method, density)
    for method, density in [("TOTAL", 0.0), ("TOTAL", 0.5), ("TOTAL", 1.0), ("TOTAL", 1.5)]
    + [("FREQUENCY", 0.5)]
]


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("adapter_set", list(ADAPTER_SETS))
@pytest.mark.parametrize(("strategy", "method", "density"), NO_MASK_CASES)
def test_linear_and_ties_requests_merge_as_the_server_merges_them(
    strategy, method, density, adapter_set, dtypes, option
):
    pairs = adapter_pairs(adapter_set, DTYPES[dtypes])
    params = request(len(pairs), strategy, density, method)
    expected, expected_config = server.merge_adapters(pairs, params)
    got, config = ours(option, pairs, params)
    assert_maps_same_bits(got, expected)
    assert config == expected_config
    if option == 1:  # the enums by name, in a mapping
        assert_maps_same_bits(A.merge_module_maps(pairs, by_name(params))[0], expected)


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("strategy", ["LINEAR", "TIES"])
def test_a_request_without_weights_weighs_every_adapter_one(strategy, option):
    pairs = adapter_pairs("overlapping", DTYPES["bfloat16"])
    params = request(3, strategy, 0.5, weights=())
    assert params.weights == []
    assert_maps_same_bits(ours(option, pairs, params)[0], server.merge_adapters(pairs, params)[0])


@pytest.mark.parametrize("option", [1, 2])
def test_nan_and_inf_reach_the_merge_as_in_the_server(option):
    pairs = adapter_pairs("overlapping", DTYPES["bfloat16"])
    for i, (module_map_, _) in enumerate(pairs):
        for entries in module_map_.values():
            a = entries["lora_A"][0]
            a[0, i] = float("nan")
            a[1, i] = float("inf")
            a[2, 3 * i] = -float("inf")
    for strategy, method, density in NO_MASK_CASES:
        params = request(3, strategy, density, method)
        expected = server.merge_adapters(pairs, params)[0]
        assert_maps_same_bits(ours(option, pairs, params)[0], expected)
        nan = expected["model.layers.0.self_attn.q_proj"]["lora_A"][0][0, :2]
        assert bool(torch.isnan(nan).all())


def test_an_empty_module_map_merges_to_an_empty_map():
    pairs = [({}, LoraConfig(RANK, ["q_proj"])), ({}, LoraConfig(RANK, ["v_proj"]))]
    params = request(2, "TIES", 0.5)
    expected, expected_config = server.merge_adapters(pairs, params)
    got, config = A.merge_module_maps(pairs, params)
    assert dict(got) == dict(expected) == {}
    assert config == expected_config
    assert config.target_modules == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------- DARE
@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("dtypes", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("adapter_set", list(ADAPTER_SETS))
@pytest.mark.parametrize("strategy", ["DARE_LINEAR", "DARE_TIES"])
def test_dare_is_the_server_with_its_rescale_applied(strategy, adapter_set, dtypes, option):
    # Given the same masks, our DARE is the server's code with the quotient it discards kept.
    pairs = adapter_pairs(adapter_set, DTYPES[dtypes])
    params = request(len(pairs), strategy, 0.3, "FREQUENCY")
    masks = dare_masks(option, pairs, params.density)
    rescaled = server.server_registry(apply_rescale=True)
    with bernoulli_returns([m for name in masks for m in masks[name]]):
        expected = server.merge_adapters(pairs, params, rescaled)[0]
    negative_zero = sum_negative_zeros(pairs, params, masks) if strategy == "DARE_LINEAR" else None
    assert_maps_same_bits(ours(option, pairs, params)[0], expected, negative_zero)


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("density", [0.0, 1.0, 1.5])
@pytest.mark.parametrize("strategy", ["DARE_LINEAR", "DARE_TIES"])
def test_dare_at_density_0_and_from_1_up_is_the_server_without_masks(strategy, density, option):
    # No mask is drawn: density >= 1 prunes nothing, density 0 drops every entry (x * 0).
    pairs = adapter_pairs("overlapping", DTYPES["bfloat16"])
    params = request(3, strategy, density)
    expected = server.merge_adapters(pairs, params)[0]
    negative_zero = None
    if strategy == "DARE_LINEAR":
        order = server.merge_order(pairs)
        kept = {name: [torch.full(t.shape, density >= 1) for t in ts] for name, ts in order}
        negative_zero = sum_negative_zeros(pairs, params, kept)
    assert_maps_same_bits(ours(option, pairs, params)[0], expected, negative_zero)


# ------------------------------------------------------------------- request parameters, helpers
@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("density", [-1.0, float("nan"), 0.0])
def test_linear_ignores_the_density_as_the_server_does(density, option):
    pairs = adapter_pairs("overlapping", DTYPES["mixed"])
    params = request(3, "LINEAR", density)
    expected = server.merge_adapters(pairs, params)[0]
    assert_maps_same_bits(ours(option, pairs, params)[0], expected)


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("strategy", ["TIES", "DARE_LINEAR", "DARE_TIES"])
def test_a_negative_density_is_refused_where_the_strategy_prunes(strategy, option):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    params = request(3, strategy, -0.5)
    with pytest.raises(ValueError, match="(?i)density"):
        server.merge_adapters(pairs, params)
    with pytest.raises(ValueError, match="density.*-0.5"):
        ours(option, pairs, params)


@pytest.mark.parametrize("density", [None, "abc", "0.5"])
def test_linear_reads_no_density_from_a_mapping_request(density):
    # A mapping request holds whatever the caller put there; linear reads none of it.
    pairs = adapter_pairs("overlapping", DTYPES["mixed"])
    expected = server.merge_adapters(pairs, request(3, "LINEAR"))[0]
    params = {**by_name(request(3, "LINEAR")), "density": density}
    assert_maps_same_bits(A.merge_module_maps(pairs, params)[0], expected)


@pytest.mark.parametrize("strategy", ["TIES", "DARE_LINEAR", "DARE_TIES"])
@pytest.mark.parametrize("density", [None, "abc", "0.5", True])
def test_a_density_that_is_not_a_number_is_refused_by_name_where_the_strategy_prunes(
    strategy, density
):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    params = {**by_name(request(3, strategy)), "density": density}
    with pytest.raises(TypeError, match="density must be a real number"):
        A.merge_module_maps(pairs, params, seed=0)


@pytest.mark.parametrize("weight", ["0.5", None, True])
def test_a_request_weight_that_is_not_a_number_is_refused_by_name(weight):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    params = {**by_name(request(3, "LINEAR")), "weights": [1.0, weight, 0.5]}
    with pytest.raises(TypeError, match=r"weights\[1\] must be a real number"):
        A.merge_module_maps(pairs, params)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_the_helpers_take_mixed_dtype_tasks_as_the_server_passes_them(method):
    # The server prunes each task in its own dtype and stacks them (torch.stack promotes).
    tasks = [tie_free((24, 16), d, seed=i) for i, d in enumerate(DTYPES["mixed"])]
    weights = torch.tensor(WEIGHTS).reshape(3, 1, 1)
    ours_stacked = torch.stack([utils.prune(t, 0.5, "magnitude") for t in tasks])
    their_stacked = torch.stack([upstream.prune(t, 0.5, "magnitude") for t in tasks])
    assert_same_bits(ours_stacked, their_stacked)
    mask = utils.calculate_majority_sign_mask(ours_stacked, method)
    assert torch.equal(mask, upstream.majority_sign_mask(their_stacked, method))
    assert_same_bits(
        utils.disjoint_merge(ours_stacked * weights, mask),
        upstream.disjoint_merge(their_stacked * weights, mask),
    )


def test_a_llama_3_8b_adapter_is_merged_in_seven_batched_calls(monkeypatch):
    # rank 16 on the seven projections of 32 layers: 448 tensors, 64 a call (meta tensors:
    # shapes and dtypes only, no memory)
    features = {  # in, out
        "q_proj": (4096, 4096),
        "k_proj": (4096, 1024),
        "v_proj": (4096, 1024),
        "o_proj": (4096, 4096),
        "gate_proj": (4096, 14336),
        "up_proj": (4096, 14336),
        "down_proj": (14336, 4096),
    }
    module_map = {}
    for layer in range(32):
        for module, (inputs, outputs) in features.items():
            weight_name = f"model.layers.{layer}.{module}"
            module_map[weight_name] = {
                k: (torch.empty(shape, dtype=torch.bfloat16, device="meta"), f"{weight_name}.{k}")
                for k, shape in (("lora_A", (16, inputs)), ("lora_B", (outputs, 16)))
            }
    pairs = [(module_map, LoraConfig(16, list(features)))] * 3
    calls = []
    merge_many = A.merge_many

    def counted(groups, *args, **kwargs):
        calls.append(len(groups))
        return merge_many(groups, *args, **kwargs)

    monkeypatch.setattr(A, "merge_many", counted)
    merged, _ = A.merge_module_maps(pairs, request(3, "TIES", 0.5))
    assert calls == [64] * 7
    assert sum(len(by_k) for by_k in merged.values()) == 448
