"""Delta-space merging of one module and of whole adapters (``lorax_merge.delta``,
``lorax_merge.delta_adapters``).

* The streamed merged delta equals, bit for bit, ``lorax_merge.merge`` of the dense deltas:
  same thresholds, tie cuts, DARE masks and elections, whatever the tiling.
* DARE in delta space: the kept fraction, the 1/density rescale, seeds.
* Re-factoring: ``cat`` is exact, ``svd`` is the exact truncation, ranks may differ.
* Peak memory does not grow with the number of adapters and stays under 3 ``d x k``.
* Whole adapters: names, shapes, ranks and the merged configuration.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import CANONICAL_NAN_BITS, unsigned_bits

import lorax_merge
from lorax_merge import delta, delta_adapters

ROOT = Path(__file__).resolve().parent.parent
FUSED = {
    "svd": "linear",
    "cat": "linear",
    "ties_svd": "ties",
    "magnitude_prune_svd": "magnitude_prune",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
}
PRUNED = ["ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"]


def _module(d=33, k=27, ranks=(4, 8, 6), seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, k, generator=g).to(dtype).to(device) for r in ranks]
    b = [torch.randn(d, r, generator=g).to(dtype).to(device) for r in ranks]
    return a, b, [2.0, 0.5, 1.25][: len(ranks)], [0.8, -1.1, 0.6][: len(ranks)]


def _dense(a, b, scalings):
    return [delta.lora_delta(ai, bi, s) for ai, bi, s in zip(a, b, scalings)]


def _bits(t):
    return t.view({4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("strategy", ["svd", *PRUNED])
@pytest.mark.parametrize("tile", [None, 60, 500], ids=["one-tile", "2-rows", "many-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_merged_delta_equals_the_merge_of_the_dense_deltas(
    device, monkeypatch, strategy, tile, dtype
):
    if tile is not None:
        monkeypatch.setattr(delta, "_CPU_TILE_ELEMENTS", tile)
        monkeypatch.setattr(delta, "_CUDA_TILE_ELEMENTS", tile)
    a, b, s, w = _module(dtype=dtype, device=device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    for density in (0.0, 0.3, 0.5, 1.0):
        for method in ("total", "frequency"):
            got = delta.merged_delta(a, b, s, w, strategy, density=density,
                                     majority_sign_method=method, seed=21)  # fmt: skip
            expected = lorax_merge.merge(_dense(a, b, s), w, FUSED[strategy], density=density,
                                         majority_sign_method=method, seed=21)  # fmt: skip
            assert got.dtype == work
            assert torch.equal(_bits(got), _bits(expected)), (density, method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lora_delta_rows_are_the_same_whatever_rows_are_computed_together(device, dtype):
    a, b, _, _ = _module(d=70, k=45, ranks=(13,), dtype=dtype, device=device)
    whole = delta.lora_delta(a[0], b[0], 0.75)
    torch.testing.assert_close(whole, (b[0] @ a[0]) * 0.75, rtol=1e-5, atol=1e-5)
    for lo, hi in ((0, 1), (3, 4), (5, 37), (37, 70)):
        part = torch.empty(hi - lo, 45, dtype=dtype, device=device)
        torch.ops.lorax_merge.lora_delta_out(a[0], b[0], 0.75, lo, part)
        assert torch.equal(_bits(part), _bits(whole[lo:hi]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lora_delta_writes_the_canonical_nan(device, dtype):
    """NaN entries (a NaN factor, or Inf * 0) carry the dtype's one NaN pattern on every
    device, as merge results do (x86 would give a negative NaN for -Inf * 0)."""
    a, b, _, _ = _module(d=9, k=7, ranks=(4,), dtype=dtype, device=device)
    a, b = a[0].clone(), b[0].clone()
    b[1, 2], a[2, :] = -math.inf, 0.0  # row 1: -Inf * 0 in every column
    a[0, 3] = -math.nan  # column 3: a negative NaN in every row
    out = delta.lora_delta(a, b, 0.5)
    nan = torch.isnan(out)
    assert bool(nan[1].all()) and bool(nan[:, 3].all())
    assert set(unsigned_bits(out[nan])) == {CANONICAL_NAN_BITS[dtype]}
    assert not bool(nan[0, :3].any()), "finite entries stay finite"


def test_lora_delta_op_checks_and_opcheck():
    a, b, _, _ = _module(d=8, k=6, ranks=(3,))
    out = torch.empty(4, 6)
    torch.library.opcheck(
        torch.ops.lorax_merge.lora_delta_out.default, (a[0], b[0], 2.0, 3, out),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip
    op = torch.ops.lorax_merge.lora_delta_out
    with pytest.raises(ValueError, match="outside"):
        op(a[0], b[0], 1.0, 5, out)
    with pytest.raises(ValueError, match="columns"):
        op(a[0], b[0][:, :2], 1.0, 0, out)
    with pytest.raises(TypeError, match="float32 or float64"):
        op(a[0].half(), b[0].half(), 1.0, 0, out.half())
    with pytest.raises(ValueError, match="contiguous"):
        op(a[0], b[0], 1.0, 0, torch.empty(6, 4).mT)


def test_lora_delta_refuses_an_out_that_shares_memory_with_a_factor():
    """Each entry reads a whole row of B and column of A: writing into either first would
    compute the rest from overwritten values."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(8, 4, generator=g)
    op = torch.ops.lorax_merge.lora_delta_out
    work = a.clone()
    with pytest.raises(ValueError, match="out shares memory with lora_a"):
        op(work, b, 1.0, 0, work)  # the first 4 rows of the delta into A itself
    assert torch.equal(work, a)  # refused before anything was written
    buffer = torch.randn(40)
    factor_b, out = buffer[:32].view(8, 4), buffer[28:].view(2, 6)  # out overlaps B's last row
    with pytest.raises(ValueError, match="out shares memory with lora_b"):
        op(a, factor_b, 1.0, 0, out)
    with pytest.raises(ValueError, match="out"):
        delta.merged_delta([work], [b[:4]], [1.0], [1.0], "svd", out=work)


@pytest.mark.parametrize("strategy", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_in_delta_space_keeps_the_density_and_rescales(strategy):
    a, b, s, _ = _module(d=300, k=200, ranks=(8,), seed=4)
    single = _dense(a, b, s)[0]
    for density in (0.1, 0.5, 0.9):
        got = delta.merged_delta(a, b, s, [1.0], strategy, density=density, seed=5)
        kept = got != 0
        assert abs(kept.float().mean().item() - density) < 0.02
        # kept entries are the delta divided by the density (rounded as x / d rounds)
        torch.testing.assert_close(got[kept], single[kept] / density, rtol=0, atol=0)
        again = delta.merged_delta(a, b, s, [1.0], strategy, density=density, seed=5)
        other = delta.merged_delta(a, b, s, [1.0], strategy, density=density, seed=6)
        assert torch.equal(got, again) and not torch.equal(got, other)


def test_dare_seed_none_draws_from_the_default_generator():
    a, b, s, w = _module(seed=6)
    torch.manual_seed(3)
    first = delta.merged_delta(a, b, s, w, "dare_ties_svd", density=0.5)
    torch.manual_seed(3)
    assert torch.equal(first, delta.merged_delta(a, b, s, w, "dare_ties_svd", density=0.5))


def test_cat_is_the_exact_sum_at_the_sum_of_the_ranks(device):
    a, b, s, w = _module(device=device, dtype=torch.float64)
    lora_a, lora_b = delta.merge_lora_module(a, b, s, w, "cat", rank=20)
    assert lora_a.shape == (20, 27) and lora_b.shape == (33, 20)
    exact = sum(wi * m for wi, m in zip(w, _dense(a, b, s)))
    torch.testing.assert_close(lora_b @ lora_a, exact, rtol=1e-12, atol=1e-12)
    assert not bool(lora_a[18:].any())  # ranks 4 + 8 + 6 = 18, zero-padded to 20
    with pytest.raises(ValueError, match="needs >= 18"):
        delta.merge_lora_module(a, b, s, w, "cat", rank=17)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cat_of_half_precision_factors_scales_them_in_float32(dtype):
    """The default float32 result: each ``A_i * w_i * s_i`` is the float32 product of the
    half-precision values (bit for bit), not a half-precision one that overflows or rounds."""
    a, b, s, w = _module(dtype=dtype)
    a[0] = a[0] * 1000  # w * s * A: about 1.6e3 * 1e3 * 4, beyond float16's 65504
    w = [w[0] * 1000, *w[1:]]
    lora_a, lora_b = delta.merge_lora_module(a, b, s, w, "cat", rank=18)
    assert lora_a.dtype == torch.float32 and lora_b.dtype == torch.float32
    expected_a = torch.cat([x.float() * wi * si for x, wi, si in zip(a, w, s)])
    assert torch.equal(_bits(lora_a), _bits(expected_a))
    assert torch.equal(_bits(lora_b), _bits(torch.cat(b, dim=1).float()))
    exact = sum(wi * si * (y.double() @ x.double()) for x, y, si, wi in zip(a, b, s, w))
    torch.testing.assert_close(lora_b.double() @ lora_a.double(), exact, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("rank", [1, 5, 18, 25])
def test_svd_is_the_exact_truncation_whatever_the_ranks(device, rank):
    a, b, s, w = _module(device=device)
    a64, b64 = [x.double() for x in a], [x.double() for x in b]
    exact = sum(wi * m for wi, m in zip(w, _dense(a64, b64, s)))
    sv = torch.linalg.svdvals(exact)
    lora_a, lora_b = delta.merge_lora_module(a, b, s, w, "svd", rank=rank)
    assert lora_a.shape == (rank, 27) and lora_b.shape == (33, rank)
    assert lora_a.dtype == torch.float32
    error = torch.linalg.matrix_norm(exact - (lora_b.double() @ lora_a.double()))
    optimal = sv[rank:].square().sum().sqrt()
    assert float(error) <= float(optimal) + 1e-4 * float(sv.norm())


@pytest.mark.parametrize("strategy", PRUNED)
def test_pruned_strategies_refactor_the_merged_delta(strategy):
    a, b, s, w = _module(d=64, k=48, seed=8)
    merged = delta.merged_delta(a, b, s, w, strategy, density=0.4, seed=1).double()
    sv = torch.linalg.svdvals(merged)
    for driver in (None, "exact", "gesdd"):
        lora_a, lora_b = delta.merge_lora_module(
            a, b, s, w, strategy, rank=8, density=0.4, seed=1, svd_driver=driver
        )
        error = torch.linalg.matrix_norm(merged - lora_b.double() @ lora_a.double())
        assert float(error) <= 1.01 * float(sv[8:].square().sum().sqrt()), driver


def test_non_finite_factors_propagate(device):
    a, b, s, w = _module(device=device)
    b[1][3, 2] = math.nan
    for strategy in ("svd", "ties_svd", "dare_linear_svd"):
        lora_a, lora_b = delta.merge_lora_module(a, b, s, w, strategy, rank=4, density=0.5)
        assert bool(lora_a.isnan().all()) and bool(lora_b.isnan().all()), strategy
    lora_a, lora_b = delta.merge_lora_module(a, b, s, w, "cat", rank=18)
    assert bool((lora_b @ lora_a).isnan().any())


def test_module_argument_errors():
    a, b, s, w = _module()
    with pytest.raises(ValueError, match="not a delta-space strategy"):
        delta.merge_lora_module(a, b, s, w, "ties", rank=4)
    with pytest.raises(ValueError, match="rank"):
        delta.merge_lora_module(a, b, s, w, "svd", rank=0)
    with pytest.raises(ValueError, match="density"):
        delta.merge_lora_module(a, b, s, w, "ties_svd", rank=4, density=-1.0)
    with pytest.raises(ValueError, match="majority_sign_method"):
        delta.merge_lora_module(a, b, s, w, "ties_svd", rank=4, majority_sign_method="most")
    with pytest.raises(ValueError, match="do not form"):
        delta.merge_lora_module(a, [b[1], b[0], b[2]], s, w, "svd", rank=4)
    with pytest.raises(ValueError, match="one entry per adapter"):
        delta.merge_lora_module(a, b, s[:2], w, "svd", rank=4)
    with pytest.raises(ValueError, match="needs CUDA"):
        delta.merge_lora_module(a, b, s, w, "svd", rank=4, svd_driver="gesvdj")
    with pytest.raises(ValueError, match="not a delta-space strategy"):
        delta.merge_lora_module(a, b, s, w, ["svd"], rank=4)


@pytest.mark.parametrize("strategy", ["svd", "cat", "ties_svd"])
def test_weights_and_scalings_must_be_real_numbers(strategy):
    a, b, s, w = _module()
    kw = {"rank": 18, "density": 0.5}
    for bad in ("x", None, True, 1j):
        with pytest.raises(TypeError, match=r"weights\[1\] must be a real number"):
            delta.merge_lora_module(a, b, s, [w[0], bad, *w[2:]], strategy, **kw)
        with pytest.raises(TypeError, match=r"scalings\[0\] must be a real number"):
            delta.merge_lora_module(a, b, [bad, *s[1:]], w, strategy, **kw)
    as_tensors = [torch.tensor(x, dtype=torch.float64) for x in w]  # one-element tensors too
    for got, expected in zip(
        delta.merge_lora_module(a, b, s, as_tensors, strategy, **kw),
        delta.merge_lora_module(a, b, s, w, strategy, **kw),
    ):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("strategy", ["svd", "cat", "ties_svd"])
def test_out_dtype_must_be_a_floating_point_dtype(strategy):
    a, b, s, w = _module()
    kw = {"rank": 18, "density": 0.5}
    for dtype in (torch.int32, torch.bool, "float32"):
        with pytest.raises(TypeError, match="out_dtype"):
            delta.merge_lora_module(a, b, s, w, strategy, out_dtype=dtype, **kw)
    lora_a, lora_b = delta.merge_lora_module(a, b, s, w, strategy, out_dtype=torch.float16, **kw)
    assert lora_a.dtype == lora_b.dtype == torch.float16


@pytest.mark.parametrize("strategy", ["svd", "cat", "ties_svd"])
def test_module_arguments_are_checked_before_they_are_used(strategy):
    """Each bad argument is named, by a ValueError or TypeError, whichever strategy runs."""
    a, b, s, w = _module()
    kw = {"rank": 18, "density": 0.5}
    with pytest.raises(ValueError, match=r"lora_b\[0\]: expected a 2-D floating-point tensor"):
        delta.merge_lora_module(a, [b[0].tolist(), *b[1:]], s, w, strategy, **kw)
    with pytest.raises(ValueError, match=r"lora_a\[1\]: expected a 2-D floating-point tensor"):
        delta.merge_lora_module([a[0], torch.tensor(1.0), a[2]], b, s, w, strategy, **kw)
    with pytest.raises(TypeError, match="seed"):
        delta.merge_lora_module(a, b, s, w, strategy, seed="abc", **kw)


# ----------------------------------------------------------------------------------- memory
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch
    from lorax_merge import delta
    strategy, count, d, k, rank = sys.argv[1], *map(int, sys.argv[2:6])
    driver = None if sys.argv[6] == "None" else sys.argv[6]
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(rank, k, generator=g) for _ in range(count)]
    b = [torch.randn(d, rank, generator=g) for _ in range(count)]
    args = ([1.0] * count, [0.5] * count, strategy)
    kw = dict(rank=rank, density=0.5, seed=1, svd_driver=driver)
    # warm the code paths (thread pool, BLAS and LAPACK buffers) at a size that needs them
    delta.merge_lora_module([x[:, : k // 2] for x in a], [x[: d // 2] for x in b], *args, **kw)
    gc.collect()
    def status_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS")
    lora_a, lora_b = delta.merge_lora_module(a, b, *args, **kw)
    peak = status_kb("VmHWM")
    print(json.dumps({"extra_dk": (peak - before) * 1024 / (d * k * 4)}))
    """
)


def _peak_extra(
    strategy: str, count: int, d: int, k: int | None = None, rank: int = 16, driver=None
) -> float:
    """Peak resident memory of one module's merge, beyond what it held before, in ``d x k``
    float32 matrices."""
    argv = [strategy, count, d, d if k is None else k, rank, driver]
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=300,
    )
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS counter (/proc/self/clear_refs) here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_dk"]


@pytest.mark.parametrize("strategy", ["ties_svd", "dare_ties_svd"])
def test_peak_memory_is_bounded_and_independent_of_the_adapter_count(strategy):
    """2048 x 2048 float32 deltas (16 MiB each): 3 and 8 adapters."""
    three, eight = _peak_extra(strategy, 3, 2048), _peak_extra(strategy, 8, 2048)
    assert three <= 3.0 and eight <= 3.0, (three, eight)
    assert eight <= three + 0.25, (three, eight)  # 5 more dense deltas would add 5.0
    assert three >= 0.9, f"implausibly low measurement: the merged delta alone is 1.0 ({three})"


@pytest.mark.parametrize("shape", [(256, 65536), (65536, 256)], ids=["wide", "tall"])
def test_the_default_svd_of_wide_and_tall_modules_holds_no_basis_as_large_as_the_delta(shape):
    """Rank 64: the range finder's float64 bases would be 128 x 65536 (4.5 to 5.5 ``d x k`` at
    once); the Gram matrix of the short side is 256 x 256."""
    extra = _peak_extra("ties_svd", 3, *shape, rank=64)
    assert 0.9 <= extra <= 2.0, extra


@pytest.mark.parametrize("shape", [(64, 8000), (8000, 64)], ids=["wide", "tall"])
@pytest.mark.parametrize("driver", ["exact", "gesdd"])
def test_dense_svd_drivers_compute_only_the_reduced_svd(shape, driver):
    """The full SVD of a 64 x 8000 delta holds an 8000 x 8000 basis: 125 times the delta."""
    extra = _peak_extra("ties_svd", 3, *shape, driver=driver)
    assert 0.9 <= extra <= 8.0, extra


def test_the_reduced_dense_svd_keeps_the_full_svds_triplets():
    a, b, s, w = _module(d=40, k=90)
    full = delta.merge_lora_module(a, b, s, w, "ties_svd", rank=9, density=0.5,
                                   svd_driver="exact", svd_full_matrices=True)  # fmt: skip
    reduced = delta.merge_lora_module(a, b, s, w, "ties_svd", rank=9, density=0.5,
                                      svd_driver="exact")  # fmt: skip
    for x, y in zip(full, reduced):
        assert x.shape == y.shape
    torch.testing.assert_close(reduced[1] @ reduced[0], full[1] @ full[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- whole adapters
def _state(prefixes, ranks, seed, k=12, d=10):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for p, r in zip(prefixes, ranks):
        state[f"base_model.model.{p}.lora_A.weight"] = torch.randn(r, k, generator=g)
        state[f"base_model.model.{p}.lora_B.weight"] = torch.randn(d, r, generator=g)
    return state


def test_whole_adapters_merge_module_by_module():
    s1 = _state(["q", "v"], [4, 4], 1)
    s2 = _state(["v", "o"], [6, 6], 2)
    configs = [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"},
        {"r": 6, "lora_alpha": 3, "use_rslora": True, "target_modules": ["v_proj", "o_proj"]},
    ]
    tensors, config = delta_adapters.merge_adapters_delta(
        [s1, s2], configs, [1.0, 0.5], strategy="svd"
    )
    assert sorted(tensors) == sorted(set(s1) | set(s2))
    assert config["r"] == config["lora_alpha"] == 6 and config["use_rslora"] is False
    assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert config["peft_type"] == "LORA"
    v = "base_model.model.v.lora_{}.weight"
    exact = (
        1.0 * (8 / 4) * s1[v.format("B")] @ s1[v.format("A")]
        + 0.5 * (3 / math.sqrt(6)) * s2[v.format("B")] @ s2[v.format("A")]
    )
    # ranks 4 + 6: the sum has rank 10, truncated to 6 (the optimal rank-6 error)
    error = torch.linalg.matrix_norm(tensors[v.format("B")] @ tensors[v.format("A")] - exact)
    tail = torch.linalg.svdvals(exact.double())[6:].norm()
    assert float(error) == pytest.approx(float(tail), rel=1e-4)
    q = "base_model.model.q.lora_{}.weight"  # only in the first adapter: rank 4 -> 6, exact
    assert tensors[q.format("A")].shape == (6, 12)
    torch.testing.assert_close(
        tensors[q.format("B")] @ tensors[q.format("A")], 2.0 * s1[q.format("B")] @ s1[q.format("A")]
    )
    cat, cat_config = delta_adapters.merge_adapters_delta([s1, s2], configs, strategy="cat")
    assert cat_config["r"] == 10 and cat[q.format("A")].shape == (10, 12)


def test_merge_adapters_accepts_the_delta_strategies():
    s1, s2 = _state(["q"], [4], 1), _state(["q"], [2], 2)
    out = lorax_merge.merge_adapters([s1, s2], [1.0, -1.0], strategy="ties_svd", density=0.5,
                                     scalings=[2.0, 1.0], seed=3, rank=3)  # fmt: skip
    assert out["base_model.model.q.lora_A.weight"].shape == (3, 12)
    again = lorax_merge.merge_adapters([s1, s2], [1.0, -1.0], strategy="ties_svd", density=0.5,
                                       scalings=[2.0, 1.0], seed=3, rank=3)  # fmt: skip
    assert all(torch.equal(out[n], again[n]) for n in out)
    with pytest.raises(ValueError, match="scalings"):
        lorax_merge.merge_adapters([s1, s2], strategy="svd")
    with pytest.raises(ValueError, match="not a LoRA factor"):
        lorax_merge.merge_adapters([{"x.bias": torch.ones(3)}], strategy="svd", scalings=[1.0])


def test_whole_adapter_arguments_are_named_in_their_errors():
    s1, s2 = _state(["q"], [4], 1), _state(["q"], [2], 2)
    merge = delta_adapters.merge_state_dicts_delta
    for density in ("x", None):
        with pytest.raises(TypeError, match="density"):
            merge([s1, s2], [1.0, 1.0], [1.0, 1.0], strategy="dare_linear_svd", density=density)
    options = {"strategy": "svd", "scalings": [1.0, 1.0]}
    with pytest.raises(ValueError, match="weighting must be 'lorax' or 'peft'"):
        lorax_merge.merge_adapters([s1, s2], weighting="bogus", **options)
    with pytest.raises(ValueError, match="weighting: 'peft'"):
        lorax_merge.merge_adapters([s1, s2], weighting="peft", **options)
    # One state dict instead of a list of them: the factor-space strategies' TypeError.
    for strategy in ("svd", "linear"):
        with pytest.raises(TypeError, match="adapters: expected a sequence of state dicts"):
            lorax_merge.merge_adapters(s1, strategy=strategy, scalings=[1.0])


def test_conv_adapters_keep_their_layout():
    g = torch.Generator().manual_seed(0)
    states = [
        {"m.conv.lora_A.weight": torch.randn(r, 3, 3, 3, generator=g),
         "m.conv.lora_B.weight": torch.randn(8, r, 1, 1, generator=g)}
        for r in (2, 4)
    ]  # fmt: skip
    out = delta_adapters.merge_state_dicts_delta(states, [1.0, 1.0], [1.0, 1.0], strategy="svd")
    assert out["m.conv.lora_A.weight"].shape == (4, 3, 3, 3)
    assert out["m.conv.lora_B.weight"].shape == (8, 4, 1, 1)
    exact = sum(s["m.conv.lora_B.weight"].flatten(1) @ s["m.conv.lora_A.weight"].flatten(1)
                for s in states)  # fmt: skip
    merged = out["m.conv.lora_B.weight"].flatten(1) @ out["m.conv.lora_A.weight"].flatten(1)
    sv = torch.linalg.svdvals(exact.double())
    assert float(torch.linalg.matrix_norm(merged - exact)) <= float(sv[4:].norm()) + 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("strategy", ["svd", *PRUNED])
def test_cuda_deltas_and_merged_deltas_have_the_cpu_bits(strategy):
    a, b, s, w = _module(d=300, k=257)
    on_gpu = ([x.cuda() for x in a], [x.cuda() for x in b])
    assert torch.equal(_bits(delta.lora_delta(on_gpu[0][1], on_gpu[1][1], 0.3).cpu()),
                       _bits(delta.lora_delta(a[1], b[1], 0.3)))  # fmt: skip
    a_nan, b_nan = a[1].clone(), b[1].clone()
    a_nan[0, 5], b_nan[3, 1], a_nan[1, :] = -math.nan, math.inf, 0.0  # NaN and Inf * 0 entries
    assert torch.equal(_bits(delta.lora_delta(a_nan.cuda(), b_nan.cuda(), 0.3).cpu()),
                       _bits(delta.lora_delta(a_nan, b_nan, 0.3)))  # fmt: skip
    cpu = delta.merged_delta(a, b, s, w, strategy, density=0.4, seed=8)
    gpu = delta.merged_delta(*on_gpu, s, w, strategy, density=0.4, seed=8)
    assert torch.equal(_bits(gpu.cpu()), _bits(cpu))
