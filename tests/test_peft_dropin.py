"""``lorax_merge.peft.add_weighted_adapter`` against PEFT's own ``add_weighted_adapter``.

PEFT 0.21 is the oracle, on a tiny model with Linear, Embedding, Conv2d (3x3 and 1x1) and a
``fan_in_fan_out`` Conv1D layer, whose LoRA factors are all random and non-zero (PEFT
initialises ``lora_B`` to zero, which would hide everything):

* factor-space types (``linear``, ``ties``, ``magnitude_prune``) and ``cat``: bit for bit;
* ``svd`` and the ``*_svd`` types with ``svd_driver="exact"``: ``B'A'`` within 1e-4 relative,
  for every ``svd_rank`` / ``svd_clamp`` variant; with the default driver: ``svd`` within 1e-4,
  the pruned types within 1% of PEFT's (optimal) Frobenius error, and the clamped variants
  within the bound that the free signs of singular vectors allow (see the README);
* DARE types: our masks (not ``torch.bernoulli``'s), equal to our merge of the dense deltas;
* the same config but for ``use_rslora`` (always False: the scalings are folded into the
  factors), the same refusals (as ``ValueError``), and a model left as it was.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer, LoraModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lorax_merge  # noqa: E402
import lorax_merge.peft as lm_peft  # noqa: E402
from lorax_merge import delta  # noqa: E402
from lorax_merge.adapters import derive_tensor_seed  # noqa: E402

TARGETS = ["emb", "q", "proj", "conv", "pw"]
WEIGHTS = [0.7, -0.4, 1.1]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.q = nn.Linear(24, 40)
        self.proj = Conv1D(32, 24)  # GPT-2 style: fan_in_fan_out
        self.conv = nn.Conv2d(3, 10, 3)
        self.pw = nn.Conv2d(10, 6, 1)


def build(
    ranks=(4, 4, 4), dtype=torch.float32, device="cpu", seed=3, targets=None,
    rslora=(False, False, True),
):  # fmt: skip
    torch.manual_seed(0)
    base = Tiny().to(dtype)
    alphas = (8, 16, 4)
    targets = targets or [TARGETS] * 3
    configs = [
        LoraConfig(r=r, lora_alpha=a, use_rslora=s, target_modules=t, fan_in_fan_out=True)
        for r, a, s, t in zip(ranks, alphas, rslora, targets)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, configs[0], adapter_name="a")
        for name, config in zip("bc", configs[1:]):
            model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(dtype))
    return model.to(device=device, dtype=dtype)  # PEFT keeps half-precision adapters in float32


def layers(model):
    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def factors(layer, name):
    return lm_peft._factors(layer, name)


def product(layer, name):
    a, b = factors(layer, name)
    return b.data.flatten(1).double() @ a.data.flatten(1).double()


def bits(t):
    return t.detach().cpu().view({4: torch.int32, 8: torch.int64}[t.element_size()])


def both(model, combination_type, peft_kwargs=None, ours_kwargs=None, adapters=("a", "b", "c")):
    """PEFT's result and ours, from two copies of ``model``."""
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    args = (list(adapters), WEIGHTS[: len(adapters)], "new", combination_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(*args, **(peft_kwargs or {}))
    lm_peft.add_weighted_adapter(ours, *args, **(ours_kwargs or peft_kwargs or {}))
    # PEFT keeps the first adapter's use_rslora; ours is always False (scaling 1).
    assert ours.peft_config["new"].use_rslora is False
    assert replace(theirs.peft_config["new"], use_rslora=False) == ours.peft_config["new"]
    return theirs, ours


@pytest.mark.parametrize(
    ("combination_type", "kwargs"),
    [
        ("linear", {}),
        ("cat", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.6}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_factor_space_types_and_cat_match_peft_bit_for_bit(combination_type, kwargs, dtype):
    ranks = (4, 6, 2) if combination_type == "cat" else (4, 4, 4)
    theirs, ours = both(build(ranks, dtype), combination_type, kwargs)
    for key, layer in layers(theirs).items():
        mine = layers(ours)[key]
        for x, y in zip(factors(layer, "new"), factors(mine, "new")):
            assert x.shape == y.shape and x.dtype == y.dtype, key
            assert torch.equal(bits(x), bits(y)), key


def test_one_adapter_is_linear_as_in_peft():
    theirs, ours = both(build(), "ties_svd", {"density": 0.5}, adapters=("b",))
    for key, layer in layers(theirs).items():
        for x, y in zip(factors(layer, "new"), factors(layers(ours)[key], "new")):
            assert torch.equal(bits(x), bits(y)), key


@pytest.mark.parametrize(("combination_type", "kwargs"), [("svd", {"svd_rank": 12}), ("cat", {})])
def test_an_rslora_first_adapter_gives_a_merge_scaled_by_one(combination_type, kwargs):
    """The scalings (rsLoRA's ``lora_alpha / sqrt(r)`` among them) are folded into the merged
    factors, so the merged adapter must apply its delta once: PEFT, which keeps the first
    adapter's ``use_rslora``, applies ``sqrt(r)`` times it."""
    # Modules of at least 24 x 24: rank 12 keeps the exact sum (PEFT fails above a conv's size).
    model = build((4, 6, 2), targets=[["emb", "q", "proj"]] * 3, rslora=(True, False, False))
    theirs, ours = both(model, combination_type, kwargs)
    assert theirs.peft_config["new"].use_rslora  # PEFT's, which ours deliberately is not
    for key, layer in layers(ours).items():
        assert layer.scaling["new"] == 1.0, key
        expected = sum(w * layer.scaling[n] * product(layer, n) for n, w in zip("abc", WEIGHTS))
        torch.testing.assert_close(product(layer, "new"), expected, rtol=1e-5, atol=1e-5)
    # What the model computes: the merged adapter adds the weighted sum of the adapters' effects.
    q = ours.base_model.model.q
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ sum(w * q.scaling[n] * product(q, n) for n, w in zip("abc", WEIGHTS)).mT
    ours.set_adapter("new")
    with torch.no_grad():
        merged_effect = (q(x) - q.base_layer(x)).double()
    torch.testing.assert_close(merged_effect, expected, rtol=1e-4, atol=1e-4)


SVD_VARIANTS = [
    {},
    {"svd_rank": 3},
    {"svd_rank": 5, "svd_clamp": 0.9},
    {"svd_clamp": 0.95},
    {"svd_full_matrices": False},
]


@pytest.mark.parametrize("variant", SVD_VARIANTS, ids=str)
@pytest.mark.parametrize(
    ("combination_type", "density"),
    [("svd", None), ("ties_svd", 0.5), ("magnitude_prune_svd", 0.4)],
)
def test_svd_types_match_peft_with_the_exact_driver(combination_type, density, variant):
    kwargs = dict(variant, density=density)
    theirs, ours = both(
        build((4, 6, 2)), combination_type, kwargs, dict(kwargs, svd_driver="exact")
    )
    for key, layer in layers(theirs).items():
        expected, got = product(layer, "new"), product(layers(ours)[key], "new")
        assert float((got - expected).norm() / expected.norm()) < 1e-4, key


@pytest.mark.parametrize("svd_rank", [None, 3, 5])
def test_svd_with_the_default_driver_is_exact(svd_rank):
    theirs, ours = both(build((4, 6, 2)), "svd", {"svd_rank": svd_rank})
    for key, layer in layers(theirs).items():
        expected, got = product(layer, "new"), product(layers(ours)[key], "new")
        assert float((got - expected).norm() / expected.norm()) < 1e-4, key


def _merged_deltas(model, combination_type, density, seed=0):
    """Our dense merged delta of every module (what the SVD types re-factor)."""
    out = {}
    for key, layer in layers(model).items():
        found = [(factors(layer, n), layer.scaling[n]) for n in "abc"]
        out[key] = delta.merged_delta(
            [a.data.flatten(1) for (a, _), _ in found],
            [b.data.flatten(1) for (_, b), _ in found],
            [s for _, s in found],
            WEIGHTS,
            combination_type,
            density=density,
            seed=derive_tensor_seed(seed, key),
        ).double()
    return out


@pytest.mark.parametrize("combination_type", ["ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("svd_rank", [None, 3])
def test_pruned_types_with_the_default_driver_stay_within_one_percent(combination_type, svd_rank):
    model = build((4, 6, 2))
    theirs, ours = both(model, combination_type, {"density": 0.5, "svd_rank": svd_rank})
    merged = _merged_deltas(model, combination_type, 0.5)
    for key, layer in layers(theirs).items():
        peft_error = (merged[key] - product(layer, "new")).norm()
        our_error = (merged[key] - product(layers(ours)[key], "new")).norm()
        assert float(our_error) <= 1.01 * float(peft_error) + 1e-6, key


@pytest.mark.parametrize("combination_type", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_svd_types_refactor_our_merge_of_the_dense_deltas(combination_type):
    model = build((4, 6, 2))
    ours = copy.deepcopy(model)
    kwargs = dict(density=0.5, seed=11, svd_rank=50, svd_driver="exact")  # full rank: no loss
    lm_peft.add_weighted_adapter(ours, ["a", "b", "c"], WEIGHTS, "new", combination_type, **kwargs)
    merged = _merged_deltas(model, combination_type, 0.5, seed=11)
    for key, layer in layers(ours).items():
        torch.testing.assert_close(product(layer, "new"), merged[key], rtol=1e-5, atol=1e-5)
    again = copy.deepcopy(model)
    lm_peft.add_weighted_adapter(again, ["a", "b", "c"], WEIGHTS, "new", combination_type, **kwargs)
    other = copy.deepcopy(model)
    lm_peft.add_weighted_adapter(other, ["a", "b", "c"], WEIGHTS, "new", combination_type,
                                 **dict(kwargs, seed=12))  # fmt: skip
    key = "q"
    assert torch.equal(product(layers(ours)[key], "new"), product(layers(again)[key], "new"))
    assert not torch.equal(product(layers(ours)[key], "new"), product(layers(other)[key], "new"))


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties"])
def test_factor_space_dare_uses_our_seeded_masks(combination_type):
    model = build()
    ours = copy.deepcopy(model)
    lm_peft.add_weighted_adapter(ours, ["a", "b", "c"], WEIGHTS, "new", combination_type,
                                 density=0.5, seed=9)  # fmt: skip
    for key, layer in layers(model).items():
        found = [(factors(layer, n), layer.scaling[n]) for n in "abc"]
        roots = [math.sqrt(abs(w * s)) for w, (_, s) in zip(WEIGHTS, found)]
        signs = [1.0 if w * s >= 0 else -1.0 for w, (_, s) in zip(WEIGHTS, found)]
        for side, side_weights in (("A", [r * g for r, g in zip(roots, signs)]), ("B", roots)):
            tensors = [f[0 if side == "A" else 1].data for f, _ in found]
            seed = derive_tensor_seed(9, f"{key}.lora_{side}")
            expected = lorax_merge.merge(tensors, torch.tensor(side_weights), combination_type,
                                         density=0.5, seed=seed)  # fmt: skip
            if combination_type == "dare_linear":
                expected = expected + 0.0
            got = factors(layers(ours)[key], "new")[0 if side == "A" else 1]
            assert torch.equal(bits(got), bits(expected)), (key, side)


def _unchanged(model, before):
    assert sorted(model.peft_config) == before
    for layer in layers(model).values():
        assert "new" not in layer.lora_A and "new" not in layer.lora_embedding_A


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((["a", "b"], [1.0, 1.0], "new", "svd_ties"), {}, "Invalid combination_type"),
        ((["a", "b"], [1.0, 1.0], "new", "ties"), {}, "density is required"),
        ((["a", "b"], [1.0, 1.0], "new", "dare_ties_svd"), {}, "density is required"),
        ((["a", "x"], [1.0, 1.0], "new", "svd"), {}, "Adapter x does not exist"),
        ((["a", "b"], [1.0, 1.0], "new", "svd"), {"svd_rank": 0}, "svd_rank"),
        ((["a", "b"], [1.0, 1.0], "new", "svd"), {"svd_rank": -2}, "svd_rank"),
        ((["a", "b"], [1.0], "new", "svd"), {}, "weights"),
        ((["a", "b"], [1.0, 1.0], "new", "svd"), {"svd_driver": "gesvdj"}, "needs CUDA"),
        ((["a", "b"], [1.0, 1.0], "new", "svd"), {"svd_clamp": 2.0}, "svd_clamp"),
        ((["a", "b"], [1.0, 1.0], "new", "ties"), {"density": -0.5}, "density"),
        ((["a", "b"], [1.0, 1.0], "new", "ties"), {"density": 0.5, "majority_sign_method": "x"},
         "majority_sign_method"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_the_model_changes(args, kwargs, match):
    model = build()
    before = sorted(model.peft_config)
    with pytest.raises(ValueError, match=match):
        lm_peft.add_weighted_adapter(model, *args, **kwargs)
    _unchanged(model, before)


def test_ranks_that_differ_are_refused_for_factor_space_types_as_in_peft():
    model = build((4, 6, 2))
    with pytest.raises(ValueError, match="same r value"):
        lm_peft.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "new", "linear")
    with pytest.raises(ValueError, match="same r value"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", "linear")


def test_a_module_no_chosen_adapter_has_is_refused_and_rolled_back():
    # The merged config is a copy of the first adapter's with the union of the targets, so
    # the new adapter lands on "pw", which "c" targets but excludes: no chosen adapter is there.
    model = build(targets=[["q"], ["q", "emb"], ["emb", "pw"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(
            "d", LoraConfig(r=4, target_modules=["emb", "pw"], exclude_modules=["pw"])
        )
    before = sorted(model.peft_config)
    active = model.active_adapter
    with pytest.raises(ValueError, match="'pw': none of the adapters"):
        lm_peft.add_weighted_adapter(model, ["b", "d"], [1.0, 1.0], "new", "svd")
    assert model.active_adapter == active
    _unchanged(model, before)


def test_existing_name_is_left_alone_as_in_peft():
    model = build()
    lm_peft.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "new", "svd")
    first = product(layers(model)["q"], "new").clone()
    lm_peft.add_weighted_adapter(model, ["a", "c"], [1.0, 3.0], "new", "cat")
    assert torch.equal(product(layers(model)["q"], "new"), first)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_factors_propagate_and_are_never_hidden(bad):
    model = build()
    with torch.no_grad():
        layers(model)["q"].lora_B["b"].weight[2, 1] = bad
    for combination_type, kwargs in (("svd", {}), ("ties_svd", {"density": 0.5}),
                                     ("linear", {}), ("cat", {})):  # fmt: skip
        work = copy.deepcopy(model)
        lm_peft.add_weighted_adapter(work, ["a", "b", "c"], WEIGHTS, "new", combination_type,
                                     **kwargs)  # fmt: skip
        assert not bool(torch.isfinite(product(layers(work)["q"], "new")).all()), combination_type
        assert bool(torch.isfinite(product(layers(work)["emb"], "new")).all())


def test_patch_makes_the_peft_method_ours():
    model = build()
    expected = copy.deepcopy(model)
    lm_peft.add_weighted_adapter(expected, ["a", "b"], [1.0, 0.5], "new", "dare_ties_svd",
                                 density=0.5, seed=4)  # fmt: skip
    original = LoraModel.add_weighted_adapter
    lorax_merge.peft.patch()
    try:
        model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "new", "dare_ties_svd", density=0.5,
                                   seed=4)  # fmt: skip
    finally:
        lorax_merge.peft.unpatch()
    assert LoraModel.add_weighted_adapter is original
    for key, layer in layers(model).items():
        assert torch.equal(product(layer, "new"), product(layers(expected)[key], "new"))


def test_patch_and_the_function_work_on_a_transformers_model():
    """On a PeftModel over a transformers model, whose LoraModel passes unknown attributes on
    to a model with a `base_model` of its own: the patched method, the PeftModel and the
    LoraModel give the same merged adapter."""
    from adapter_tools import examples

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(examples().build_base_model(), config, adapter_name="a")
        model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for layer in layers(model).values():
        for name in "ab":
            nn.init.normal_(layer.lora_B[name].weight)
    args = (["a", "b"], [1.0, 0.5], "new", "ties_svd")
    kwargs = {"density": 0.5, "seed": 7}
    via_peft_model, via_lora_model = copy.deepcopy(model), copy.deepcopy(model)
    lm_peft.add_weighted_adapter(via_peft_model, *args, **kwargs)
    lm_peft.add_weighted_adapter(via_lora_model.base_model, *args, **kwargs)
    lorax_merge.peft.patch()
    try:
        model.add_weighted_adapter(*args, **kwargs)
    finally:
        lorax_merge.peft.unpatch()
    merged = layers(model)
    assert {key.rsplit(".", 1)[-1] for key in merged} == {"q_proj", "v_proj"}
    for other in (via_peft_model, via_lora_model):
        assert layers(other).keys() == merged.keys()
        for key, layer in layers(other).items():
            assert torch.equal(bits(product(layer, "new")), bits(product(merged[key], "new")))
    assert all(torch.count_nonzero(product(layer, "new")) > 0 for layer in merged.values())


def test_a_rank_above_a_module_size_is_zero_padded_where_peft_fails():
    """The 1x1 conv is 6 x 10: rank 9 keeps its 6 singular triplets and pads the rest."""
    model = build((4, 6, 2))
    with pytest.raises(RuntimeError, match="invalid for input"):
        copy.deepcopy(model).add_weighted_adapter(["a", "b", "c"], WEIGHTS, "new", "svd",
                                                  svd_rank=9)  # fmt: skip
    lm_peft.add_weighted_adapter(model, ["a", "b", "c"], WEIGHTS, "new", "svd", svd_rank=9)
    a, b = factors(layers(model)["pw"], "new")
    assert a.shape == (9, 10, 1, 1) and b.shape == (6, 9, 1, 1)
    assert not bool(a[6:].any()) and not bool(b[:, 6:].any())
    found = [(factors(layers(model)["pw"], n), layers(model)["pw"].scaling[n]) for n in "abc"]
    exact = sum(w * s * (y.flatten(1).double() @ x.flatten(1).double())
                for w, ((x, y), s) in zip(WEIGHTS, found))  # fmt: skip
    torch.testing.assert_close(product(layers(model)["pw"], "new"), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("combination_type", ["svd", "ties_svd", "linear"])
def test_half_precision_adapters_keep_their_dtype(dtype, combination_type):
    """Deltas are formed and merged in float32 from the half-precision factors, and the result
    comes back in their dtype (PEFT's SVD types hand back float32): it is the float32 merge of
    the same values, rounded once."""
    kwargs = {"density": 0.5}
    ranks = (4, 4, 4) if combination_type == "linear" else (4, 6, 2)
    half = build(ranks, dtype)
    exact = copy.deepcopy(half).to(torch.float32)  # the same values, in float32
    for model in (half, exact):
        lm_peft.add_weighted_adapter(model, ["a", "b", "c"], WEIGHTS, "new", combination_type,
                                     **kwargs)  # fmt: skip
    for key, layer in layers(exact).items():
        a, b = factors(layers(half)[key], "new")
        assert a.dtype == dtype and b.dtype == dtype
        expected, got = product(layer, "new"), product(layers(half)[key], "new")
        assert float((got - expected).norm() / expected.norm()) < 1e-2, key


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd"])
def test_adapters_of_mixed_dtypes_give_the_promoted_dtype_as_in_peft(combination_type):
    """PEFT's SVD of the summed deltas has the adapters' dtypes promoted, whatever their order."""
    model = build((4, 6, 2))
    with torch.no_grad():
        for layer in layers(model).values():
            for p in factors(layer, "a"):
                p.data = p.data.to(torch.bfloat16)
    for adapters in (("a", "b", "c"), ("b", "c", "a")):
        theirs, ours = both(model, combination_type, {"density": 0.5}, adapters=adapters)
        for key, layer in layers(theirs).items():
            for x, y in zip(factors(layer, "new"), factors(layers(ours)[key], "new")):
                assert x.dtype == y.dtype == torch.float32, (adapters, key)


def test_a_numpy_integer_svd_rank_is_accepted_as_in_peft():
    np = pytest.importorskip("numpy")
    theirs, ours = both(build((4, 6, 2)), "svd", {"svd_rank": np.int64(5)})
    assert ours.peft_config["new"].r == 5
    for key, layer in layers(theirs).items():
        expected, got = product(layer, "new"), product(layers(ours)[key], "new")
        assert factors(layers(ours)[key], "new")[0].shape[0] == 5
        assert float((got - expected).norm() / expected.norm()) < 1e-4, key
    for bad in (np.int64(0), True, 5.0):
        with pytest.raises(ValueError, match="svd_rank"):
            lm_peft.add_weighted_adapter(build(), ["a", "b"], [1.0, 1.0], "x", "svd", svd_rank=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("combination_type", ["svd", "ties_svd", "dare_ties_svd", "cat", "ties"])
def test_cuda_models_merge_like_cpu_models(combination_type):
    kwargs = {"density": 0.5, "seed": 3}
    ranks = (4, 4, 4) if combination_type == "ties" else (4, 6, 2)
    cpu, gpu = build(ranks), build(ranks, device="cuda")
    for model in (cpu, gpu):
        lm_peft.add_weighted_adapter(model, ["a", "b", "c"], WEIGHTS, "new", combination_type,
                                     svd_driver="exact", **kwargs)  # fmt: skip
    for key, layer in layers(cpu).items():
        expected, got = product(layer, "new"), product(layers(gpu)[key], "new").cpu()
        assert float((got - expected).norm() / expected.norm()) < 1e-4, key


@pytest.mark.parametrize("combination_type", ["linear", "dare_linear", "magnitude_prune"])
def test_factor_results_keep_the_canonical_nan_and_turn_negative_zero_positive(combination_type):
    """As PEFT's sum from +0, an all-(-0) entry becomes +0; a NaN keeps its one pattern."""
    a = [torch.full((4, 6), -0.0, dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.full((6, 4), -0.0, dtype=torch.bfloat16) for _ in range(2)]
    a[0][0, 0] = math.nan
    found = [(a[i], b[i], 1.0) for i in range(2)]
    new_a, new_b = lm_peft._merge_factor_space(
        combination_type, found, [1.0, 0.5], 1.0, "total", 3, "layer"
    )
    bits = new_a.view(torch.int16).reshape(-1).tolist()
    assert bits[0] == 0x7FFF
    assert set(bits[1:]) == {0} and set(new_b.view(torch.int16).reshape(-1).tolist()) == {0}
