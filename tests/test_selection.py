"""The magnitude threshold selection on inputs that take each of its paths.

The CPU selection brackets the threshold with a sample and resolves it from one scan; an
unlucky bracket or a heavily tied one falls back to radix passes over the data. Both must
give exactly the stable-sort order of the reference, whatever the data looks like.
"""

from __future__ import annotations

import pytest
import torch
from reference import magnitude_keep_mask

from lorax_merge import utils

DENSITIES = (0.0001, 0.3, 0.5, 0.97)


def _data(kind: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, generator=gen).to(dtype)
    if kind == "few values":  # heavy ties at any threshold
        return (torch.randint(-3, 4, (n,), generator=gen) * 0.25).to(dtype)
    if kind == "all equal":  # the sampled bracket holds everything: radix fallback
        return torch.full((n,), -0.75, dtype=dtype)
    if kind == "sorted":  # the sample sees a skewed picture of the order
        return torch.sort(torch.randn(n, generator=gen)).values.to(dtype)
    if kind == "non-finite":
        x = torch.randn(n, generator=gen).to(dtype)
        x[::7] = float("nan")
        x[3::11] = float("inf")
        x[5::13] = -float("inf")
        x[::17] = -0.0
        return x
    raise AssertionError(kind)


def _kept(x: torch.Tensor, density: float) -> torch.Tensor:
    """Where the pruned tensor still holds the input (dropped entries become x * 0)."""
    return utils.prune(x, density, "magnitude") == x


def _visible(x: torch.Tensor) -> torch.Tensor:
    """Entries whose fate shows in the output: a dropped zero or NaN looks like a kept one.
    Zeros rank below and NaNs above everything else, so the visible entries being right
    pins which zeros and NaNs are kept too."""
    return ~torch.isnan(x) & (x != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["gaussian", "few values", "all equal", "sorted", "non-finite"])
@pytest.mark.parametrize("n", [20_011, 150_001, 600_001])  # one chunk; several (threads)
def test_kept_set_is_the_stable_sort_prefix(dtype, kind, n):
    gen = torch.Generator().manual_seed(n)
    x = _data(kind, n, dtype, gen)
    for density in DENSITIES:
        expected = magnitude_keep_mask(x, density)
        got = _kept(x, density)
        visible = _visible(x)
        assert torch.equal(got[visible], expected[visible]), (kind, dtype, n, density)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gaussian", "few values", "sorted"])
def test_kept_set_on_sixteen_million_elements(dtype, kind):
    gen = torch.Generator().manual_seed(7)
    x = _data(kind, 1 << 24, dtype, gen)
    visible = _visible(x)
    for density in (0.1, 0.5):
        expected = magnitude_keep_mask(x, density)
        assert torch.equal(_kept(x, density)[visible], expected[visible])
