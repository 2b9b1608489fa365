"""The merge strategies as classes, as the LoRAX server's ``strategy_registry`` holds them.

Every row of the strategy table (``lorax_merge.strategy_table``) is a class here, named after
the strategy (``ties`` -> ``TiesMerge``) and registered in ``strategy_registry`` under the
strategy's name; ``merge`` is one call into the fused merge op. The constructor takes the
parameters the strategy uses, in this order: ``density`` (required) when it prunes,
``majority_sign_method="total"`` when it elects a sign, ``seed=None`` when it prunes at random:
``LinearMerge()``, ``TiesMerge(density, majority_sign_method="total")``,
``DareLinearMerge(density, seed=None)``, ``DareTiesMerge(density, majority_sign_method="total",
seed=None)``, ``MagnitudePruneMerge(density)``.

Constructors accept and ignore unknown keyword arguments: the LoRAX server builds every
strategy with ``density=`` and ``majority_sign_method=`` whatever it is.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ._validation import check_density, check_majority_sign_method
from .api import merge
from .seeds import check_seed
from .strategy_table import STRATEGIES, StrategySpec


class MergeStrategy(ABC):
    """Merges the task tensors of one module into one tensor."""

    @abstractmethod
    def merge(
        self, task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]
    ) -> torch.Tensor:
        """Merge ``task_tensors`` with one weight per task (see ``lorax_merge.merge``)."""


_Parameter = inspect.Parameter


def _signature(spec: StrategySpec) -> inspect.Signature:
    """The constructor's parameters: those the strategy uses, then ``**kwargs`` (ignored)."""
    params = []
    if spec.uses_density:
        params.append(_Parameter("density", _Parameter.POSITIONAL_OR_KEYWORD, annotation="float"))
    if spec.elects_sign:
        params.append(
            _Parameter(
                "majority_sign_method",
                _Parameter.POSITIONAL_OR_KEYWORD,
                default="total",
                annotation="str",
            )
        )
    if spec.is_random:
        params.append(
            _Parameter(
                "seed", _Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation="int | None"
            )
        )
    params.append(_Parameter("kwargs", _Parameter.VAR_KEYWORD, annotation="Any"))
    return inspect.Signature(params)


class _FusedStrategy(MergeStrategy):
    """A strategy of the table: its parameters, checked, and one call to ``merge``."""

    spec: ClassVar[StrategySpec]
    name: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = self.__signature__.bind(*args, **kwargs).arguments
        self.density = check_density(given["density"]) if "density" in given else 1.0
        self.majority_sign_method = check_majority_sign_method(
            given.get("majority_sign_method", "total")
        )
        self.seed = check_seed(given.get("seed"))

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
        shown = [
            f"{param}={getattr(self, param)!r}"
            for param in self.__signature__.parameters
            if param != "kwargs"
        ]
        return f"{type(self).__name__}({', '.join(shown)})"


def _strategy_class(spec: StrategySpec) -> type[MergeStrategy]:
    return type(
        spec.class_name,
        (_FusedStrategy,),
        {
            "__doc__": f"The ``{spec.name}`` strategy: {spec.description}.",
            "__module__": __name__,
            "__qualname__": spec.class_name,
            "__signature__": _signature(spec),
            "spec": spec,
            "name": spec.name,
        },
    )


#: Every factor-space strategy of the table by name, as the LoRAX server's ``strategy_registry``.
strategy_registry: dict[str, type[MergeStrategy]] = {
    name: _strategy_class(spec) for name, spec in STRATEGIES.items() if spec.space == "factor"
}

# The classes are public under their own names: LinearMerge, TiesMerge, DareLinearMerge, ...
globals().update({cls.__name__: cls for cls in strategy_registry.values()})

__all__ = [
    "MergeStrategy",
    "strategy_registry",
    *(cls.__name__ for cls in strategy_registry.values()),
]
