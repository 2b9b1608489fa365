"""The LoRAX merge strategies, each one call into the fused merge op.

Constructors accept and ignore unknown keyword arguments: the LoRAX server builds every
strategy with ``density=`` and ``majority_sign_method=`` whatever it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ._validation import check_density, check_majority_sign_method
from .api import merge
from .seeds import check_seed

__all__ = [
    "MergeStrategy",
    "LinearMerge",
    "TiesMerge",
    "DareLinearMerge",
    "DareTiesMerge",
    "MagnitudePruneMerge",
    "strategy_registry",
]


class MergeStrategy(ABC):
    """Merges the task tensors of one module into one tensor."""

    @abstractmethod
    def merge(
        self, task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]
    ) -> torch.Tensor:
        """Merge ``task_tensors`` with one weight per task (see ``lorax_merge.merge``)."""


class _FusedStrategy(MergeStrategy):
    name: ClassVar[str]

    def __init__(
        self,
        density: float = 1.0,
        majority_sign_method: str = "total",
        seed: int | None = None,
    ) -> None:
        self.density = check_density(density)
        self.majority_sign_method = check_majority_sign_method(majority_sign_method)
        self.seed = check_seed(seed)

    def merge(
        self, task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]
    ) -> torch.Tensor:
        return merge(
            task_tensors,
            weights,
            self.name,
            density=self.density,
            majority_sign_method=self.majority_sign_method,
            seed=self.seed,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(density={self.density}, method={self.majority_sign_method!r})"
        )


class LinearMerge(_FusedStrategy):
    """Weighted sum: sum_i w_i * t_i."""

    name = "linear"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()


class TiesMerge(_FusedStrategy):
    """TIES: magnitude pruning to ``density``, sign election, disjoint merge."""

    name = "ties"

    def __init__(self, density: float, majority_sign_method: str = "total", **kwargs: Any) -> None:
        super().__init__(density, majority_sign_method)


class DareLinearMerge(_FusedStrategy):
    """DARE: random pruning to ``density`` with 1/density rescale, then weighted sum."""

    name = "dare_linear"

    def __init__(self, density: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(density, seed=seed)


class DareTiesMerge(_FusedStrategy):
    """DARE-TIES: random pruning with rescale, sign election, disjoint merge."""

    name = "dare_ties"

    def __init__(
        self,
        density: float,
        majority_sign_method: str = "total",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(density, majority_sign_method, seed)


class MagnitudePruneMerge(_FusedStrategy):
    """Magnitude pruning to ``density``, then weighted sum."""

    name = "magnitude_prune"

    def __init__(self, density: float, **kwargs: Any) -> None:
        super().__init__(density)


strategy_registry: dict[str, type[MergeStrategy]] = {
    cls.name: cls
    for cls in (LinearMerge, TiesMerge, DareLinearMerge, DareTiesMerge, MagnitudePruneMerge)
}
