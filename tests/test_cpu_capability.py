"""The CPU kernels at every capability level this machine runs ("default", "avx2", "avx512").

Every level must give the same bits as every other (NaN payloads aside) on inputs that take
each of the kernels' paths: vector bodies and tails, the sampled bracket of the selection and
its radix fallback, the parallel chunks of a large selection, and every store conversion.
Each level must also match the reference. The level is chosen once at import, from the CPU
or from ``LORAX_MERGE_CPU_CAPABILITY``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import CPU_CAPABILITIES
from helpers import (
    ALL_DTYPES,
    ELECTING_STRATEGIES,
    RANDOM_STRATEGIES,
    STRATEGIES,
    assert_same_bits,
    dare_masks,
    make_tasks,
    merge_kwargs,
)
from reference import assert_merge_matches, magnitude_keep_mask, reference_merge_detailed

import lorax_merge
from lorax_merge import _C, utils
from lorax_merge.strategy_table import STRATEGIES as STRATEGY_SPECS


def at_level(level: str, fn):
    """fn() computed with the CPU kernels of `level`."""
    previous = _C.cpu_capability()
    _C._set_cpu_capability(level)
    try:
        return fn()
    finally:
        _C._set_cpu_capability(previous)


def assert_every_level_agrees(fn, what: str) -> None:
    """fn() at each supported level gives the bits it gives at the first ("default")."""
    results = {level: at_level(level, fn) for level in CPU_CAPABILITIES}
    first = results[CPU_CAPABILITIES[0]]
    for level, result in results.items():
        if isinstance(first, torch.Tensor):
            assert_same_bits(result, first, f"{what}, {level} vs {CPU_CAPABILITIES[0]}")
        else:
            for i, (r, f) in enumerate(zip(result, first, strict=True)):
                assert_same_bits(r, f, f"{what}[{i}], {level} vs {CPU_CAPABILITIES[0]}")


def _with_non_finite(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten().clone()
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = -float("inf")
    flat[::17] = -0.0
    return flat.reshape(x.shape)


# name -> (number of tasks, shape, data kind); chosen for the paths they take
CASES = {
    # 64K elements: the sampled bracket, vector bodies only
    "lora": (3, (16, 4096), "normal"),
    # below the bracket's minimum size (radix passes), odd length: vector tails
    "odd": (3, (7, 143), "normal"),
    # heavy ties: the bracket cannot separate them, radix passes over the data
    "ties": (4, (120, 175), "tie_heavy"),
    # NaN and infinities at any density, 33K elements
    "non-finite": (3, (129, 257), "non-finite"),
}


def _case_tasks(case: str, dtype: torch.dtype) -> list[torch.Tensor]:
    n, shape, kind = CASES[case]
    if kind == "non-finite":
        return [_with_non_finite(t) for t in make_tasks(n, shape, dtype, "normal", seed=5)]
    return make_tasks(n, shape, dtype, kind, seed=5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_level_gives_the_same_bits(strategy, dtype, case):
    tasks = _case_tasks(case, dtype)
    weights = [0.5, -1.25, 2.0, 0.75][: len(tasks)]
    for density in (0.1, 0.5, 0.93):
        kw = merge_kwargs(strategy, density)
        assert_every_level_agrees(
            lambda kw=kw: lorax_merge.merge(tasks, weights, strategy, **kw),
            f"{strategy} {dtype} {case} density {density}",
        )


@pytest.mark.parametrize("out_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("task_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_linear"])
def test_every_level_stores_every_dtype_alike(strategy, task_dtype, out_dtype):
    tasks = _case_tasks("non-finite", task_dtype)
    kw = merge_kwargs(strategy, 0.6)
    assert_every_level_agrees(
        lambda: lorax_merge.merge(tasks, [1.5, -0.25, 3.0], strategy, out_dtype=out_dtype, **kw),
        f"{strategy} {task_dtype} -> {out_dtype}",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", ["ties", "magnitude_prune"])
def test_every_level_agrees_on_a_parallel_selection(strategy, dtype):
    # 2^18 + 7 elements: the selection is split into chunks handed to threads.
    tasks = make_tasks(2, ((1 << 18) + 7,), dtype, "normal", seed=9)
    assert_every_level_agrees(
        lambda: lorax_merge.merge(tasks, [1.0, 0.5], strategy, density=0.3),
        f"{strategy} {dtype} 2^18 + 7 elements",
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_level_agrees_on_the_primitives(dtype):
    stacked = torch.stack(_case_tasks("non-finite", dtype))
    mask = utils.calculate_majority_sign_mask(stacked, "total")
    for method in ("total", "frequency"):
        assert_every_level_agrees(
            lambda method=method: utils.calculate_majority_sign_mask(stacked, method),
            f"majority_sign_mask {method} {dtype}",
        )
    assert_every_level_agrees(
        lambda: utils.disjoint_merge(stacked, mask), f"disjoint_merge {dtype}"
    )
    for method in ("magnitude", "random"):
        assert_every_level_agrees(
            lambda method=method: utils.prune(stacked[0], 0.4, method, rescale=True, seed=3),
            f"prune {method} {dtype}",
        )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_the_reference_at_every_level(cpu_capability, strategy, dtype):
    tasks = make_tasks(3, (17, 1031), dtype, "normal", seed=11)  # 17.5K: the sampled bracket
    weights = [0.5, -1.25, 2.0]
    for density in (0.2, 0.5):
        method = "frequency" if strategy in ELECTING_STRATEGIES else "total"
        kw = merge_kwargs(strategy, density, method)
        got = lorax_merge.merge(tasks, weights, strategy, **kw)
        masks = dare_masks(tasks, density, kw["seed"]) if strategy in RANDOM_STRATEGIES else None
        ref = reference_merge_detailed(tasks, weights, strategy, density, method, masks, None)
        assert_merge_matches(got, ref, what=f"{strategy} {dtype} at {cpu_capability}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["normal", "tie_heavy", "column scales"])
def test_magnitude_selection_is_exact_at_every_level(cpu_capability, dtype, kind):
    if kind == "column scales":  # a LoRA B factor: each rank column at its own scale
        x = (
            torch.randn(4096, 16, generator=torch.Generator().manual_seed(13))
            * 1.5 ** torch.arange(16)
        ).to(dtype)
    else:
        x = make_tasks(1, (40_009,), dtype, kind, seed=13)[0]
    for density in (0.001, 0.37, 0.999):
        kept = utils.prune(x, density, "magnitude") == x
        visible = ~torch.isnan(x) & (x != 0)  # a dropped zero looks kept
        expected = magnitude_keep_mask(x, density)
        assert torch.equal(kept[visible], expected[visible]), (cpu_capability, density)


# --------------------------------------------------------------------------- choosing the level


def _level_in_fresh_process(value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LORAX_MERGE_CPU_CAPABILITY", None)
    if value is not None:
        env["LORAX_MERGE_CPU_CAPABILITY"] = value
    code = "import lorax_merge; print(lorax_merge.build_info()['cpu_capability'])"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )


def test_build_info_reports_the_levels():
    info = lorax_merge.build_info()
    compiled = info["cpu_capabilities"]
    assert compiled[0] == "default"
    assert set(compiled) <= {"default", "avx2", "avx512"}
    assert set(CPU_CAPABILITIES) <= set(compiled)
    assert info["cpu_capability"] in CPU_CAPABILITIES


def test_the_best_supported_level_is_chosen_by_default():
    proc = _level_in_fresh_process(None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == CPU_CAPABILITIES[-1]


@pytest.mark.parametrize("level", CPU_CAPABILITIES)
def test_the_environment_variable_forces_a_level(level):
    proc = _level_in_fresh_process(level)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == level


@pytest.mark.parametrize(
    "value", ["avx9", "AVX2 ", "sse"] + [v for v in ("avx2", "avx512") if v not in CPU_CAPABILITIES]
)
def test_an_unknown_or_unsupported_level_is_refused_naming_the_supported_ones(value):
    proc = _level_in_fresh_process(value)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "LORAX_MERGE_CPU_CAPABILITY" in last, last
    assert all(level in last for level in CPU_CAPABILITIES), last
    with pytest.raises(ValueError, match="supported here: " + ", ".join(CPU_CAPABILITIES)):
        _C._set_cpu_capability(value)


@pytest.mark.parametrize("offset", [0, 1, 4097])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_slice_merges_like_the_whole_at_every_level(cpu_capability, strategy, offset):
    """merge_slice_out of [offset, offset + m), with the whole tensors' magnitude thresholds,
    gives the whole merge's elements there: random words and tie cuts follow the flat index,
    an odd offset included."""
    spec = STRATEGY_SPECS[strategy]
    tasks = make_tasks(3, (20_011,), torch.float32, "normal", seed=17)
    weights = torch.tensor([0.5, -1.25, 2.0])
    density = 0.4 if spec.uses_density else 1.0
    election = "total" if spec.elects_sign else "none"
    whole = torch.empty(tasks[0].shape)
    torch.ops.lorax_merge.merge_out(
        tasks, weights, spec.pruning, election, density, spec.rescale, 7, whole
    )
    thresholds = None
    if spec.pruning == "magnitude":
        thresholds = torch.ops.lorax_merge.magnitude_thresholds(tasks, density)
    size = 10_001
    part = torch.empty(size)
    torch.ops.lorax_merge.merge_slice_out(
        [t[offset : offset + size] for t in tasks],
        weights,
        spec.pruning,
        election,
        density,
        spec.rescale,
        7,
        offset,
        thresholds,
        part,
    )
    assert_same_bits(part, whole[offset : offset + size], f"{strategy} at {cpu_capability}")
