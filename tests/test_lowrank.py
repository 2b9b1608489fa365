"""Truncated SVDs of merged deltas (``lorax_merge.lowrank``).

* The factor-space SVD of ``sum_i c_i B_i A_i`` equals the dense SVD (singular values, and the
  rank-r product, which is sign-free) without forming the ``d x k`` matrix.
* The randomized range finder, on realistic merged deltas (pruned sums of random rank-r
  adapters: TIES, DARE, magnitude pruning at several densities), has a Frobenius error within
  1% of the optimal rank-r error (the tail of the exact singular values).
* The Gram route, for wide and tall matrices: the exact truncation, orthonormal factors,
  the canonical signs; zero matrices and ranks above the shorter side.
* PEFT's output layout and quantile clamp; driver and clamp validation; NaN/Inf propagate.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorax_merge import delta, lowrank


def _factors(d, k, ranks, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = [(torch.randn(r, k, generator=g) / math.sqrt(k)).to(dtype).to(device) for r in ranks]
    b = [torch.randn(d, r, generator=g).to(dtype).to(device) for r in ranks]
    return a, b


def _product(u, s, vh):
    return (u * s) @ vh


@pytest.mark.parametrize(
    ("d", "k", "ranks"), [(40, 30, [4, 8, 2]), (7, 50, [3, 5]), (9, 8, [6, 6])]
)
def test_factor_sum_svd_equals_the_dense_svd(device, d, k, ranks):
    a, b = _factors(d, k, ranks, device=device)
    c = [0.7, -1.3, 0.4][: len(ranks)]
    dense = sum(ci * (bi.double() @ ai.double()) for ci, ai, bi in zip(c, a, b))
    u, s, vh = lowrank.svd_of_factor_sum(b, a, c)
    m = min(d, k, sum(ranks))
    assert u.shape == (d, m) and s.shape == (m,) and vh.shape == (m, k)
    assert u.dtype == torch.float64
    exact = torch.linalg.svdvals(dense)
    torch.testing.assert_close(s, exact[:m], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_product(u, s, vh), dense, rtol=1e-10, atol=1e-12)
    # orthonormal singular vectors, largest entry of each left vector positive
    torch.testing.assert_close(u.mT @ u, torch.eye(m, dtype=u.dtype, device=u.device))
    assert bool((u.gather(0, u.abs().argmax(0, keepdim=True)) > 0).all())
    for r in range(1, m + 1):
        truncated = _product(u[:, :r], s[:r], vh[:r])
        err = torch.linalg.matrix_norm(dense - truncated)
        assert float(err) == pytest.approx(float(exact[r:].square().sum().sqrt()), abs=1e-9)


def test_factor_sum_svd_never_forms_the_dense_matrix():
    """Factors of a 2**20 x 2**20 delta: the dense matrix would need 4 TiB."""
    a, b = _factors(1 << 20, 1 << 20, [2, 3], seed=1)
    u, s, vh = lowrank.svd_of_factor_sum(b, a, [1.0, -0.5])
    assert u.shape == (1 << 20, 5) and vh.shape == (5, 1 << 20)
    assert bool(torch.isfinite(s).all()) and bool((s[:-1] >= s[1:]).all())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_factors_give_nan_not_an_error(bad):
    a, b = _factors(12, 10, [3, 3], seed=2)
    b[1][4, 2] = bad
    u, s, vh = lowrank.svd_of_factor_sum(b, a, [1.0, 1.0])
    assert bool(u.isnan().all()) and bool(s.isnan().all()) and bool(vh.isnan().all())
    dense = torch.randn(12, 10, dtype=torch.float64)
    dense[3, 3] = bad
    u, s, vh = lowrank.refactor_dense(dense, 4)
    assert bool(u.isnan().all()) and bool(s.isnan().all()) and bool(vh.isnan().all())


#: realistic merged deltas: (strategy, density)
MERGED_CASES = [
    ("ties_svd", 0.05),
    ("ties_svd", 0.5),
    ("magnitude_prune_svd", 0.2),
    ("dare_ties_svd", 0.05),
    ("dare_ties_svd", 0.5),
    ("dare_linear_svd", 0.1),
    ("dare_linear_svd", 0.9),
]


@pytest.mark.parametrize(("strategy", "density"), MERGED_CASES)
@pytest.mark.parametrize("ranks", [[8, 8, 8], [16, 4, 8]], ids=str)
def test_randomized_svd_is_within_one_percent_of_the_optimal_error(strategy, density, ranks):
    a, b = _factors(384, 256, ranks, seed=3)
    merged = delta.merged_delta(a, b, [2.0, 1.0, 0.5], [1.0, 0.6, 0.4], strategy,
                                density=density, seed=4)  # fmt: skip
    r = max(ranks)
    optimal = torch.linalg.svdvals(merged.double())[r:].square().sum().sqrt()
    u, s, vh = lowrank.randomized_svd(merged, r)
    error = torch.linalg.matrix_norm(merged.double() - _product(u, s, vh))
    assert float(error) <= 1.01 * float(optimal), float(error / optimal)


def test_randomized_svd_is_deterministic_and_leaves_the_global_generator_alone():
    m = torch.randn(60, 50, dtype=torch.float32)
    state = torch.get_rng_state()
    first = lowrank.randomized_svd(m, 5)
    assert torch.equal(torch.get_rng_state(), state)
    second = lowrank.randomized_svd(m, 5)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_randomized_svd_is_exact_when_the_test_matrix_spans_the_range():
    m = torch.randn(30, 12, dtype=torch.float64)
    u, s, vh = lowrank.randomized_svd(m, 4)  # 4 + 10 >= 12 columns: the whole range
    torch.testing.assert_close(s, torch.linalg.svdvals(m)[:4])


@pytest.mark.parametrize(
    ("d", "k"), [(12, 3000), (3000, 12), (1, 500), (500, 2)], ids=["wide", "tall", "row", "2-cols"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gram_svd_is_the_exact_truncation_of_wide_and_tall_matrices(d, k, dtype):
    a, b = _factors(d, k, [4, 6], seed=5, dtype=dtype)
    merged = delta.merged_delta(a, b, [2.0, 1.0], [1.0, -0.6], "ties_svd", density=0.5)
    u, s, vh = lowrank.gram_svd(merged, 5)
    keep = min(5, d, k)
    assert (u.shape, s.shape, vh.shape) == ((d, keep), (keep,), (keep, k))
    assert u.dtype == s.dtype == vh.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    exact = torch.linalg.svdvals(merged.double())
    torch.testing.assert_close(s.double(), exact[:keep], rtol=tol, atol=tol * float(exact[0]))
    optimal = float(exact[keep:].square().sum().sqrt())
    error = float(torch.linalg.matrix_norm(merged.double() - _product(u, s, vh).double()))
    assert error <= optimal * (1 + tol) + tol * float(exact[0]), (error, optimal)
    eye = torch.eye(keep, dtype=torch.float64)
    torch.testing.assert_close(u.double().mT @ u.double(), eye, rtol=0, atol=10 * tol)
    torch.testing.assert_close(vh.double() @ vh.double().mT, eye, rtol=0, atol=10 * tol)
    largest = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    assert bool((largest > 0).all())  # the sign convention of every route


def test_gram_svd_of_a_zero_matrix_and_of_a_rank_above_the_shorter_side():
    u, s, vh = lowrank.gram_svd(torch.zeros(3, 40), 2)
    assert not bool(s.any()) and bool(torch.isfinite(u).all() and torch.isfinite(vh).all())
    m = torch.randn(40, 3, dtype=torch.float64)
    u, s, vh = lowrank.gram_svd(m, 8)
    assert s.shape == (3,)
    torch.testing.assert_close(_product(u, s, vh), m, rtol=1e-12, atol=1e-12)


def test_peft_layout_and_clamp_follow_peft():
    u, s, vh = torch.linalg.svd(torch.randn(20, 15))
    lora_a, lora_b = lowrank.peft_factors(u, s, vh, 6, clamp=0.9)
    # PEFT's code, verbatim
    pu, ps, pvh = u[:, :6], s[:6], vh[:6, :]
    pu = pu @ torch.diag(ps)
    hi = torch.quantile(torch.cat([pu.flatten(), pvh.flatten()]), 0.9)
    assert torch.equal(lora_b, pu.clamp(-hi, hi)) and torch.equal(lora_a, pvh.clamp(-hi, hi))


def test_rank_above_the_available_triplets_pads_with_zeros():
    u, s, vh = torch.linalg.svd(torch.randn(5, 4, dtype=torch.float64), full_matrices=False)
    lora_a, lora_b = lowrank.peft_factors(u, s, vh, 7, dtype=torch.float32)
    assert lora_a.shape == (7, 4) and lora_b.shape == (5, 7) and lora_a.dtype == torch.float32
    assert not bool(lora_a[4:].any()) and not bool(lora_b[:, 4:].any())


def test_quantile_of_inputs_too_large_for_torch_quantile(monkeypatch):
    values = torch.randn(1001, dtype=torch.float64)
    monkeypatch.setattr(lowrank, "_QUANTILE_LIMIT", 100)
    for q in (0.0, 0.37, 0.9, 1.0):
        assert float(lowrank._quantile(values, q)) == pytest.approx(
            float(torch.quantile(values, q)), abs=1e-15
        )


@pytest.mark.parametrize(
    ("driver", "device", "match"),
    [
        ("gesvdx", "cpu", "unknown driver"),
        (3, "cpu", "unknown driver"),
        ("gesvd", "cpu", "needs CUDA"),
        ("gesvdj", "cpu", "needs CUDA"),
        ("gesdd", "meta", "CPU driver"),
    ],
)
def test_svd_driver_validation(driver, device, match):
    with pytest.raises(ValueError, match=match):
        lowrank.check_svd_driver(driver, torch.device(device))


def test_valid_drivers_and_clamps_pass():
    assert lowrank.check_svd_driver(None, torch.device("cpu")) is None
    assert lowrank.check_svd_driver("exact", torch.device("cpu")) == "exact"
    assert lowrank.check_svd_driver("gesdd", torch.device("cpu")) == "gesdd"
    assert lowrank.check_svd_clamp(None) is None and lowrank.check_svd_clamp(1) == 1.0
    for bad in (-0.1, 1.5, math.nan, "0.9", True):
        with pytest.raises(ValueError, match="svd_clamp"):
            lowrank.check_svd_clamp(bad)
