"""Data generators and small utilities shared by the test modules."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from hypothesis import strategies as st

from lorax_merge import utils

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
STRATEGIES = ["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
RANDOM_STRATEGIES = {"dare_linear", "dare_ties"}
ELECTING_STRATEGIES = {"ties", "dare_ties"}

#: a few values whose sums are exact in every dtype: plenty of ties and sign-sum zeros
TIE_VALUES = (-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0)

_DISTINCT_RANGE = {
    # (first, last) bit pattern of the positive normals in [2**-6, 2**6)
    torch.bfloat16: (0x3C80, 0x4280),
    torch.float16: (0x1C00, 0x5800),
}


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def tie_free(shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random signed values whose magnitudes are pairwise distinct in ``dtype``."""
    gen = generator(seed)
    n = 1
    for s in shape:
        n *= s
    if dtype in _DISTINCT_RANGE:
        lo, hi = _DISTINCT_RANGE[dtype]
        assert n <= hi - lo, "too many elements for distinct 16-bit magnitudes"
        bits = (lo + torch.randperm(hi - lo, generator=gen)[:n]).to(torch.int16)
        mags = bits.view(dtype)
        signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
        return (mags * signs).reshape(shape)
    for _ in range(100):
        x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        if torch.unique(x.abs()).numel() == n and bool((x != 0).all()):
            return x.reshape(shape)
    raise AssertionError("could not draw tie-free data")


def tie_heavy(shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values drawn from :data:`TIE_VALUES` (exact in every dtype)."""
    gen = generator(seed)
    values = torch.tensor(TIE_VALUES, dtype=dtype)
    idx = torch.randint(len(TIE_VALUES), tuple(shape), generator=gen)
    return values[idx]


def normal(shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Standard normal values rounded to ``dtype``."""
    return torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float64).to(dtype)


def make_tasks(
    n: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    kind: str = "normal",
    seed: int = 0,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """``n`` task tensors of one kind ("normal", "tie_free", "tie_heavy")."""
    make = {"normal": normal, "tie_free": tie_free, "tie_heavy": tie_heavy}[kind]
    return [make(shape, dtype, seed=seed * 1000 + i).to(device) for i in range(n)]


def random_mask(
    shape: Sequence[int], density: float, seed: int, stream: int = 0, device: str = "cpu"
) -> torch.Tensor:
    """The keep-mask random pruning uses for (seed, stream): prune a tensor of ones."""
    ones = torch.ones(tuple(shape), dtype=torch.float32, device=device)
    return utils.prune(ones, density, "random", rescale=False, seed=seed, stream=stream) != 0


def dare_masks(tasks: Sequence[torch.Tensor], density: float, seed: int) -> list[torch.Tensor]:
    """The keep-masks a DARE merge with ``seed`` applies: task i uses stream i."""
    return [
        random_mask(t.shape, density, seed, i, device=str(t.device)) for i, t in enumerate(tasks)
    ]


@contextmanager
def bernoulli_returns(masks: Sequence[torch.Tensor]) -> Iterator[None]:
    """Make ``torch.bernoulli`` return ``masks`` one after the other (as 0/1 of the input dtype).

    Code that draws DARE masks with ``torch.bernoulli`` (PEFT, the LoRAX server) then prunes the
    entries ``lorax_merge`` prunes for the same seed.
    """
    pending = list(masks)
    original = torch.bernoulli

    def fake(p, *args, **kwargs):
        mask = pending.pop(0)
        assert mask.shape == p.shape
        return mask.to(device=p.device, dtype=p.dtype)

    torch.bernoulli = fake
    try:
        yield
    finally:
        torch.bernoulli = original
    assert not pending, "fewer masks were drawn than expected"


def snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bitwise copies, to check later that inputs were not modified."""
    return [t.detach().clone() for t in tensors]


def assert_unmodified(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> None:
    """Every tensor in ``after`` still holds the bits recorded in ``before``."""
    for i, (b, a) in enumerate(zip(before, after)):
        assert torch.equal(bits(b), bits(a)), f"input {i} was modified"


#: the NaN every merge result holds where it is NaN, as an integer bit pattern per dtype
CANONICAL_NAN_BITS = {
    torch.float32: 0x7FFFFFFF,
    torch.float64: 0x7FFFFFFFFFFFFFFF,
    torch.float16: 0x7FFF,
    torch.bfloat16: 0x7FFF,
}

_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t``'s elements, flat, as a signed integer tensor of their width."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(_INT_OF_SIZE[t.element_size()])


def unsigned_bits(t: torch.Tensor) -> list[int]:
    """The bit patterns of ``t``'s elements as unsigned Python ints (for messages and sets)."""
    width = 8 * t.element_size()
    return [v & ((1 << width) - 1) for v in bits(t.cpu()).tolist()]


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """``got`` has ``expected``'s dtype and shape and the same bits in every element.

    Stricter than ``assert_close(equal_nan=True)``: NaN payloads and the sign of zero count.
    Either tensor may be on any device.
    """
    got_c, exp_c = got.detach().cpu(), expected.detach().cpu()
    assert got_c.dtype == exp_c.dtype, f"{what}: dtype {got_c.dtype} != {exp_c.dtype}"
    assert got_c.shape == exp_c.shape, f"{what}: shape {tuple(got_c.shape)} != {tuple(exp_c.shape)}"
    a, b = bits(got_c), bits(exp_c)
    if torch.equal(a, b):
        return
    differ = (a != b).nonzero().reshape(-1)
    first = differ[:5].tolist()
    digits = 2 * got_c.element_size()
    shown = ", ".join(
        f"[{i}] {unsigned_bits(got_c.reshape(-1)[i : i + 1])[0]:0{digits}x} != "
        f"{unsigned_bits(exp_c.reshape(-1)[i : i + 1])[0]:0{digits}x}"
        for i in first
    )
    raise AssertionError(
        f"{what}: {differ.numel()} of {a.numel()} elements differ in bits: {shown}"
    )


def transposed(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a column-major (for 2-D and more: non-contiguous) layout."""
    dims = list(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


def strided_slice(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding ``t``'s values (every other column of a wider buffer)."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


def merge_kwargs(
    strategy: str, density: float, method: str = "total", seed: int | None = 7
) -> dict:
    """Keyword arguments of :func:`lorax_merge.merge` for a strategy."""
    kw: dict = {"density": density, "majority_sign_method": method}
    if strategy in RANDOM_STRATEGIES:
        kw["seed"] = seed
    return kw


# ---------------------------------------------------------------- hypothesis: small, tame cases
#: largest |value| of ``FINITE`` (products and sums stay far from overflow in every dtype)
MAX_ABS = 100.0
SPECIAL_VALUES = (math.nan, math.inf, -math.inf)


def _flush_tiny(v: float) -> float:
    # keep products and quotients away from subnormals so that exact properties hold
    return 0.0 if abs(v) < 1e-3 else v


FINITE = st.floats(-MAX_ABS, MAX_ABS, allow_nan=False, width=32).map(_flush_tiny)
DENSITY = st.one_of(st.sampled_from([0.0, 1.0, 1.5, 0.29, 0.5]), st.floats(0.01, 0.99))
WEIGHT = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.25, -3.5]),
    st.floats(-10, 10, width=32).map(_flush_tiny),
)
SHAPE = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
SEED = st.integers(0, 2**63 - 1)


@st.composite
def task_data(
    draw, n: int, shape: tuple[int, ...], dtype: torch.dtype, kinds=("finite", "tied", "special")
) -> list[torch.Tensor]:
    """``n`` tensors of ``shape``: finite values, tie-heavy values, or either with NaN/Inf."""
    kind = draw(st.sampled_from(kinds))
    numel = math.prod(shape)
    if kind == "finite":
        elem = FINITE
    elif kind == "tied":
        elem = st.sampled_from(TIE_VALUES)
    else:
        elem = st.one_of(FINITE, st.sampled_from(TIE_VALUES), st.sampled_from(SPECIAL_VALUES))
    tasks = []
    for _ in range(n):
        values = draw(st.lists(elem, min_size=numel, max_size=numel))
        tasks.append(torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape))
    if len(shape) >= 2 and draw(st.booleans()):
        tasks = [transposed(t) for t in tasks]  # same values, column-major memory
    return tasks
