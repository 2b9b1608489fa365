"""Independent oracles: PEFT's ``peft.utils.merge_utils`` and the upstream server code.

Both prune with ``torch.topk`` and ``torch.bernoulli``.  ``topk`` does not
define which of equal magnitudes it keeps, so magnitude pruning is compared on
tie-free data; ``torch.bernoulli`` is replaced, for the duration of a call, by
a function that hands out the masks ``lorax_merge`` draws for the same seed, so
both sides prune the same entries.  PEFT applies the DARE rescale (as we do);
the server computes it and throws it away, which the last tests pin down.

The oracles compute in the result dtype (products and sums rounded there), we
accumulate in float32/float64 and round once, so results agree within the
rounding bound of the oracle's dtype; pruning, masks and elections are equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import upstream
from helpers import (
    ALL_DTYPES,
    ELECTING_STRATEGIES,
    RANDOM_STRATEGIES,
    STRATEGIES,
    bernoulli_returns,
    dare_masks,
    random_mask,
    tie_free,
    tie_heavy,
)
from reference import (
    ReferenceMerge,
    assert_matches,
    merge_tolerance,
    reference_merge_detailed,
)

import lorax_merge
from lorax_merge import utils


def _load_peft_merge_utils():
    """PEFT's merge_utils module, loaded on its own (importing ``peft`` pulls in transformers)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("PEFT is a test dependency: pip install peft")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("peft_merge_utils_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


peft_mu = _load_peft_merge_utils()

PEFT_MERGES = {
    "linear": lambda t, w, d, m: peft_mu.task_arithmetic(t, w),
    "magnitude_prune": lambda t, w, d, m: peft_mu.magnitude_prune(t, w, d),
    "ties": lambda t, w, d, m: peft_mu.ties(t, w, d, m),
    "dare_linear": lambda t, w, d, m: peft_mu.dare_linear(t, w, d),
    "dare_ties": lambda t, w, d, m: peft_mu.dare_ties(t, w, d, m),
}
SEED = 2024


def _oracle_tolerance(ref: ReferenceMerge) -> torch.Tensor:
    """Our rounding bound plus the oracle's: each product, partial sum and the
    mean are rounded in the result dtype (one eps per step, n + 2 steps)."""
    eps = torch.finfo(ref.out.dtype).eps
    oracle = (ref.n_terms + 2) * eps * ref.abs_sum.to(torch.float64) / ref.count.to(torch.float64)
    return merge_tolerance(ref) + oracle


def _weights_tensor(n: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.tensor([0.75, -1.5, 0.5, 2.0, -0.25, 1.0, 1.25][:n], dtype=dtype)
    return w


def _masks_for(strategy, tasks, density):
    if strategy in RANDOM_STRATEGIES and density < 1:
        return dare_masks(tasks, density, SEED)
    return []


STRATEGY_METHODS = [("linear", "total"), ("magnitude_prune", "total"), ("dare_linear", "total")] + [
    (s, m) for s in ("ties", "dare_ties") for m in ("total", "frequency")
]


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(
    "task_dtype,weights_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
    ids=lambda d: str(d).replace("torch.", ""),
)
@pytest.mark.parametrize("strategy,method", STRATEGY_METHODS)
def test_merge_agrees_with_peft(strategy, method, task_dtype, weights_dtype, density):
    tasks = [tie_free((24, 20), task_dtype, seed=100 + i) for i in range(3)]
    weights = _weights_tensor(3, weights_dtype)
    masks = _masks_for(strategy, tasks, density)
    with bernoulli_returns(masks):
        expected = PEFT_MERGES[strategy](tasks, weights, density, method)
    got = lorax_merge.merge(
        tasks, weights, strategy, density=density, majority_sign_method=method, seed=SEED
    )
    result_dtype = torch.promote_types(task_dtype, weights_dtype)
    assert got.dtype == result_dtype
    # PEFT's disjoint merge divides by clamp(int count, min=1.0), a float32 tensor, so
    # its ties/dare_ties results are float32 even for 16-bit tasks and weights; the
    # values are compared in the result dtype.
    if strategy not in ELECTING_STRATEGIES:
        assert expected.dtype == result_dtype
    ref = reference_merge_detailed(tasks, weights, strategy, density, method, masks or None)
    tol = _oracle_tolerance(ref)
    assert_matches(got, expected.to(result_dtype), tol, what=f"PEFT {strategy}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seventeen_tasks_agree_with_peft(strategy):
    tasks = [tie_free((16, 16), torch.float32, seed=200 + i) for i in range(17)]
    weights = torch.linspace(-1.0, 1.5, 17)
    masks = _masks_for(strategy, tasks, 0.3)
    with bernoulli_returns(masks):
        expected = PEFT_MERGES[strategy](tasks, weights, 0.3, "total")
    got = lorax_merge.merge(tasks, weights, strategy, density=0.3, seed=SEED)
    ref = reference_merge_detailed(tasks, weights, strategy, 0.3, "total", masks or None)
    assert_matches(got, expected, _oracle_tolerance(ref), what=f"PEFT {strategy} x17")


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize("density", [0.0, 0.29, 0.5, 0.93])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_prune_magnitude_agrees_with_peft(dtype, density):
    x = tie_free((10, 10), dtype, seed=7)
    assert torch.equal(utils.prune(x, density, "magnitude"), peft_mu.prune(x, density, "magnitude"))


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.29, 0.5, 0.93])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_prune_random_agrees_with_peft(dtype, density, rescale):
    x = tie_free((10, 10), dtype, seed=8)
    mask = random_mask(x.shape, density, seed=5, stream=2)
    with bernoulli_returns([mask]):
        expected = peft_mu.prune(x, density, "random", rescale=rescale)
    got = utils.prune(x, density, "random", rescale=rescale, seed=5, stream=2)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["normal", "tie_heavy"])
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sign_mask_agrees_with_peft(dtype, method, kind):
    if kind == "normal":
        stacked = torch.stack([tie_free((30, 7), dtype, seed=9 + i) for i in range(5)])
    else:
        stacked = tie_heavy((4, 30, 7), dtype, seed=9)  # many exact zero sums
    expected = peft_mu.calculate_majority_sign_mask(stacked, method)
    assert torch.equal(utils.calculate_majority_sign_mask(stacked, method), expected)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_disjoint_merge_agrees_with_peft(dtype):
    stacked = torch.stack([tie_free((30, 7), dtype, seed=20 + i) for i in range(5)])
    mask = peft_mu.calculate_majority_sign_mask(stacked, "total")
    expected = peft_mu.disjoint_merge(stacked, mask)
    got = utils.disjoint_merge(stacked, mask)
    x = stacked.to(torch.float64)
    abs_sum = torch.where(mask, x.abs(), torch.zeros_like(x)).sum(0)
    count = torch.clamp(mask.sum(0), min=1)
    tol = 8 * torch.finfo(dtype).eps * abs_sum / count
    assert_matches(got, expected, tol, what="disjoint_merge")


# --------------------------------------------------------------------------- upstream server code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_agrees_with_upstream_when_rescale_is_applied(strategy, dtype):
    tasks = [tie_free((32, 16), dtype, seed=300 + i) for i in range(3)]
    weights = [0.5, -1.0, 1.5]  # the server turns the list into a float32 tensor
    masks = _masks_for(strategy, tasks, 0.4)
    with bernoulli_returns(masks):
        expected = upstream.merge(tasks, weights, strategy, 0.4, "total", apply_rescale=True)
    got = lorax_merge.merge(tasks, weights, strategy, density=0.4, seed=SEED)
    assert got.dtype == expected.dtype == torch.float32
    ref = reference_merge_detailed(tasks, weights, strategy, 0.4, "total", masks or None)
    assert_matches(got, expected, _oracle_tolerance(ref), what=f"upstream {strategy}")


@pytest.mark.parametrize("strategy", sorted(RANDOM_STRATEGIES))
def test_upstream_server_drops_the_dare_rescale(strategy):
    # The server's DARE result is `density` times ours: it computes x / density
    # and discards it.  Ours applies the rescale (the expected value of a kept
    # entry is then the original entry).
    tasks = [tie_free((32, 16), torch.float32, seed=400 + i) for i in range(3)]
    weights = [0.5, -1.0, 1.5]
    density = 0.25  # a power of two: scaling by it is exact
    masks = dare_masks(tasks, density, SEED)
    with bernoulli_returns(masks):
        server = upstream.merge(tasks, weights, strategy, density, "total")
    ours = lorax_merge.merge(tasks, weights, strategy, density=density, seed=SEED)
    ref = reference_merge_detailed(tasks, weights, strategy, density, "total", masks)
    assert_matches(ours * density, server, density * _oracle_tolerance(ref), what="server DARE")
    assert not torch.allclose(ours, server)
