"""Where the drop-ins for the LoRAX server differ from it: each difference that
``docs/lorax-server.md`` lists, asserted as exactly that difference.
"""

from __future__ import annotations

import functools

import lorax_server_model as server
import pytest
import torch
import upstream
from helpers import bernoulli_returns, tie_free, tie_heavy
from lorax_server_cases import (
    DTYPES,
    LAYERS,
    OUT_FEATURES,
    RANK,
    SEED,
    WEIGHTS,
    adapter_pairs,
    assert_maps_same_bits,
    assert_same_bits,
    dare_masks,
    group_weights,
    ours,
    param_name,
    request,
    sum_negative_zeros,
)
from lorax_server_model import LoraConfig

import lorax_merge
from lorax_merge import adapters as A
from lorax_merge import utils
from lorax_merge.strategies import strategy_registry


@pytest.mark.parametrize("strategy", ["DARE_LINEAR", "DARE_TIES"])
def test_the_server_drops_the_dare_rescale(strategy):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    params = request(3, strategy, 0.5)  # a power of two: the rescale is exact
    masks = dare_masks(1, pairs, params.density)
    with bernoulli_returns([m for name in masks for m in masks[name]]):
        expected = server.merge_adapters(pairs, params)[0]
    got = ours(1, pairs, params)[0]
    for weight_name, by_k in expected.items():
        for k, (tensor, _) in by_k.items():
            mine = got[weight_name][k][0]
            assert torch.equal(mine * params.density, tensor)  # values: -0 == +0
            assert not torch.equal(mine, tensor)


@pytest.mark.parametrize("strategy", ["DARE_LINEAR", "DARE_TIES"])
def test_dare_of_mixed_dtypes_rounds_the_rescale_in_their_common_dtype(strategy):
    # The server, had it kept its quotient, would round x / density to each adapter's dtype;
    # here each tensor is merged in the common dtype of the adapters that have it, and so is
    # the quotient.
    pairs = adapter_pairs("overlapping", DTYPES["mixed"])
    common = {
        name: functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        for name, tensors in server.merge_order(pairs)
    }
    converted = [
        (
            {w: {k: (t.to(common[n]), n) for k, (t, n) in by_k.items()} for w, by_k in m.items()},
            config,
        )
        for m, config in pairs
    ]
    params = request(3, strategy, 0.3)
    masks = [m for masks in dare_masks(1, pairs, params.density).values() for m in masks]
    rescaled = server.server_registry(apply_rescale=True)
    with bernoulli_returns(masks):
        in_common_dtype = server.merge_adapters(converted, params, rescaled)[0]
    with bernoulli_returns(masks):
        in_own_dtypes = server.merge_adapters(pairs, params, rescaled)[0]
    got = ours(1, pairs, params)[0]
    zeros = sum_negative_zeros(pairs, params, dare_masks(1, pairs, params.density))
    assert_maps_same_bits(got, in_common_dtype, zeros if strategy == "DARE_LINEAR" else None)
    name = "model.layers.0.self_attn.q_proj"  # in the float32 and the bfloat16 adapter
    assert not torch.equal(got[name]["lora_A"][0], in_own_dtypes[name]["lora_A"][0])


@pytest.mark.parametrize("strategy", ["DARE_LINEAR", "DARE_TIES"])
def test_dare_masks_are_seeded_where_the_server_draws_new_ones(strategy):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    params = request(3, strategy, 0.5)
    first, second = (server.merge_adapters(pairs, params)[0] for _ in range(2))
    one, two = (A.merge_module_maps(pairs, params, seed=SEED)[0] for _ in range(2))
    torch.manual_seed(5)
    drawn = A.merge_module_maps(pairs, params)[0]
    torch.manual_seed(5)
    redrawn = A.merge_module_maps(pairs, params)[0]
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(first[name]["lora_B"][0], second[name]["lora_B"][0])
    assert_maps_same_bits(one, two)
    assert_maps_same_bits(drawn, redrawn)
    assert not torch.equal(one[name]["lora_B"][0], drawn[name]["lora_B"][0])


def tied_magnitudes(shape, dtype, seed):
    """Nonzero entries of a few magnitudes: many ties at any pruning threshold."""
    x = tie_heavy(shape, dtype, seed)
    return torch.where(x == 0, torch.ones_like(x), x)


def test_magnitude_ties_at_the_threshold_keep_the_lower_flat_index():
    x = tied_magnitudes((16, 12), torch.bfloat16, seed=3)
    density = 0.3
    k = int(density * x.numel())
    mine, theirs = utils.prune(x, density, "magnitude"), upstream.prune(x, density, "magnitude")
    magnitude = x.abs().reshape(-1)
    threshold = magnitude.sort(descending=True).values[k - 1]
    at_threshold = torch.nonzero(magnitude == threshold).reshape(-1)
    above = magnitude > threshold
    for pruned in (mine, theirs):
        kept = (pruned != 0).reshape(-1)
        assert int(kept.sum()) == k  # both keep k entries: the larger ones and some ties
        assert bool(kept[above].all()) and torch.equal(pruned[pruned != 0], x[pruned != 0])
    mine_kept = torch.nonzero((mine != 0).reshape(-1) & (magnitude == threshold)).reshape(-1)
    assert torch.equal(mine_kept, at_threshold[: k - int(above.sum())])


@pytest.mark.parametrize("method", ["TOTAL", "FREQUENCY"])
def test_ties_differs_from_the_server_only_in_which_tied_entries_it_keeps(method, monkeypatch):
    pairs = adapter_pairs("overlapping", DTYPES["bfloat16"], make=tied_magnitudes)
    params = request(3, "TIES", 0.4, method)
    got = A.merge_module_maps(pairs, params)[0]
    # the server's code, with its torch.topk selection replaced by our tie-break
    monkeypatch.setattr(upstream, "prune_by_magnitude", lambda t, d: utils.prune(t, d, "magnitude"))
    assert_maps_same_bits(got, server.merge_adapters(pairs, params)[0])


def test_a_nan_votes_in_our_frequency_election_and_not_in_the_servers():
    stacked = torch.stack([tie_free((16, 8), torch.float32, seed=i) for i in range(3)])
    stacked[:, 2, 3] = torch.tensor([float("nan"), 0.5, 0.25])
    mine = utils.calculate_majority_sign_mask(stacked, "frequency")
    theirs = upstream.majority_sign_mask(stacked, "frequency")
    # the server's sign(NaN) is 0: the two positive tasks elect +1; here the vote is NaN: -1
    assert theirs[:, 2, 3].tolist() == [False, True, True]
    assert mine[:, 2, 3].tolist() == [False, False, False]
    mine[:, 2, 3] = theirs[:, 2, 3]
    assert torch.equal(mine, theirs)
    assert torch.equal(
        utils.calculate_majority_sign_mask(stacked), upstream.majority_sign_mask(stacked)
    )
    # the merged value there is NaN either way
    weights = torch.tensor(WEIGHTS)
    got = strategy_registry["ties"](density=1.0, majority_sign_method="frequency")
    expected = server.server_registry()["ties"](density=1.0, majority_sign_method="frequency")
    tasks = list(stacked.unbind(0))
    assert_same_bits(got.merge(tasks, weights), expected.merge(tasks, weights))


# weights whose dtype does not widen bfloat16 tasks: their own dtype, or an integer dtype
NARROW_WEIGHTS = {
    "bfloat16": torch.tensor(WEIGHTS, dtype=torch.bfloat16),
    "int64": torch.tensor([1, -2, 3]),
}


@pytest.mark.parametrize("weights", list(NARROW_WEIGHTS))
def test_narrow_weights_accumulate_in_float32_where_the_server_rounds_each_step(weights):
    tasks = [tie_free((32, 40), torch.bfloat16, seed=i) for i in range(3)]
    weights = NARROW_WEIGHTS[weights]
    got = strategy_registry["linear"]().merge(tasks, weights)
    theirs = server.server_registry()["linear"]().merge(tasks, weights)
    exact = -torch.zeros(tasks[0].shape)
    for t, w in zip(tasks, weights.float()):
        exact = exact + t.float() * w
    assert got.dtype == theirs.dtype == torch.bfloat16
    assert_same_bits(got, exact.to(torch.bfloat16))  # one rounding, at the end
    assert not torch.equal(got, theirs)  # the server rounds every product and partial sum


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
@pytest.mark.parametrize("weights", list(NARROW_WEIGHTS))
def test_ties_with_narrow_weights_keeps_the_tasks_dtype_where_the_server_gives_float32(
    weights, strategy
):
    tasks = [tie_free((32, 40), torch.bfloat16, seed=i) for i in range(3)]
    weights = NARROW_WEIGHTS[weights]
    got = strategy_registry[strategy](density=0.5, seed=SEED).merge(tasks, weights)
    theirs = server.server_registry()[strategy](density=0.5).merge(tasks, weights)
    assert got.dtype == torch.bfloat16 and theirs.dtype == torch.float32
    wide = lorax_merge.merge(
        tasks, weights, strategy, density=0.5, seed=SEED, out_dtype=torch.float32
    )
    assert_same_bits(got, wide.to(torch.bfloat16))


@pytest.mark.parametrize("option", [1, 2])
def test_a_sum_of_negative_zeros_is_negative_zero_here_and_positive_zero_in_the_server(option):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    for module_map_, _ in pairs:
        for entries in module_map_.values():
            b = entries["lora_B"][0]
            b[:4] = -0.0
            b[4:8] = 0.0
    params = request(3, "LINEAR")
    negative_zero = sum_negative_zeros(pairs, params)
    assert sum(int(m.sum()) for m in negative_zero.values()) > 0
    expected = server.merge_adapters(pairs, params)[0]
    assert_maps_same_bits(ours(option, pairs, params)[0], expected, negative_zero)


@pytest.mark.parametrize("count", [2, 4, 5, 9])
def test_adapters_are_summed_one_after_the_other(count):
    # torch's CPU sum(dim=0) does the same for up to four adapters; with more, some elements
    # (those past the last full vector) are summed in another order: rounding differences.
    tasks = [tie_free((33, 17), torch.float32, seed=i) * 10.0 ** (i % 3) for i in range(count)]
    weights = torch.tensor([(-1.0) ** i * (0.5 + i / 8) for i in range(count)])
    got = strategy_registry["linear"]().merge(tasks, weights)
    theirs = server.server_registry()["linear"]().merge(tasks, weights)
    in_order = -torch.zeros(tasks[0].shape)
    for t, w in zip(tasks, weights):
        in_order = in_order + t * w
    assert_same_bits(got, in_order)
    if count <= 4:
        assert_same_bits(got, theirs)
    else:
        bound = (
            count
            * torch.finfo(torch.float32).eps
            * sum((t * w).abs() for t, w in zip(tasks, weights))
        )
        assert bool(((got - theirs).abs() <= bound).all())


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
def test_with_five_adapters_the_order_of_the_sum_can_elect_the_other_sign(strategy):
    # One element: past any full vector.  In order, 1e8 - 1 rounds to 1e8 and the total is 0:
    # +1 is elected; torch's sum(dim=0) comes out negative: -1 is elected.
    tasks = [torch.full((1,), v) for v in (1e8, -1.0, 0.5, 0.25, -1e8)]
    weights = torch.ones(5)
    got = strategy_registry[strategy](density=1.0, seed=SEED).merge(tasks, weights)
    theirs = server.server_registry()[strategy](density=1.0).merge(tasks, weights)
    assert got.item() == 33333334.0  # (1e8 + 0.5 + 0.25) / 3
    assert theirs.item() == -50000000.0  # (-1 - 1e8) / 2
    # the frequency election sums signs, exactly in any order
    got = strategy_registry[strategy](density=1.0, majority_sign_method="frequency", seed=SEED)
    expected = server.server_registry()[strategy](density=1.0, majority_sign_method="frequency")
    assert_same_bits(got.merge(tasks, weights), expected.merge(tasks, weights))


def canonical_nan_bits(t: torch.Tensor) -> torch.Tensor:
    """Whether each entry holds float32's canonical NaN, 0x7FFFFFFF."""
    return t.view(torch.int32) == 0x7FFFFFFF


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("strategy", ["LINEAR", "TIES"])
def test_a_nan_is_the_canonical_nan_here_and_the_device_s_nan_in_the_server(strategy, option):
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    payload = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)
    for i, (module_map_, _) in enumerate(pairs):
        for entries in module_map_.values():
            a = entries["lora_A"][0]
            a[0, 0] = float("inf")  # weights of both signs: inf - inf
            a[1, 0] = payload if i == 0 else 1.0  # a NaN with a payload
    params = request(3, strategy, 1.0)
    expected = server.merge_adapters(pairs, params)[0]
    got = ours(option, pairs, params)[0]
    assert_maps_same_bits(got, expected)  # NaN where the server has NaN
    for weight_name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        mine, theirs = got[weight_name]["lora_A"][0], expected[weight_name]["lora_A"][0]
        nan = torch.isnan(theirs)
        assert nan[:2, 0].all() and int(nan.sum()) == 2
        assert bool(canonical_nan_bits(mine)[nan].all())
        assert not bool(canonical_nan_bits(theirs)[nan].any())


def test_strategies_built_once_with_a_seed_drop_the_same_entries_of_every_tensor_of_a_shape():
    # The server builds the strategy once per request: with seed=S every lora_A (all of one
    # shape) gets the same masks.  Built per tensor with derive_tensor_seed(S, param_name), each
    # gets its own, Option 1's.
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    params = request(3, "DARE_LINEAR", 0.5)
    q_proj = [f"model.layers.{layer}.self_attn.q_proj" for layer in range(LAYERS)]

    def dropped(merged, weight_name):  # by both adapters that have q_proj
        return merged[weight_name]["lora_A"][0] == 0

    built_once, option_1 = ours(2, pairs, params)[0], ours(1, pairs, params)[0]
    assert 0 < int(dropped(built_once, q_proj[0]).sum())
    assert torch.equal(dropped(built_once, q_proj[0]), dropped(built_once, q_proj[1]))
    assert not torch.equal(dropped(option_1, q_proj[0]), dropped(option_1, q_proj[1]))
    by_name = {name: t for by_k in option_1.values() for t, name in by_k.values()}
    for name, tensors in server.merge_order(pairs):
        per_tensor = strategy_registry["dare_linear"](
            density=0.5, seed=lorax_merge.derive_tensor_seed(SEED, name)
        )
        weights = torch.tensor(group_weights(pairs, name, params))
        assert_same_bits(per_tensor.merge(tensors, weights), by_name[name], name)


def test_bad_inputs_are_refused_naming_the_adapter_and_tensor_where_the_server_fails_in_torch():
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    name = "model.layers.1.self_attn.q_proj"
    wide = torch.ones(OUT_FEATURES["q_proj"] + 1, RANK)
    pairs[1][0][name]["lora_B"] = (wide, param_name(name, "lora_B"))
    params = request(3, "TIES", 0.5)
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        server.merge_adapters(pairs, params)
    # the request's adapter ids name the adapters
    shapes = r"shape \[40, 8\] in sql but \[41, 8\] in support"
    with pytest.raises(ValueError, match=rf"{param_name(name, 'lora_B')}.*{shapes}"):
        A.merge_module_maps(pairs, params)
    pairs[1][0][name]["lora_B"] = (wide[:-1].long(), param_name(name, "lora_B"))
    with pytest.raises(TypeError, match=r"support: tensor .*q_proj.lora_B.* has dtype int64"):
        A.merge_module_maps(pairs, params)
    # a request without ids: the adapters' positions
    unnamed = {"weights": WEIGHTS, "merge_strategy": "TIES", "density": 0.5}
    with pytest.raises(TypeError, match=r"adapter 1: tensor .*q_proj.lora_B.* has dtype int64"):
        A.merge_module_maps(pairs, unnamed)


def test_differing_ranks_are_refused_naming_every_adapter_by_its_id():
    pairs = adapter_pairs("overlapping", DTYPES["float32"])
    pairs[2] = (pairs[2][0], LoraConfig(16, ["v_proj", "up_proj"]))
    params = request(3, "LINEAR")
    with pytest.raises(ValueError, match=r"different ranks: \{8, 16\}"):
        server.merge_adapters(pairs, params)
    with pytest.raises(ValueError, match=r"sql \(r=8\), support \(r=8\), extract \(r=16\)"):
        A.merge_module_maps(pairs, params)


def test_regular_expression_target_modules_stay_expressions():
    # The server iterates over a string's characters; lorax_merge keeps the expressions.
    q_v, up = r".*\.(q_proj|v_proj)$", r".*\.up_proj$"
    pairs = [({}, LoraConfig(RANK, q_v)), ({}, LoraConfig(RANK, up))]
    params = request(2)
    assert server.merge_adapters(pairs, params)[1].target_modules == sorted(set(q_v + up))
    assert A.merge_module_maps(pairs, params)[1].target_modules == f"({q_v})|({up})"
    assert A.merge_module_maps(pairs[:1], request(1))[1].target_modules == q_v


def test_no_target_modules_count_as_none_where_the_server_fails():
    pairs = [({}, LoraConfig(RANK, None)), ({}, LoraConfig(RANK, ["v_proj", "q_proj"]))]
    with pytest.raises(TypeError):
        server.merge_adapters(pairs, request(2))
    assert A.merge_module_maps(pairs, request(2))[1].target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="no target modules"):
        A.merge_module_maps(pairs[:1], request(1))
