"""Delta-space merging of one LoRA module.

An adapter's effect on a module is its delta ``s_i B_i A_i`` (``d x k``; ``s_i`` its scaling,
``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with rsLoRA). Merging the deltas, rather than the
factors ``A`` and ``B`` element by element, is independent of how each adapter's rank is
parameterised and has no cross terms ``B_i A_j``; the merged delta is then re-factored:

* ``cat``: the exact sum, at rank ``sum r_i`` (the weighted ``A``'s stacked over the ``B``'s);
* ``svd``: the exact weighted sum, truncated to rank ``r`` by an SVD computed from the factors
  (:func:`lorax_merge.lowrank.svd_of_factor_sum`), never forming a ``d x k`` matrix;
* ``ties_svd``, ``dare_ties_svd``, ``dare_linear_svd``, ``magnitude_prune_svd``: the deltas are
  merged by the fused kernel of ``ties``, ``dare_ties``, ``dare_linear``, ``magnitude_prune``,
  exactly as :func:`lorax_merge.merge` would merge the dense deltas, then truncated to rank ``r``.

Memory of the pruned merges does not grow with the number of adapters: each adapter's delta is
formed once in the output buffer to find its exact magnitude threshold, then the merge streams
row tiles: every adapter's tile ``s_i B_i[rows] A_i`` is recomputed from the factors and the tiles
are merged by the fused kernel at their flat-index offset, with the thresholds of the whole
deltas, so masks, tie cuts and DARE draws are those of a merge of the dense deltas. Peak: the
merged ``d x k`` buffer, one tile per adapter (at least two rows each) and the factors, then the
SVD's work (:func:`lorax_merge.lowrank.refactor_dense`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ops
from ._validation import check_density, check_majority_sign_method, check_out_dtype, check_real
from .lowrank import (
    check_svd_clamp,
    check_svd_driver,
    peft_factors,
    refactor_dense,
    svd_of_factor_sum,
)
from .seeds import check_seed, op_seed, seed_or_drawn
from .strategy_table import STRATEGIES, fused_strategy, strategy_names

__all__ = ["compute_dtype", "lora_delta", "merge_lora_module", "merged_delta"]

# Elements of one adapter's tile per fused-merge call: 1 MiB of float32 on the CPU (in cache
# while the tiles are merged), 16 MiB on a GPU (enough blocks to fill it).
_CPU_TILE_ELEMENTS = 1 << 18
_CUDA_TILE_ELEMENTS = 1 << 22


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any tensor is float64, else float32: the dtype deltas are formed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_factors(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scalings, weights
) -> tuple[int, int]:
    count = len(lora_a)
    if count == 0:
        raise ValueError("lora_a: no adapters to merge")
    for arg, values in (("lora_b", lora_b), ("scalings", scalings), ("weights", weights)):
        if len(values) != count:
            raise ValueError(f"{arg}: expected one entry per adapter ({count}), got {len(values)}")
    for arg, factors in (("lora_a", lora_a), ("lora_b", lora_b)):
        for i, t in enumerate(factors):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise ValueError(f"{arg}[{i}]: expected a 2-D floating-point tensor, got {t!r:.80}")
    d, k = lora_b[0].shape[0], lora_a[0].shape[1]
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if b.shape[1] != a.shape[0] or b.shape[0] != d or a.shape[1] != k:
            raise ValueError(
                f"adapter {i}: lora_B {list(b.shape)} and lora_A {list(a.shape)} do not form a "
                f"{d} x {k} delta of rank {a.shape[0]}"
            )
        if a.device != lora_a[0].device or b.device != lora_a[0].device:
            raise ValueError(f"adapter {i}: factors on {a.device}/{b.device}, expected one device")
    return d, k


def _kernel_args(strategy: str, density: object, majority_sign_method: object):
    known = isinstance(strategy, str) and strategy in STRATEGIES
    if not known or STRATEGIES[strategy].space != "delta":
        raise ValueError(
            f"strategy: {strategy!r} is not a delta-space strategy; expected one of "
            f"{', '.join(strategy_names(space='delta'))}"
        )
    rule = STRATEGIES[fused_strategy(strategy)]
    density = check_density(density) if rule.uses_density else 1.0
    election = check_majority_sign_method(majority_sign_method) if rule.elects_sign else "none"
    return rule, density, election


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The delta ``(B @ A) * scaling`` of one adapter, as delta-space merges form it.

    Each entry sums ``B[i, p] * A[p, j]`` over the rank in order, in the compute dtype (see
    :func:`compute_dtype`), then multiplies by ``scaling``: the same bits on the CPU and CUDA,
    and for any block of rows computed on its own (a BLAS product may round a row differently
    depending on the rows computed with it).
    """
    dtype = compute_dtype(lora_a, lora_b)
    a, b = lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous()
    out = torch.empty(b.shape[0], a.shape[1], dtype=dtype, device=a.device)
    _ops.ops.lora_delta_out(a, b, float(scaling), 0, out)
    return out


def merged_delta(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    strategy: str,
    *,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense merged delta of one module, formed tile by tile.

    Equal, bit for bit, to ``lorax_merge.merge([lora_delta(A_i, B_i, s_i) ...], weights,
    fused_strategy(strategy), density=..., majority_sign_method=..., seed=seed)``, without
    holding more than one dense delta.

    Args:
        lora_a: ``A_i``, ``r_i x k`` (ranks may differ).
        lora_b: ``B_i``, ``d x r_i``.
        scalings: ``s_i``.
        weights: ``w_i`` (applied by the merge rule, after pruning, as in ``merge``).
        strategy: a delta-space strategy (its element-wise rule is used; ``svd``/``cat``: linear).
        density, majority_sign_method, seed: as in :func:`lorax_merge.merge`.
        out: optional ``d x k`` contiguous buffer of the compute dtype, on the factors' device,
            sharing no memory with them.

    Returns:
        The ``d x k`` merged delta in :func:`compute_dtype` of the factors.
    """
    d, k = _check_factors(lora_a, lora_b, scalings, weights)
    rule, density, election = _kernel_args(strategy, density, majority_sign_method)
    seed = check_seed(seed)
    device = lora_a[0].device
    dtype = compute_dtype(*lora_a, *lora_b)
    a_work = [a.to(dtype).contiguous() for a in lora_a]
    b_work = [b.to(dtype).contiguous() for b in lora_b]
    scale = [float(s) for s in scalings]
    if out is None:
        out = torch.empty(d, k, dtype=dtype, device=device)
    elif (out.shape, out.dtype, out.device) != ((d, k), dtype, device) or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {d} x {k} {dtype} tensor on {device}")
    elif any(_shares_memory(out, factor) for factor in (*a_work, *b_work)):
        raise ValueError(
            "out: shares memory with a factor, which the merge reads until the last row of out "
            "is written; give out its own memory"
        )
    if out.numel() == 0:
        return out
    # The tiles of all adapters together stay within a quarter of the output.
    cap = _CUDA_TILE_ELEMENTS if device.type == "cuda" else _CPU_TILE_ELEMENTS
    tile = min(cap, d * k // (4 * len(a_work)))
    rows = min(d, max(2, tile // k // 2 * 2))  # even: tiles start at even flat indices

    thresholds = None
    if rule.pruning == "magnitude" and density < 1:
        per_task = []
        for a, b, s in zip(a_work, b_work, scale):
            _ops.ops.lora_delta_out(a, b, s, 0, out)
            per_task.append(_ops.ops.magnitude_thresholds([out], density))
        thresholds = torch.cat(per_task)
    kernel_seed = 0
    if rule.is_random and density < 1:
        kernel_seed = op_seed(seed_or_drawn(seed))
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device="cpu")
    buffers = [torch.empty(rows, k, dtype=dtype, device=device) for _ in a_work]
    for r0 in range(0, d, rows):
        count = min(rows, d - r0)
        tiles = [buffer[:count] for buffer in buffers]
        for a, b, s, t in zip(a_work, b_work, scale, tiles):
            _ops.ops.lora_delta_out(a, b, s, r0, t)
        _ops.ops.merge_slice_out(
            tiles, w, rule.pruning, election, density, rule.rescale, kernel_seed, r0 * k,
            thresholds, out[r0 : r0 + count],
        )  # fmt: skip
    return out


def _shares_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two contiguous tensors' bytes overlap (metadata only: no synchronisation)."""
    if x.device != y.device or x.numel() == 0 or y.numel() == 0:
        return False
    x_begin, y_begin = x.data_ptr(), y.data_ptr()
    x_end = x_begin + x.numel() * x.element_size()
    return x_begin < y_begin + y.numel() * y.element_size() and y_begin < x_end


def merge_lora_module(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    strategy: str,
    *,
    rank: int,
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = None,
    svd_driver: str | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module of several adapters in delta space; return ``(lora_A, lora_B)``.

    Args:
        lora_a, lora_b, scalings, weights: the adapters' factors ``A_i`` (``r_i x k``), ``B_i``
            (``d x r_i``), scalings ``s_i`` and merge weights ``w_i``; the merged delta is built
            from ``w_i s_i B_i A_i`` as the strategy says.
        strategy: ``cat``, ``svd``, ``ties_svd``, ``dare_ties_svd``, ``dare_linear_svd`` or
            ``magnitude_prune_svd``.
        rank: rank of the result. ``cat`` needs at least ``sum r_i`` (zero-padded above it);
            it scales each ``A_i`` by ``w_i s_i`` in the compute dtype (``out_dtype`` if wider),
            then rounds once to ``out_dtype``.
        density, majority_sign_method, seed: as in :func:`lorax_merge.merge`, for the strategies
            that prune; ``seed=None`` draws a DARE seed from torch's default generator.
        svd_driver: ``None``: the fast exact factor-space SVD for ``svd``, the randomized range
            finder for the pruned strategies (the exact Gram route for a wide or tall module,
            see :func:`lorax_merge.lowrank.refactor_dense`); ``"exact"``: ``torch.linalg.svd``
            of the dense merged delta (PEFT's computation); ``"gesvd"``/``"gesvdj"``/
            ``"gesvda"`` (CUDA) or ``"gesdd"`` (CPU): that routine for the SVD (the ``R x R``
            core for ``svd``, the dense delta otherwise).
        svd_clamp: quantile at which both factors are clamped, as in PEFT.
        svd_full_matrices: passed to ``torch.linalg.svd`` of a dense delta. The kept singular
            triplets are those of the reduced SVD either way (beyond rounding); ``True`` also
            computes the unused ``k x k`` (or ``d x d``) basis, as PEFT does by default.
        out_dtype: floating-point dtype of the factors (default: float32, or float64 for
            float64 factors).

    Returns:
        ``lora_A`` (``rank x k``) and ``lora_B`` (``d x rank``), contiguous, on the factors'
        device. Non-finite factors make the SVD strategies' result NaN throughout (``cat``
        carries them where they are).
    """
    _check_factors(lora_a, lora_b, scalings, weights)
    spec = STRATEGIES.get(strategy) if isinstance(strategy, str) else None
    _kernel_args(strategy, density, majority_sign_method)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    check_seed(seed)
    svd_driver = check_svd_driver(svd_driver, lora_a[0].device)
    svd_clamp = check_svd_clamp(svd_clamp)
    dtype = check_out_dtype(out_dtype) or compute_dtype(*lora_a, *lora_b)
    coefficients = [
        check_real(w, f"weights[{i}]") * check_real(s, f"scalings[{i}]")
        for i, (w, s) in enumerate(zip(weights, scalings))
    ]

    if spec.refactor == "concat":
        total = sum(a.shape[0] for a in lora_a)
        if rank < total:
            raise ValueError(f"rank: cat keeps every adapter's rank, needs >= {total}, got {rank}")
        # PEFT's arithmetic, A_i * w_i * s_i, but in the compute dtype (or a wider output
        # dtype): half-precision factors would overflow or round before the cast.
        work = torch.promote_types(dtype, compute_dtype(*lora_a, *lora_b))
        cat_a = torch.cat(
            [a.to(work) * float(w) * float(s) for a, w, s in zip(lora_a, weights, scalings)]
        )
        cat_b = torch.cat(list(lora_b), dim=1)
        return _padded_concat(cat_a, cat_b, rank, dtype)

    if spec.pruning == "none" and svd_driver != "exact":
        u, s, vh = svd_of_factor_sum(list(lora_b), list(lora_a), coefficients, driver=svd_driver)
    else:
        delta = merged_delta(
            lora_a,
            lora_b,
            scalings,
            weights,
            strategy,
            density=density,
            majority_sign_method=majority_sign_method,
            seed=seed,
        )
        u, s, vh = refactor_dense(delta, rank, driver=svd_driver, full_matrices=svd_full_matrices)
        del delta
    return peft_factors(u, s, vh, rank, clamp=svd_clamp, dtype=dtype)


def _padded_concat(
    lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated factors zero-padded to ``rank``, as in PEFT's zero-initialised target."""
    extra = rank - lora_a.shape[0]
    if extra:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(extra, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], extra)], dim=1)
    return lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous()
