"""Fast, exact merging of LoRA adapters with the LoRAX strategies (linear, TIES, DARE).

The work runs in compiled ops (``torch.ops.lorax_merge``) with a CPU and a CUDA kernel each.
The Python package around them converts arguments and names bad ones (``api``, ``utils``),
holds the strategy table and the strategy classes (``strategy_table``, ``strategies``), the seed
rule (``seeds``), whole-adapter merging (``adapters``, ``adapter_configs``), the LoRAX server
drop-in (``lorax_server``), the ``lorax-merge`` command (``cli``), delta-space merging (``delta``,
``lowrank``, ``delta_adapters``) and the PEFT ``add_weighted_adapter`` drop-in (``peft``).
"""

from . import (  # noqa: I001  (_cli_startup must come first)
    _cli_startup,  # noqa: F401  (first: Ctrl-C while the command still loads torch)
    _autograd,  # noqa: F401  (registers the derivative formulas of the ops)
    _ops,  # noqa: F401  (registers the ops before anything uses them)
    strategies,
    utils,
)
from .adapter_configs import merge_adapter_configs
from .adapters import merge_adapters
from .api import build_info, merge, merge_many
from .learn import LearnedWeights, learn_weights
from .seeds import derive_group_seed, derive_seed, derive_tensor_seed, draw_seed
from .strategies import MergeStrategy, strategy_registry

__version__ = "0.1.0"


# Submodules imported on first use, so that ``import lorax_merge`` stays light (``peft``
# imports PEFT) and ``lorax_merge.delta_adapters.merge_adapters_delta(...)`` works as written.
_ON_FIRST_USE = frozenset({"cli", "delta", "delta_adapters", "lorax_server", "lowrank", "peft"})


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "build_info",
    "derive_group_seed",
    "derive_seed",
    "derive_tensor_seed",
    "draw_seed",
    "learn_weights",
    "merge",
    "merge_adapter_configs",
    "merge_adapters",
    "merge_many",
    "strategies",
    "strategy_registry",
    "utils",
    "LearnedWeights",
    "MergeStrategy",
]
