"""Slow, plain-PyTorch reference implementation of the merge semantics.

Everything here is written from the specification of ``lorax_merge`` (see the
README's semantics table), element by element and task by task, without any
attempt at speed.  The tests compare the compiled kernels against it, and the
property-based suites draw arbitrary inputs and check the kernels against it.

Conventions shared by every function:

* A task tensor is read in its *logical* row-major order (``reshape(-1)``),
  whatever its strides.
* Tasks of different dtypes are first converted (exactly) to their common
  dtype, ``torch.promote_types`` over all of them; "the task dtype" is that one.
* The pruned value ``v`` of an element is computed in the task dtype: a kept
  element is ``x`` (or ``x / density`` rounded to the task dtype for random
  pruning with rescale), a dropped element is ``x * 0`` (``+-0`` for finite
  ``x``, NaN for Inf/NaN ``x``, exactly what ``tensor * mask`` gives upstream).
* Weighted values, sign sums and the final sum are accumulated in the
  accumulate type (float32, or float64 when the tasks or the result are
  float64), adding task after task in index order, then rounded once to the
  result dtype.
* Random (DARE) masks cannot be generated here (the counter-based generator
  lives in the extension); they are passed in explicitly as boolean tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: strategy name -> (pruning method or None, whether signs are elected)
STRATEGY_TABLE: dict[str, tuple[str | None, bool]] = {
    "linear": (None, False),
    "magnitude_prune": ("magnitude", False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
}


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def weights_as_tensor(weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Weights as a 1-D CPU tensor; a sequence of floats becomes float32."""
    if isinstance(weights, torch.Tensor):
        return weights.detach().to("cpu").reshape(-1)
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def result_dtype(
    task_dtype: torch.dtype,
    weights: torch.Tensor | Sequence[float],
    out_dtype: torch.dtype | None = None,
) -> torch.dtype:
    """The dtype of a merge result: ``out_dtype`` or promote(task, weights)."""
    if out_dtype is not None:
        return out_dtype
    return torch.promote_types(task_dtype, weights_as_tensor(weights).dtype)


def magnitude_keep_count(numel: int, density: float) -> int:
    """Number of entries magnitude pruning keeps: ``int(density * numel)``."""
    if density >= 1:
        return numel
    return int(density * numel)


def magnitude_keep_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of the entries magnitude pruning keeps.

    The order is a stable descending sort on ``|x|`` with NaN above +Inf and
    +0 equal to -0: among equal magnitudes the lower flat index comes first.
    It is built from two stable sorts: first by magnitude (NaN replaced by 0),
    then by "is NaN", which moves every NaN to the front while keeping each
    class in its previous order.
    """
    flat = x.detach().to("cpu").reshape(-1)
    n = flat.numel()
    k = magnitude_keep_count(n, density)
    keep = torch.zeros(n, dtype=torch.bool)
    if k == 0 or n == 0:
        return keep.reshape(x.shape)
    mag = flat.to(torch.float64).abs()  # exact for every supported dtype; -0 -> +0
    is_nan = torch.isnan(mag)
    mag = torch.where(is_nan, torch.zeros_like(mag), mag)
    order = torch.sort(mag, descending=True, stable=True).indices
    nan_first = torch.sort(is_nan[order].to(torch.int8), descending=True, stable=True).indices
    order = order[nan_first]
    keep[order[:k]] = True
    return keep.reshape(x.shape)


def _dropped(x: torch.Tensor) -> torch.Tensor:
    """The value of a dropped entry: ``x * 0`` in the task dtype."""
    return x * 0


def rescale(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x / density`` rounded to ``x.dtype``.

    The quotient is computed in float32 (float64 for float64 tasks) with
    density rounded to that type, which is what ``x / density`` does in PyTorch
    for a Python float on the CPU; a tensor-by-tensor division is used so that
    no reciprocal shortcut can creep in.
    """
    if x.dtype == torch.float64:
        return x / torch.tensor(density, dtype=torch.float64)
    return (x.to(torch.float32) / torch.tensor(density, dtype=torch.float32)).to(x.dtype)


def reference_prune_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude pruning of one tensor (result on the CPU, dtype of ``x``)."""
    x = x.detach().to("cpu")
    if density >= 1:
        return x.clone()
    keep = magnitude_keep_mask(x, density)
    return torch.where(keep, x, _dropped(x))


def reference_prune_random(
    x: torch.Tensor, density: float, rescale_kept: bool, mask: torch.Tensor
) -> torch.Tensor:
    """Random pruning of one tensor with an explicit boolean keep-``mask``."""
    x = x.detach().to("cpu")
    if density >= 1:
        return x.clone()
    mask = mask.to("cpu").to(torch.bool).reshape(x.shape)
    kept = rescale(x, density) if rescale_kept and density > 0 else x
    return torch.where(mask, kept, _dropped(x))


def reference_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(NaN) = NaN and sign(+-0) = 0 (same dtype as ``x``)."""
    s = torch.sign(x)
    return torch.where(torch.isnan(x), x, s)


def reference_majority_sign(
    values: Sequence[torch.Tensor], method: str, acc: torch.dtype
) -> torch.Tensor:
    """Elected sign (+1/-1, dtype ``acc``) from unweighted pruned values.

    total: S = sum_i v_i; frequency: S = sum_i sign(v_i); both accumulated in
    ``acc`` task after task.  The majority is +1 where S >= 0, else -1 (so a
    NaN sum elects -1).
    """
    if method not in ("total", "frequency"):
        raise ValueError(f"unknown method {method!r}")
    total = torch.zeros(values[0].shape, dtype=acc)
    for v in values:
        term = v.to(acc) if method == "total" else reference_sign(v).to(acc)
        total = total + term
    one = torch.ones((), dtype=acc)
    return torch.where(total >= 0, one, -one)


def reference_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """calculate_majority_sign_mask: bool tensor of ``stacked``'s shape."""
    stacked = stacked.detach().to("cpu")
    acc = accumulate_dtype(stacked.dtype)
    majority = reference_majority_sign(list(stacked.unbind(0)), method, acc)
    return reference_sign(stacked).to(acc) == majority


def disjoint_result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Result dtype of disjoint_merge: promote(dtype, float32)."""
    return torch.promote_types(dtype, torch.float32)


def reference_disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """disjoint_merge: sum_i (mask_i ? x_i : x_i * 0) / max(count, 1).

    Accumulated in float32 (float64 for float64 input).  The result dtype is
    what the upstream expression ``sum / clamp(int_count, min=1.0)`` gives:
    the clamp makes the divisor a float32 tensor, so the result is float32
    (float64 for float64 input), also for 16-bit input.
    """
    stacked = stacked.detach().to("cpu")
    mask = mask.to("cpu").to(torch.bool)
    acc = accumulate_dtype(stacked.dtype)
    total = torch.zeros(stacked.shape[1:], dtype=acc)
    count = torch.zeros(stacked.shape[1:], dtype=acc)
    for x, m in zip(stacked.unbind(0), mask.unbind(0)):
        x = x.to(acc)
        total = total + torch.where(m, x, x * 0)
        count = count + m.to(acc)
    return (total / torch.clamp(count, min=1)).to(disjoint_result_dtype(stacked.dtype))


@dataclass
class ReferenceMerge:
    """A reference merge result with what is needed to judge rounding."""

    out: torch.Tensor  #: the result, in the result dtype
    exact: torch.Tensor  #: the result before the final rounding (accumulate type)
    abs_sum: torch.Tensor  #: sum_i |p_i| over the summed terms (accumulate type)
    count: torch.Tensor  #: divisor of the disjoint merge (1 without election)
    n_terms: int  #: number of terms summed per element
    acc: torch.dtype  #: accumulate type


def reference_merge_detailed(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    strategy: str = "linear",
    density: float = 1.0,
    method: str = "total",
    masks: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> ReferenceMerge:
    """Reference merge; see :func:`reference_merge`."""
    if strategy not in STRATEGY_TABLE:
        raise ValueError(f"unknown strategy {strategy!r}")
    pruning, elect = STRATEGY_TABLE[strategy]
    # tasks of different dtypes are merged in their common dtype, as torch.stack promotes them
    common = functools.reduce(torch.promote_types, (t.dtype for t in tasks))
    tasks = [t.detach().to("cpu", common) for t in tasks]
    w = weights_as_tensor(weights)
    res = result_dtype(common, w, out_dtype)
    acc = accumulate_dtype(tasks[0].dtype, res)
    w = w.to(acc)

    if pruning == "random" and density < 1:
        if masks is None:
            raise ValueError("random pruning needs explicit masks")
        values = [reference_prune_random(t, density, True, m) for t, m in zip(tasks, masks)]
    elif pruning == "magnitude":
        values = [reference_prune_magnitude(t, density) for t in tasks]
    else:
        values = tasks

    shape = tasks[0].shape
    products = [v.to(acc) * w[i] for i, v in enumerate(values)]
    total = torch.zeros(shape, dtype=acc)
    abs_sum = torch.zeros(shape, dtype=acc)
    count = torch.ones(shape, dtype=acc)
    if elect:
        # The vote sums the unweighted values in the tasks' own accumulate type, whatever
        # the weights or the result widen the weighted sums to.
        majority = reference_majority_sign(values, method, accumulate_dtype(common)).to(acc)
        count = torch.zeros(shape, dtype=acc)
        for v, p in zip(values, products):
            agree = reference_sign(v).to(acc) == majority
            total = total + torch.where(agree, p, p * 0)
            abs_sum = abs_sum + torch.where(agree, p.abs(), torch.zeros_like(p))
            count = count + agree.to(acc)
        count = torch.clamp(count, min=1)
        exact = total / count
    else:
        for p in products:
            total = total + p
            abs_sum = abs_sum + p.abs()
        exact = total
    return ReferenceMerge(
        out=exact.to(res),
        exact=exact,
        abs_sum=abs_sum,
        count=count,
        n_terms=len(products),
        acc=acc,
    )


def reference_merge(
    tasks: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    strategy: str = "linear",
    density: float = 1.0,
    method: str = "total",
    masks: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge ``tasks`` with ``weights`` following the specification exactly.

    ``masks`` (one boolean keep-mask per task) is required for the DARE
    strategies when ``density < 1``; it is ignored otherwise.  The result is a
    CPU tensor of the result dtype (``out_dtype`` or promote(task, weights)).
    """
    return reference_merge_detailed(tasks, weights, strategy, density, method, masks, out_dtype).out


def merge_tolerance(ref: ReferenceMerge, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Largest admissible |got - expected| per element for a merge.

    Two correct implementations may differ in (a) the accumulation: order of
    the additions, fused multiply-adds, vector lanes, each contributing at most
    about ``n * eps_acc * sum|p_i|`` (divided by the disjoint-merge count), and
    (b) the final rounding to the result dtype, at most one ulp of that dtype
    when the values before rounding differ.  A small absolute term covers
    results that land in the subnormal range of a 16-bit result.
    """
    dtype = out_dtype or ref.out.dtype
    eps_acc = torch.finfo(ref.acc).eps
    eps_out = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).smallest_normal
    accum = 2 * max(ref.n_terms, 1) * eps_acc * ref.abs_sum / ref.count
    rounding = eps_out * (ref.exact.abs() + accum)
    return (accum + rounding + tiny).to(torch.float64)


def assert_matches(
    got: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float = 0.0, what: str = ""
) -> None:
    """Elementwise check: NaN where expected is NaN, same infinities, and
    ``|got - expected| <= tol`` elsewhere (``tol = 0`` means equal values)."""
    got_c = got.detach().to("cpu")
    exp_c = expected.detach().to("cpu")
    assert got_c.shape == exp_c.shape, f"{what}: shape {tuple(got_c.shape)} != {tuple(exp_c.shape)}"
    assert got_c.dtype == exp_c.dtype, f"{what}: dtype {got_c.dtype} != {exp_c.dtype}"
    g = got_c.to(torch.float64)
    e = exp_c.to(torch.float64)
    nan_e, nan_g = torch.isnan(e), torch.isnan(g)
    bad = nan_e != nan_g
    inf_e = torch.isinf(e)
    bad |= inf_e & (g != e)
    finite = ~nan_e & ~inf_e
    tol_t = torch.as_tensor(tol, dtype=torch.float64).to("cpu")
    diff = torch.where(finite, (g - e).abs(), torch.zeros_like(e))
    bad |= finite & ~(diff <= tol_t)  # also catches an infinite or NaN got
    if bool(bad.any()):
        idx = torch.nonzero(bad.reshape(-1)).reshape(-1)[:8].tolist()
        gf, ef = g.reshape(-1), e.reshape(-1)
        tf = torch.broadcast_to(tol_t, e.shape).reshape(-1)
        details = ", ".join(
            f"[{i}] got {gf[i].item()!r} expected {ef[i].item()!r} tol {tf[i].item():.3g}"
            for i in idx
        )
        raise AssertionError(f"{what}: {int(bad.sum())} of {e.numel()} elements differ: {details}")


def assert_merge_matches(
    got: torch.Tensor, ref: ReferenceMerge, what: str = "", extra_tol: torch.Tensor | float = 0.0
) -> None:
    """Compare a merge result with a detailed reference within the rounding bound."""
    assert_matches(got, ref.out, merge_tolerance(ref) + extra_tol, what)
