"""Truncated SVDs of merged LoRA deltas, returned in PEFT's layout.

A merged delta ``M`` (``d x k``) becomes the LoRA factors ``lora_B = U_r diag(S_r)`` (``d x r``)
and ``lora_A = Vh_r`` (``r x k``), optionally clamped at a quantile of their entries, as PEFT's
``add_weighted_adapter`` does. Three ways to the SVD:

* :func:`svd_of_factor_sum`: ``M = sum_i c_i B_i A_i`` given by its factors. The stacked
  factors ``[c_1 B_1 ... c_N B_N]`` (``d x R``) and ``[A_1; ...; A_N]^T`` (``k x R``) have thin
  QR factorisations ``Q_b R_b`` and ``Q_a R_a``, so ``M = Q_b (R_b R_a^T) Q_a^T`` and the SVD of
  the ``R x R`` core gives the exact SVD of ``M`` in ``O((d + k) R^2)``, without ``M``.
* :func:`randomized_svd`: a randomized range finder with power iterations (Halko, Martinsson
  and Tropp, 2011) on a dense ``M``: a few products of ``M`` with ``d x l`` and ``k x l``
  matrices instead of an ``O(d k min(d, k))`` factorisation.
* :func:`gram_svd`: for a dense ``M`` whose shorter side is within a few times the rank (where
  the range finder's bases would be as large as ``M``), the eigenvectors of the small Gram matrix
  of that side, and one product with ``M``.
* :func:`dense_svd`: ``torch.linalg.svd`` of the dense ``M``, as PEFT computes it.

Small (factor-sized) linear algebra runs in float64 whatever the input dtype.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "CUDA_SVD_DRIVERS",
    "CPU_SVD_DRIVERS",
    "RANGE_FINDER_SEED",
    "canonical_signs",
    "check_svd_driver",
    "check_svd_clamp",
    "dense_svd",
    "gram_svd",
    "peft_factors",
    "randomized_svd",
    "refactor_dense",
    "svd_of_factor_sum",
    "torch_driver",
]

#: ``torch.linalg.svd`` drivers of cuSOLVER (CUDA tensors only).
CUDA_SVD_DRIVERS: tuple[str, ...] = ("gesvd", "gesvdj", "gesvda")
#: LAPACK's divide-and-conquer SVD, torch's CPU routine (CPU tensors only).
CPU_SVD_DRIVERS: tuple[str, ...] = ("gesdd",)
#: Seed of the range finder's Gaussian test matrix: the refactoring is deterministic.
RANGE_FINDER_SEED = 0x5EED

_WORK = torch.float64
_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs
# Elements of M converted to float64 at a time for its Gram matrix: 2 MiB on the CPU, 32 MiB
# on a GPU (few enough launches).
_CPU_GRAM_BLOCK = 1 << 18
_CUDA_GRAM_BLOCK = 1 << 22


def check_svd_driver(driver: object, device: torch.device) -> str | None:
    """Validate ``svd_driver`` for tensors on ``device``.

    ``None`` (the fast default), ``"exact"`` (a full SVD of the dense delta, as PEFT computes
    it), a cuSOLVER driver (``"gesvd"``, ``"gesvdj"``, ``"gesvda"``; CUDA only) or LAPACK's
    ``"gesdd"`` (CPU only).

    Raises:
        ValueError: an unknown driver, or one that does not exist on ``device``.
    """
    if driver is None or driver == "exact":
        return driver
    known = CUDA_SVD_DRIVERS + CPU_SVD_DRIVERS
    if not isinstance(driver, str) or driver not in known:
        raise ValueError(
            f"svd_driver: unknown driver {driver!r}; expected None, 'exact' or one of "
            f"{', '.join(known)}"
        )
    if driver in CUDA_SVD_DRIVERS and device.type != "cuda":
        raise ValueError(
            f"svd_driver: {driver!r} is a cuSOLVER driver and needs CUDA tensors; the adapters "
            f"are on {device} (use None, 'exact' or 'gesdd' there)"
        )
    if driver in CPU_SVD_DRIVERS and device.type != "cpu":
        raise ValueError(
            f"svd_driver: {driver!r} is LAPACK's CPU driver; the adapters are on {device} "
            f"(use None, 'exact' or one of {', '.join(CUDA_SVD_DRIVERS)} there)"
        )
    return driver


def check_svd_clamp(clamp: object) -> float | None:
    """Validate ``svd_clamp``: None or a quantile in [0, 1]."""
    if clamp is None:
        return None
    if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real):
        raise ValueError(f"svd_clamp: expected None or a number in [0, 1], got {clamp!r}")
    value = float(clamp)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"svd_clamp: the quantile must be in [0, 1], got {clamp!r}")
    return value


def torch_driver(driver: str | None) -> str | None:
    """The ``driver=`` argument of ``torch.linalg.svd`` for one of our driver names."""
    return driver if driver in CUDA_SVD_DRIVERS else None


def _finite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every entry of every tensor is finite (no host synchronisation).

    From the minimum and maximum (NaN propagates into both): one pass, no temporary the size
    of the input, as ``isfinite(t).all()`` would make.
    """
    flag = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.numel():
            low, high = torch.aminmax(t)
            flag = flag & torch.isfinite(low) & torch.isfinite(high)
    return flag


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign an SVD leaves free: the largest-magnitude entry of each ``U`` column is
    positive (``vh``'s rows flip with it), so results do not depend on the route taken."""
    if u.numel() == 0:
        return u, vh
    signs = _signs_of_largest_entries(u)
    return u * signs, vh * signs.mT


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y.to(_WORK)).Q


def svd_of_factor_sum(
    b_factors: list[torch.Tensor],
    a_factors: list[torch.Tensor],
    coefficients: list[float],
    *,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``M = sum_i c_i B_i A_i`` from the factors, without forming ``M``.

    Args:
        b_factors: ``B_i``, ``d x r_i``.
        a_factors: ``A_i``, ``r_i x k``.
        coefficients: ``c_i`` (weight times scaling).
        driver: ``torch.linalg.svd`` driver of the small core SVD (see :func:`torch_driver`).

    Returns:
        ``(U, S, Vh)`` in float64 with ``m = min(d, k, sum r_i)`` singular triplets, descending.
        A non-finite entry in any ``c_i B_i`` or ``A_i`` makes all three entirely NaN.
    """
    b_stack = torch.cat([b.to(_WORK) * float(c) for b, c in zip(b_factors, coefficients)], dim=1)
    a_stack = torch.cat([a.to(_WORK) for a in a_factors], dim=0)
    finite = _finite_flag(b_stack, a_stack)
    # LAPACK may refuse non-finite input: factor zeros instead and poison the result.
    b_stack = torch.nan_to_num(b_stack, nan=0.0, posinf=0.0, neginf=0.0)
    a_stack = torch.nan_to_num(a_stack, nan=0.0, posinf=0.0, neginf=0.0)
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_stack.mT)
    u_core, s, vh_core = torch.linalg.svd(
        r_b @ r_a.mT, full_matrices=False, driver=torch_driver(driver)
    )
    u, vh = canonical_signs(q_b @ u_core, vh_core @ q_a.mT)
    nan = torch.full((), math.nan, dtype=_WORK, device=u.device)
    return tuple(torch.where(finite, x, nan) for x in (u, s, vh))  # type: ignore[return-value]


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    power_iterations: int = 3,
    seed: int = RANGE_FINDER_SEED,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of a dense matrix by a randomized range finder.

    ``l = rank + oversample`` Gaussian test vectors (drawn from a generator seeded with
    ``seed``, never the global one), ``power_iterations`` rounds of ``M^T``/``M`` products with
    re-orthonormalisation, then the exact SVD of the ``l x k`` projection ``Q^T M``. When
    ``l >= min(d, k)`` the range is captured whole and the result is exact.

    ``matrix`` must be finite (see :func:`refactor_dense`). Products with ``matrix`` run in
    its dtype; the ``l``-column bases and the small SVD in float64.

    Returns:
        ``(U, S, Vh)`` in float64 with ``min(rank, d, k)`` triplets.
    """
    d, k = matrix.shape
    width = min(_range_finder_width(rank) if oversample is None else rank + oversample, d, k)
    gen = torch.Generator(device=matrix.device).manual_seed(seed)
    test = torch.randn(k, width, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = _orthonormal_basis(matrix @ test)
    for _ in range(power_iterations):
        co_basis = _orthonormal_basis(matrix.mT @ basis.to(matrix.dtype))
        basis = _orthonormal_basis(matrix @ co_basis.to(matrix.dtype))
    projected = (matrix.mT @ basis.to(matrix.dtype)).mT.to(_WORK)  # Q^T M, width x k
    u_small, s, vh = torch.linalg.svd(projected, full_matrices=False)
    keep = min(rank, width)
    u, vh = canonical_signs((basis @ u_small)[:, :keep], vh[:keep])
    return u, s[:keep], vh


def _range_finder_width(rank: int) -> int:
    """``l = rank + max(10, rank)``: the test vectors of :func:`randomized_svd`."""
    return rank + max(10, rank)


def _gram_is_cheaper(d: int, k: int, rank: int) -> bool:
    """The Gram route's ``min(d, k)^2`` float64 matrices (about five, with the eigensolver's
    copy and workspace) take less memory than the range finder's ``max(d, k) x l`` ones (about
    three and a half), and its ``min(d, k)^2 max(d, k)`` products no more work than the range
    finder's ``8 d k l``."""
    width = _range_finder_width(rank)
    short, long_side = min(d, k), max(d, k)
    return short <= 8 * width and 2 * short * short <= width * long_side


def gram_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of a dense matrix from the Gram matrix of its shorter side.

    For a wide ``M`` (``d <= k``), the top ``rank`` eigenvectors ``U_r`` of ``G = M M^T``
    (``d x d``, accumulated in float64 from column blocks of ``M``) are its left singular
    vectors; the rows of ``W = U_r^T M`` have the singular values as norms and the right
    singular vectors as directions. A tall ``M`` goes through ``M^T M`` the same way. The
    product ``U_r S_r Vh_r`` is ``U_r U_r^T M`` (up to the rounding of ``W``), the projection of
    ``M`` on the subspace found, whatever the rounding of ``G``; singular vectors of singular
    values below about ``1e-7`` of the largest are not resolved from one another (a zero
    singular value gets a zero right singular vector).

    Memory: ``G``, its eigenvectors and the eigensolver's workspace (about three
    ``min(d, k)^2`` float64 matrices), one float64 block of ``M``, and ``W`` in ``M``'s dtype;
    never a ``d x k`` temporary. Meant for a shorter side of at most a few times ``rank``.

    Returns:
        ``(U, S, Vh)`` in ``matrix``'s dtype with ``min(rank, d, k)`` triplets, the largest
        entry of each ``U`` column positive (see :func:`canonical_signs`).
    """
    d, k = matrix.shape
    wide = d <= k
    short, long_side = (d, k) if wide else (k, d)
    keep = min(rank, short)
    if keep == 0:
        return matrix.new_zeros(d, 0), matrix.new_zeros(0), matrix.new_zeros(0, k)
    side = matrix if wide else matrix.mT  # short x long: G = side @ side^T
    cap = _CUDA_GRAM_BLOCK if matrix.device.type == "cuda" else _CPU_GRAM_BLOCK
    step = max(1, cap // max(short, 1))
    gram = torch.zeros(short, short, dtype=_WORK, device=matrix.device)
    for start in range(0, long_side, step):
        block = side[:, start : start + step].to(_WORK)
        gram.addmm_(block, block.mT)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    del gram
    basis = vectors[:, short - keep :].flip(1)  # the top `keep`, descending
    del vectors
    if wide:  # U is the small basis: fix its signs first, and W's rows follow
        basis = _signs_of_largest_entries(basis) * basis
    basis = basis.to(matrix.dtype)
    projected = basis.mT @ side  # W, keep x long (its rows: S_i times a singular vector)
    norms = torch.linalg.vector_norm(projected, dim=1)
    projected.div_(torch.where(norms > 0, norms, 1.0).unsqueeze(1))
    if wide:
        return basis, norms, projected
    u = projected.mT  # d x keep
    signs = _signs_of_largest_entries(u)
    u.mul_(signs)  # in place: U is the large factor here
    return u, norms, (basis * signs).mT


def _signs_of_largest_entries(u: torch.Tensor) -> torch.Tensor:
    """``1 x n``: the sign of the largest-magnitude entry of each column (+1 for a zero one)."""
    rows = u.abs().argmax(dim=0, keepdim=True)
    return torch.where(u.gather(0, rows) < 0, -1.0, 1.0).to(u.dtype)


def dense_svd(
    matrix: torch.Tensor, *, full_matrices: bool = True, driver: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd`` of the dense matrix, as PEFT calls it (``matrix`` must be finite)."""
    return torch.linalg.svd(matrix, full_matrices=full_matrices, driver=torch_driver(driver))


def refactor_dense(
    matrix: torch.Tensor,
    rank: int,
    *,
    driver: str | None = None,
    full_matrices: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of a dense merged delta, which it may overwrite.

    ``driver=None`` uses :func:`gram_svd` where the shorter side ``m`` of ``matrix`` is at most
    ``8 l`` and ``2 m^2 <= l * max(d, k)`` (``l``: the range finder's width): there it needs less
    memory than the range finder's ``max(d, k) x l`` float64 bases, and no more arithmetic;
    elsewhere :func:`randomized_svd`. Any other driver uses :func:`dense_svd` (with
    ``full_matrices``, which changes nothing kept beyond rounding). Non-finite entries are
    zeroed in place before the factorisation and make the whole result NaN.
    """
    finite = _finite_flag(matrix)
    torch.nan_to_num_(matrix, nan=0.0, posinf=0.0, neginf=0.0)
    if driver is None and _gram_is_cheaper(*matrix.shape, rank):
        u, s, vh = gram_svd(matrix, rank)
    elif driver is None:
        u, s, vh = randomized_svd(matrix, rank)
    else:
        u, s, vh = dense_svd(matrix, full_matrices=full_matrices, driver=driver)
    for x in (u, s, vh):  # in place, without reading the flag on the host
        x.masked_fill_(~finite, math.nan)
    return u, s, vh


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation), for inputs of any size."""
    if values.numel() <= _QUANTILE_LIMIT:
        return torch.quantile(values, q)
    position = q * (values.numel() - 1)
    below = int(math.floor(position))
    above = min(below + 1, values.numel() - 1)
    lo = torch.kthvalue(values, below + 1).values
    hi = torch.kthvalue(values, above + 1).values
    return torch.lerp(lo, hi, position - below)


def peft_factors(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    *,
    clamp: float | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` from an SVD, in PEFT's layout.

    ``lora_B = U[:, :rank] @ diag(S[:rank])`` and ``lora_A = Vh[:rank]``; with ``clamp``, both are
    clamped to ``[-h, h]`` where ``h`` is the ``clamp`` quantile of all their entries together.
    Singular triplets missing for a rank above ``min(d, k, sum of ranks)`` are zero columns of
    ``lora_B`` and zero rows of ``lora_A`` (they are zero singular values).

    Args:
        dtype: dtype of the results (default: that of ``u``).
    """
    keep = min(rank, s.numel())
    lora_b = u[:, :keep] @ torch.diag(s[:keep])
    lora_a = vh[:keep, :]
    if keep < rank:
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - keep)], dim=1)
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - keep, lora_a.shape[1])], dim=0)
    if clamp is not None:
        high = _quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), clamp)
        lora_b = lora_b.clamp(-high, high)
        lora_a = lora_a.clamp(-high, high)
    if dtype is not None:
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
    return lora_a.contiguous(), lora_b.contiguous()
