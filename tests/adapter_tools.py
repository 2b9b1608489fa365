"""Shared code of the adapter and command tests: example adapters, PEFT references, digests."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


@cache
def examples() -> ModuleType:
    """``examples/make_example_adapters.py`` as a module (tiny Llama model, adapter builder)."""
    path = ROOT / "examples" / "make_example_adapters.py"
    spec = importlib.util.spec_from_file_location("make_example_adapters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_adapter(path: Path, **kwargs: Any) -> Path:
    """Build a PEFT adapter on the tiny model (see ``make_example_adapters.make_adapter``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return examples().make_adapter(path, **kwargs)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def load_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))


def tree_digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (to prove that inputs are left untouched)."""
    digests = {}
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = Path(dirpath) / name
                if path.is_file():
                    digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """Run ``lorax-merge`` in this process; returns ``(exit code, stdout, stderr)``."""
    from lorax_merge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, stdout: str, stderr: str) -> None:
    """A bad input: exit code 2, nothing on stdout, exactly one line on stderr, no traceback."""
    assert code == 2, (code, stderr)
    assert stdout == ""
    assert stderr.startswith("lorax-merge: error: "), stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


def peft_add_weighted_adapter(
    adapters: Sequence[Path],
    weights: Sequence[float],
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[dict[str, torch.Tensor], Any]:
    """Merge adapter folders with PEFT's own ``add_weighted_adapter`` on the tiny model.

    Returns the merged adapter's state dict (as PEFT saves it) and its ``LoraConfig``.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = examples().build_base_model()
        model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
        names = ["a0"]
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(str(path), adapter_name=f"a{i}")
            names.append(f"a{i}")
        model.add_weighted_adapter(
            names,
            list(weights),
            "merged",
            combination_type=combination_type,
            density=density,
            majority_sign_method=majority_sign_method,
        )
        state = get_peft_model_state_dict(model, adapter_name="merged")
    return {k: v.detach().clone() for k, v in state.items()}, model.peft_config["merged"]
