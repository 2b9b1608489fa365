"""The strategy table is the one place that knows strategy names and their properties."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import lorax_merge
from lorax_merge import lorax_server, strategies
from lorax_merge.strategy_table import LINEAR, STRATEGIES, strategy_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lorax_merge"


def _strings(path: Path) -> set[str]:
    """The string constants of a module, docstrings aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    }


def test_each_strategy_name_is_written_in_one_module_only():
    modules = {
        path.relative_to(PACKAGE).as_posix(): _strings(path)
        for path in sorted(PACKAGE.rglob("*.py"))  # the cli package's modules too
    }
    for name in STRATEGIES:
        holders = [module for module, strings in modules.items() if name in strings]
        assert holders == ["strategy_table.py"], f"{name!r} is written in {holders}"


#: the strategies that merge LoRA factors element by element: the registry and merge take
#: these; the delta-space ones are lorax_merge.delta's (the command takes both)
FACTOR_SPACE = strategy_names(space="factor")


def test_the_registry_holds_one_class_per_factor_space_row():
    assert tuple(strategies.strategy_registry) == FACTOR_SPACE
    for name, cls in strategies.strategy_registry.items():
        assert cls.name == name and cls.spec is STRATEGIES[name]
        assert getattr(strategies, cls.__name__) is cls
        assert cls.__name__ in strategies.__all__
        assert issubclass(cls, strategies.MergeStrategy)


@pytest.mark.parametrize("name", FACTOR_SPACE)
def test_constructors_take_the_parameters_their_row_uses(name):
    spec, cls = STRATEGIES[name], strategies.strategy_registry[name]
    params = inspect.signature(cls).parameters
    expected = [
        p
        for p, used in (
            ("density", spec.uses_density),
            ("majority_sign_method", spec.elects_sign),
            ("seed", spec.is_random),
        )
        if used
    ]
    assert list(params) == [*expected, "kwargs"]
    if spec.uses_density:
        assert params["density"].default is inspect.Parameter.empty
        with pytest.raises(TypeError):
            cls()
    values = {"density": 0.5, "majority_sign_method": "frequency", "seed": 3}
    positional = [values[param] for param in expected]
    obj = cls(*positional, unknown_option=1)
    for param, value in zip(expected, positional):
        assert getattr(obj, param) == value
    with pytest.raises(TypeError):
        cls(*positional, "one too many")
    shown = repr(obj)
    assert shown.startswith(cls.__name__ + "(")
    for param in expected:
        assert f"{param}=" in shown


def test_repr_names_the_majority_sign_method():
    assert repr(strategies.TiesMerge(0.5, "frequency")) == (
        "TiesMerge(density=0.5, majority_sign_method='frequency')"
    )


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_a_new_point_of_the_space_is_one_row(monkeypatch, method):
    # sign election without pruning is no strategy today: one row makes it one
    new = type(STRATEGIES[LINEAR])("elected_sum", "none", True, False)
    monkeypatch.setitem(STRATEGIES, new.name, new)
    cls = strategies._strategy_class(new)
    assert cls.__name__ == "ElectedSumMerge"
    assert list(inspect.signature(cls).parameters) == ["majority_sign_method", "kwargs"]
    tasks = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights = [1.0, -0.5, 2.0]
    got = cls(majority_sign_method=method, density=0.1).merge(tasks, weights)
    ties_unpruned = lorax_merge.merge(
        tasks, weights, "ties", density=1.0, majority_sign_method=method
    )
    assert torch.equal(got.view(torch.int32), ties_unpruned.view(torch.int32))


def test_lorax_server_enums_follow_the_table():
    assert lorax_server.LORAX_MERGE_STRATEGIES == strategy_names(in_server=True)
    assert lorax_server.LORAX_MERGE_STRATEGIES[0] == LINEAR  # enum value 0 is the default


# ---------------------------------------------------------------------------- docs
def _backticked(text: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", text)


def test_readme_and_cli_doc_list_the_table():
    # the command takes every row, factor and delta space
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    choices = re.search(r"`--strategy \{([a-z_,]+)\}`", readme).group(1).split(",")
    assert tuple(choices) == strategy_names()
    cli_doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    row = next(line for line in cli_doc.splitlines() if line.startswith("| `--strategy` |"))
    assert tuple(_backticked(row)) == strategy_names()


def test_readme_semantics_match_the_rows():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| strategies |"))
    described = {}
    for part in row.split("|")[2].split(";"):
        match = re.fullmatch(r"\s*`([a-z_]+)` = ([a-z ]+?)( \+ rescale)?, ([a-z ]+)\s*", part)
        assert match, part
        name, pruning, rescale, election = match.groups()
        described[name] = (
            "none" if pruning == "no pruning" else pruning,
            rescale is not None,
            election.strip() == "election",
        )
    assert described == {
        name: (STRATEGIES[name].pruning, STRATEGIES[name].rescale, STRATEGIES[name].elects_sign)
        for name in FACTOR_SPACE
    }
