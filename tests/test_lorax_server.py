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
from helpers import bernoulli_returns
from lorax_server_cases import (
    ADAPTER_SETS,
    DTYPES,
    RANK,
    adapter_pairs,
    assert_maps_same_bits,
    by_name,
    dare_masks,
    ours,
    request,
    sum_negative_zeros,
)
from lorax_server_model import LoraConfig

from lorax_merge import adapters as A

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
    if option == 2 and dtypes == "mixed":
        pytest.skip("the strategy classes take tasks of one dtype")
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
