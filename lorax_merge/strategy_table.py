"""The one table of merge strategies.

Every strategy is a row: where it merges (the LoRA factors element by element, as the LoRAX
server does, or the adapters' products ``s·B·A``), how it prunes, whether it elects a sign,
and how a delta-space result is turned back into LoRA factors. Everything that needs to know
strategy names (the registry, ``merge``'s checks, the command's choices, the docs' lists)
reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pruning = Literal["none", "magnitude", "random"]
Space = Literal["factor", "delta"]
Refactor = Literal["none", "concat", "svd"]

__all__ = [
    "LINEAR",
    "SVD",
    "StrategySpec",
    "STRATEGIES",
    "fused_strategy",
    "strategy_names",
]

#: The plain weighted sum (no pruning, no sign election): the default strategy of every API,
#: and what a PEFT-weighted merge of a single adapter reduces to.
LINEAR = "linear"
#: The exact weighted sum of the adapters' deltas truncated by an SVD: the default
#: ``combination_type`` of PEFT's ``add_weighted_adapter`` and of the delta-space APIs.
SVD = "svd"


@dataclass(frozen=True)
class StrategySpec:
    """Where a strategy sits in (space x pruning x sign election x re-factoring).

    Attributes:
        name: the strategy's name in every API.
        pruning: ``"none"``, ``"magnitude"`` (top-k of |x|) or ``"random"`` (DARE).
        elects_sign: whether a majority sign is elected and a disjoint merge done.
        rescale: whether kept entries of a random pruning are divided by the density.
        space: ``"factor"`` merges ``lora_A`` and ``lora_B`` element by element;
            ``"delta"`` merges the products ``s·B·A`` and re-factors the result.
        refactor: how a delta-space result becomes LoRA factors: ``"concat"`` (exact, rank
            is the sum of the ranks) or ``"svd"`` (rank-r truncation); ``"none"`` in factor
            space.
        in_server: part of the LoRAX server's ``strategy_registry``.
        in_peft: a ``combination_type`` of PEFT's ``add_weighted_adapter``.
    """

    name: str
    pruning: Pruning
    elects_sign: bool
    rescale: bool
    space: Space = "factor"
    refactor: Refactor = "none"
    in_server: bool = False
    in_peft: bool = False

    @property
    def is_random(self) -> bool:
        """Random pruning: the merge needs a seed."""
        return self.pruning == "random"

    @property
    def uses_density(self) -> bool:
        """Pruning: the merge reads ``density``."""
        return self.pruning != "none"

    @property
    def uses_svd(self) -> bool:
        """Re-factoring by a truncated SVD: the merge reads ``rank`` and ``svd_driver``."""
        return self.refactor == "svd"

    @property
    def class_name(self) -> str:
        """Name of the strategy's class in ``lorax_merge.strategies`` (``TiesMerge``)."""
        return "".join(part.capitalize() for part in self.name.split("_")) + "Merge"

    @property
    def description(self) -> str:
        """What the strategy does, in words (the docstring of its class)."""
        steps = {
            "none": [],
            "magnitude": ["magnitude pruning to ``density``"],
            "random": ["random pruning to ``density``"],
        }[self.pruning]
        if self.rescale:
            steps.append("kept entries rescaled by 1/density")
        steps.append("sign election and disjoint merge" if self.elects_sign else "weighted sum")
        return ", ".join(steps)


_ROWS = (
    # name                    pruning      elects rescale space    refactor  server peft
    StrategySpec(LINEAR, "none", False, False, "factor", "none", True, True),
    StrategySpec("ties", "magnitude", True, False, "factor", "none", True, True),
    StrategySpec("dare_linear", "random", False, True, "factor", "none", True, True),
    StrategySpec("dare_ties", "random", True, True, "factor", "none", True, True),
    StrategySpec("magnitude_prune", "magnitude", False, False, "factor", "none", False, True),
    StrategySpec("cat", "none", False, False, "delta", "concat", False, True),
    StrategySpec("svd", "none", False, False, "delta", "svd", False, True),
    StrategySpec("ties_svd", "magnitude", True, False, "delta", "svd", False, True),
    StrategySpec("dare_linear_svd", "random", False, True, "delta", "svd", False, True),
    StrategySpec("dare_ties_svd", "random", True, True, "delta", "svd", False, True),
    StrategySpec("magnitude_prune_svd", "magnitude", False, False, "delta", "svd", False, True),
)

#: Every strategy by name, in the order the docs list them. The LoRAX server's strategies come
#: first, in the order of its ``MergeStrategy`` enum (their protobuf values).
STRATEGIES: dict[str, StrategySpec] = {row.name: row for row in _ROWS}


def strategy_names(
    *,
    space: Space | None = None,
    in_server: bool | None = None,
    in_peft: bool | None = None,
    random: bool | None = None,
) -> tuple[str, ...]:
    """Names of the strategies that match every given filter, in table order."""
    return tuple(
        s.name
        for s in STRATEGIES.values()
        if (space is None or s.space == space)
        and (in_server is None or s.in_server == in_server)
        and (in_peft is None or s.in_peft == in_peft)
        and (random is None or s.is_random == random)
    )


def fused_strategy(name: str) -> str:
    """The factor-space strategy whose element-wise rule a strategy applies.

    A delta-space strategy merges the adapters' deltas with the fused kernel of the
    factor-space row that prunes, elects and rescales as it does (``ties_svd`` -> ``ties``,
    ``svd`` and ``cat`` -> ``linear``); a factor-space strategy is its own.
    """
    spec = STRATEGIES[name]
    for row in _ROWS:
        if row.space == "factor" and (row.pruning, row.elects_sign, row.rescale) == (
            spec.pruning,
            spec.elects_sign,
            spec.rescale,
        ):
            return row.name
    raise ValueError(f"strategy {name!r} has no factor-space rule")
