"""Fast, exact merging of LoRA adapters with the LoRAX strategies (linear, TIES, DARE).

The work runs in compiled ops (``torch.ops.lorax_merge``) with a CPU and a CUDA kernel each;
this package is the thin Python layer: argument checks, dtype rules and the strategy
registry.
"""

from . import (
    _ops,  # noqa: F401  (registers the ops before anything uses them)
    strategies,
    utils,
)
from .adapters import derive_tensor_seed, merge_adapter_configs, merge_adapters
from .api import build_info, derive_seed, draw_seed, merge, merge_many
from .strategies import MergeStrategy, strategy_registry

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``lorax_merge.peft`` (the PEFT drop-in) is imported on first use: it imports PEFT.
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "build_info",
    "derive_seed",
    "derive_tensor_seed",
    "draw_seed",
    "merge",
    "merge_adapter_configs",
    "merge_adapters",
    "merge_many",
    "strategies",
    "strategy_registry",
    "utils",
    "MergeStrategy",
]
