"""Seeds of the random (DARE) pruning: one rule for every API.

A seed is any Python int; only its value modulo 2**64 matters (the kernels' generator is keyed
by 64 bits), so ``-1`` and ``2**64 - 1`` are the same seed. ``None`` draws a seed from torch's
default CPU generator (``torch.manual_seed`` makes runs reproducible). Seeds this module derives
or draws lie in ``[0, MAX_SEED]``.

* ``merge`` uses its seed as is; task ``i`` draws from random stream ``i``.
* ``merge_many`` with one seed gives group ``g`` the seed ``derive_group_seed(seed, g)``.
* ``merge_adapters`` (and ``lorax-merge``) give tensor ``name`` the seed
  ``derive_tensor_seed(seed, name)``.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings

import torch

from ._validation import describe

__all__ = [
    "MAX_SEED",
    "derive_group_seed",
    "derive_seed",
    "derive_tensor_seed",
    "draw_seed",
]

#: The largest seed that ``draw_seed`` and the derivations return (63-bit non-negative ints).
MAX_SEED = (1 << 63) - 1
#: Random streams are non-negative 63-bit ints.
MAX_STREAM = MAX_SEED

_MASK64 = (1 << 64) - 1
_TENSOR_SEED_PERSON = b"lorax-merge/seed"  # blake2b personalisation string (16 bytes)


def check_seed(seed: object, arg: str = "seed") -> int | None:
    """``seed`` as an int (any value: only its value modulo 2**64 is used), or None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{arg} must be an int or None, got {describe(seed)}")
    return int(seed)


def check_stream(stream: object) -> int:
    """``stream`` as an int in ``[0, 2**63)``."""
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral):
        raise TypeError(f"stream must be an int, got {describe(stream)}")
    if not 0 <= int(stream) <= MAX_STREAM:
        raise ValueError(f"stream must be in [0, 2**63), got {stream}")
    return int(stream)


def draw_seed() -> int:
    """A fresh seed in ``[0, MAX_SEED]`` from torch's default CPU generator.

    ``torch.manual_seed`` fixes it, so a merge with ``seed=None`` is reproducible.
    """
    return int(torch.empty((), dtype=torch.int64, device="cpu").random_().item())


def seed_or_drawn(seed: int | None) -> int:
    """``seed``, or a drawn one when it is None."""
    return draw_seed() if seed is None else seed


def op_seed(seed: int) -> int:
    """Any Python int as the ops' signed 64-bit seed argument (the same 64 bits)."""
    seed &= _MASK64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_group_seed(seed: int, index: int) -> int:
    """The seed of group ``index`` of a ``merge_many`` call given one ``seed`` for all groups.

    ``splitmix64(splitmix64(seed mod 2**64) xor (index mod 2**64)) >> 1``, in
    ``[0, MAX_SEED]``: stable across versions, platforms and devices.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


def derive_seed(seed: int, index: int) -> int:
    """Deprecated name of :func:`derive_group_seed`; it will be removed in lorax_merge 0.3."""
    warnings.warn(
        "lorax_merge.derive_seed is deprecated; use lorax_merge.derive_group_seed",
        DeprecationWarning,
        stacklevel=2,
    )
    return derive_group_seed(seed, index)


def derive_tensor_seed(seed: int, name: str) -> int:
    """The seed of the tensor ``name`` of an adapter merged with ``seed``.

    The derivation is stable across processes, platforms and versions of this package::

        digest = blake2b((seed % 2**64).to_bytes(8, "little") + name.encode("utf-8"),
                         digest_size=8, person=b"lorax-merge/seed")
        tensor_seed = int.from_bytes(digest, "little") & (2**63 - 1)

    Args:
        seed: the merge seed, any int (as everywhere, only its value modulo 2**64 counts).
        name: the tensor's name in the adapter state dict.

    Returns:
        An int in ``[0, MAX_SEED]``.

    Raises:
        TypeError: if ``seed`` is not an int or ``name`` is not a string.
    """
    if seed is None:
        raise TypeError("seed must be an int, got None")
    seed = check_seed(seed)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {describe(name)}")
    digest = hashlib.blake2b(
        (seed & _MASK64).to_bytes(8, "little") + name.encode("utf-8"),
        digest_size=8,
        person=_TENSOR_SEED_PERSON,
    ).digest()
    return int.from_bytes(digest, "little") & MAX_SEED
