"""CUDA kernels: the same results as the CPU kernels, bit for bit, and the GPU-only
guarantees (no host synchronisation, graph capture, streams, devices, large tensors).

Every test here needs a visible CUDA device and an extension built with its CUDA kernels;
without them the module is skipped, with the reason. The device-parametrised core tests
(``test_strategies.py`` and friends) also run their CUDA cases when a GPU is visible.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable
from functools import partial

import pytest
import torch
from helpers import (
    ALL_DTYPES,
    CANONICAL_NAN_BITS,
    ELECTING_STRATEGIES,
    STRATEGIES,
    assert_same_bits,
    assert_unmodified,
    make_tasks,
    merge_kwargs,
    snapshot,
    unsigned_bits,
)

import lorax_merge
from lorax_merge import utils
from lorax_merge.lorax_server import merge_module_maps
from lorax_merge.strategies import strategy_registry

_HAS_CUDA = torch.cuda.is_available()
_CUDA_BUILT = bool(lorax_merge.build_info().get("cuda_compiled", False))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA device visible"),
    pytest.mark.skipif(
        _HAS_CUDA and not _CUDA_BUILT, reason="lorax_merge built without CUDA kernels"
    ),
]

WEIGHTS3 = [0.5, -1.25, 2.0]
# Sizes around the vector width (8), the merge block (2048 elements), the selection tile
# (32768 elements) and the largest 16-bit selection done by one block (12 tiles).
ODD_SIZES = [1, 3, 7, 9, 2047, 2049, 32767, 32769, 70001, 393216, 393217]


def on_cuda(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.cuda() for t in tensors]


def both_devices(tasks, weights, strategy, **kw):
    """The merge on the CPU and on the GPU (the same inputs, copied)."""
    cpu = lorax_merge.merge(tasks, weights, strategy, **kw)
    gpu = lorax_merge.merge(on_cuda(tasks), weights, strategy, **kw)
    return cpu, gpu


# --------------------------------------------------------------------------- CPU == CUDA


@pytest.mark.parametrize("density", [0.0, 0.29, 0.5, 1.0])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_and_dtype_equals_cpu(strategy, dtype, density):
    tasks = make_tasks(3, (37, 129), dtype, "normal", seed=2)
    for method in ("total", "frequency") if strategy in ELECTING_STRATEGIES else ("total",):
        kw = merge_kwargs(strategy, density, method, seed=11)
        cpu, gpu = both_devices(tasks, WEIGHTS3, strategy, **kw)
        assert gpu.device.type == "cuda"
        assert_same_bits(gpu, cpu, f"{strategy} {dtype} d={density} {method}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_ties"])
def test_out_dtypes_equal_cpu(strategy, out_dtype):
    tasks = make_tasks(4, (3001,), torch.bfloat16, "normal", seed=3)
    kw = merge_kwargs(strategy, 0.4, seed=5)
    cpu, gpu = both_devices(tasks, [1.0, -0.5, 0.25, 2.0], strategy, out_dtype=out_dtype, **kw)
    assert gpu.dtype == out_dtype
    assert_same_bits(gpu, cpu, f"{strategy} -> {out_dtype}")


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_odd_sizes_equal_cpu(strategy, n):
    tasks = make_tasks(2, (n,), torch.float16, "normal", seed=n)
    cpu, gpu = both_devices(tasks, [0.75, 1.5], strategy, **merge_kwargs(strategy, 0.35, seed=1))
    assert_same_bits(gpu, cpu, f"{strategy} n={n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_misaligned_views_equal_cpu(strategy, dtype):
    # x[1:] of a flat tensor starts one element past an aligned address: no vector loads.
    n = 4099
    flat = [torch.randn(n + 1, dtype=torch.float64).to(dtype) for _ in range(3)]
    views_cpu = [f[1:] for f in flat]
    views_gpu = [f.cuda()[1:] for f in flat]
    kw = merge_kwargs(strategy, 0.5, seed=9)
    expected = lorax_merge.merge(views_cpu, WEIGHTS3, strategy, **kw)
    got = lorax_merge.merge(views_gpu, WEIGHTS3, strategy, **kw)
    assert_same_bits(got, expected, f"{strategy} misaligned tasks")
    # A misaligned destination as well.
    buffer = torch.full((n + 1,), math.nan, dtype=expected.dtype, device="cuda")
    returned = lorax_merge.merge(views_gpu, WEIGHTS3, strategy, out=buffer[1:], **kw)
    assert returned.data_ptr() == buffer[1:].data_ptr()
    assert_same_bits(buffer[1:], expected, f"{strategy} misaligned out")
    assert math.isnan(buffer[0].item()), "merge wrote outside its destination"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_and_nd_equal_cpu(strategy):
    base = torch.randn(3, 6, 40, 22)
    tasks_cpu = [base[i].transpose(0, 2) for i in range(3)]  # [22, 40, 6], non-contiguous
    tasks_gpu = [t.cuda() for t in tasks_cpu]
    before = snapshot(tasks_gpu)
    kw = merge_kwargs(strategy, 0.6, seed=4)
    expected = lorax_merge.merge(tasks_cpu, WEIGHTS3, strategy, **kw)
    got = lorax_merge.merge(tasks_gpu, WEIGHTS3, strategy, **kw)
    assert_same_bits(got, expected, strategy)
    assert_unmodified(before, tasks_gpu)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_and_inf_equal_cpu(strategy):
    tasks = make_tasks(3, (1000,), torch.float32, "normal", seed=6)
    tasks[0][::97] = math.nan
    tasks[1][5::89] = math.inf
    tasks[2][7::101] = -math.inf
    cpu, gpu = both_devices(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, 0.5, seed=2))
    assert_same_bits(gpu, cpu, strategy)


def test_empty_and_scalar_tensors():
    for shape in [(0,), (4, 0, 3), ()]:
        tasks = [torch.randn(shape) for _ in range(2)]
        for strategy in STRATEGIES:
            kw = merge_kwargs(strategy, 0.5, seed=3)
            cpu, gpu = both_devices(tasks, [1.0, 2.0], strategy, **kw)
            assert_same_bits(gpu, cpu, f"{strategy} shape {shape}")


def test_seventeen_tasks_equal_cpu():
    tasks = make_tasks(17, (5000,), torch.bfloat16, "normal", seed=8)
    weights = [(-1) ** i * (0.1 + i / 17) for i in range(17)]
    for strategy in STRATEGIES:
        cpu, gpu = both_devices(tasks, weights, strategy, **merge_kwargs(strategy, 0.3, seed=12))
        assert_same_bits(gpu, cpu, strategy)


@pytest.mark.parametrize(
    "wdtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64], ids=str
)
def test_weights_on_the_gpu_equal_cpu_weights(wdtype):
    tasks = make_tasks(3, (777,), torch.float32, "normal", seed=10)
    w_cpu = torch.tensor([2, -1, 3]).to(wdtype)
    for strategy in STRATEGIES:
        kw = merge_kwargs(strategy, 0.45, seed=13)
        expected = lorax_merge.merge(tasks, w_cpu, strategy, **kw)
        got = lorax_merge.merge(on_cuda(tasks), w_cpu.cuda(), strategy, **kw)
        assert_same_bits(got, expected, f"{strategy} weights {wdtype}")


# --------------------------------------------------------------------------- NaN and zeros


def _from_bits(patterns: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Values of ``dtype`` with the given (unsigned) bit patterns."""
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
    width = 8 * dtype.itemsize
    signed = [p - (1 << width) if p >> (width - 1) else p for p in patterns]
    return torch.tensor(signed, dtype=int_type).view(dtype)


#: quiet and signalling NaNs of both signs, with and without payloads
NAN_PATTERNS = {
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7FC00123, 0x7F800001, 0xFFBFFFFF],
    torch.float64: [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF8000000000123, 0x7FF0000000000001],
    torch.float16: [0x7E00, 0xFE00, 0x7E01, 0x7C01, 0xFDFF],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7FC1, 0x7F81, 0xFFBF],
}


def special_tasks(dtype: torch.dtype, n_tasks: int = 3, numel: int = 4099, seed: int = 0):
    """Tasks drawn from NaNs with payloads, +-Inf, +-0 and a few finite values."""
    pool = torch.cat(
        [
            _from_bits(NAN_PATTERNS[dtype], dtype),
            torch.tensor([math.inf, -math.inf, 0.0, -0.0, -0.0, 1.0, -1.5, 0.5], dtype=dtype),
        ]
    )
    gen = torch.Generator().manual_seed(seed)
    return [pool[torch.randint(pool.numel(), (numel,), generator=gen)] for _ in range(n_tasks)]


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nan_payloads_and_signed_zeros_equal_cpu_bit_for_bit(dtype, out_dtype):
    tasks = special_tasks(dtype, seed=3)
    for weights in (WEIGHTS3, [1.0, -1.0, 0.0]):
        for strategy in STRATEGIES:
            for method in ("total", "frequency") if strategy in ELECTING_STRATEGIES else ("total",):
                kw = merge_kwargs(strategy, 0.5, method, seed=17)
                cpu, gpu = both_devices(tasks, weights, strategy, out_dtype=out_dtype, **kw)
                what = f"{strategy} {dtype} -> {cpu.dtype} {method} w={weights}"
                assert_same_bits(gpu, cpu, what)
                nan_bits = set(unsigned_bits(cpu[torch.isnan(cpu)]))
                assert nan_bits == {CANONICAL_NAN_BITS[cpu.dtype]}, f"{what}: NaN bits {nan_bits}"
    # The inputs do produce both zeros: a one-task linear merge keeps the sign of zero.
    single = lorax_merge.merge(on_cuda(tasks[:1]), [1.0], out_dtype=out_dtype)
    signs = torch.signbit(single[single == 0]).cpu()
    assert bool(signs.any()) and not bool(signs.all())


def test_stacked_primitives_write_canonical_nans_and_signed_zeros():
    for dtype in ALL_DTYPES:
        stacked = torch.stack(special_tasks(dtype, n_tasks=4, numel=999, seed=5))
        for method in ("total", "frequency"):
            mask_cpu = utils.calculate_majority_sign_mask(stacked, method)
            mask_gpu = utils.calculate_majority_sign_mask(stacked.cuda(), method)
            assert torch.equal(mask_gpu.cpu(), mask_cpu)
            cpu = utils.disjoint_merge(stacked, mask_cpu)
            gpu = utils.disjoint_merge(stacked.cuda(), mask_cpu.cuda())
            assert_same_bits(gpu, cpu, f"disjoint merge {dtype} {method}")
            assert set(unsigned_bits(cpu[torch.isnan(cpu)])) == {CANONICAL_NAN_BITS[cpu.dtype]}


# --------------------------------------------------------------------------- masks and ties


@pytest.mark.parametrize("n", [1, 5, 4096, 100003])
def test_random_masks_bit_identical_to_cpu(n):
    for seed in (0, 1, 2**40 + 3, -7):
        for stream in (0, 1, 5, 2**33):
            for density in (0.1, 0.5, 0.93):
                ones = torch.ones(n)
                cpu = utils.prune(ones, density, "random", seed=seed, stream=stream) != 0
                gpu = utils.prune(ones.cuda(), density, "random", seed=seed, stream=stream) != 0
                assert torch.equal(gpu.cpu(), cpu), f"seed={seed} stream={stream} d={density}"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_random_prune_rescaled_equals_cpu(dtype):
    x = make_tasks(1, (10007,), dtype, "normal", seed=14)[0]
    for density in (0.2, 0.5, 0.999):
        cpu = utils.prune(x, density, "random", rescale=True, seed=21, stream=3)
        gpu = utils.prune(x.cuda(), density, "random", rescale=True, seed=21, stream=3)
        assert_same_bits(gpu, cpu, f"{dtype} d={density}")


@pytest.mark.parametrize("n", [100, 32768, 32769, 300001, 393217, 1000003])
def test_tie_heavy_bf16_magnitude_prune_equals_cpu(n):
    # Eight distinct values: the threshold key is shared by a large fraction of the tensor,
    # so the tie cut (lower flat index first) decides many elements, across many tiles; up
    # to 300001 elements one block selects, from 393217 the tiles are spread over blocks.
    x = make_tasks(1, (n,), torch.bfloat16, "tie_heavy", seed=n)[0]
    for density in (1 / n, 0.1, 0.29, 0.5, 0.77, 1 - 1 / n):
        cpu = utils.prune(x, density, "magnitude")
        gpu = utils.prune(x.cuda(), density, "magnitude")
        assert_same_bits(gpu, cpu, f"n={n} d={density}")
        kept = int(density * n)
        assert int((gpu != 0).sum()) <= kept


@pytest.mark.parametrize("shape", [(3, 40000), (7, 60000)], ids=["one-block", "split"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_magnitude_threshold_across_tiles_equals_cpu(dtype, shape):
    # Several selection tiles, with every digit pass of the key width exercised: 120000
    # elements are selected by one block for every dtype, 420000 spread over one block per
    # tile for every dtype.
    x = make_tasks(1, shape, dtype, "normal", seed=15)[0]
    for density in (0.001, 0.3, 0.5, 0.9999):
        assert_same_bits(
            utils.prune(x.cuda(), density, "magnitude"), utils.prune(x, density, "magnitude")
        )


def test_all_equal_magnitudes_keep_the_first_k():
    n = 100_000
    x = torch.full((n,), -1.5, dtype=torch.bfloat16, device="cuda")
    x[1::2] = 1.5
    for k in (1, 12345, 65536, n - 1):
        density = (k + 0.5) / n
        got = utils.prune(x, density, "magnitude")
        assert torch.equal(got[:k], x[:k]) and bool((got[k:] == 0).all()), f"k={k}"


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_stacked_primitives_equal_cpu(dtype, method):
    stacked = make_tasks(1, (5, 33, 71), dtype, "tie_heavy", seed=16)[0]
    cpu_mask = utils.calculate_majority_sign_mask(stacked, method)
    gpu_mask = utils.calculate_majority_sign_mask(stacked.cuda(), method)
    assert torch.equal(gpu_mask.cpu(), cpu_mask)
    cpu = utils.disjoint_merge(stacked, cpu_mask)
    gpu = utils.disjoint_merge(stacked.cuda(), gpu_mask)
    assert_same_bits(gpu, cpu, f"disjoint {dtype}")


# --------------------------------------------------------------------------- merge_many


def _groups(seed: int, count: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(count):
        n_tasks = 1 + g % 4
        shape = (1 + int(torch.randint(0, 70, (1,), generator=gen)), 1 + g % 13)
        if g % 17 == 5:
            shape = (0, 3)
        groups.append([torch.randn(shape, generator=gen).to(dtype) for _ in range(n_tasks)])
    return groups


@pytest.mark.parametrize("count", [3, 300])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_many_equals_cpu_and_per_group_merge(strategy, count):
    # 300 groups need a descriptor table larger than the kernel parameters.
    groups = _groups(count, count)
    weights = [[(-1) ** i * (0.5 + i) for i in range(len(g))] for g in groups]
    kw = {"strategy": strategy, "density": 0.4, "majority_sign_method": "total"}
    cpu = lorax_merge.merge_many(groups, weights, seed=77, **kw)
    gpu_groups = [on_cuda(g) for g in groups]
    gpu = lorax_merge.merge_many(gpu_groups, weights, seed=77, **kw)
    assert len(gpu) == len(groups)
    for g, (a, b) in enumerate(zip(gpu, cpu)):
        assert_same_bits(a, b, f"group {g}")
    # Each group equals a plain merge with that group's derived seed.
    for g in (0, len(groups) - 1):
        one = lorax_merge.merge(
            gpu_groups[g],
            weights[g],
            strategy,
            density=0.4,
            seed=lorax_merge.derive_group_seed(77, g),
        )
        assert_same_bits(gpu[g], one, f"group {g} vs merge")


def test_merge_many_with_gpu_weights_and_mixed_dtypes():
    groups = _groups(5, 40, torch.float32) + _groups(6, 7, torch.float16)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    groups = [g[:1] + g[:1] * 3 if len(g) < 4 else g for g in groups]  # four tasks each
    for strategy in STRATEGIES:
        kw = {"strategy": strategy, "density": 0.5, "seed": 3}
        expected = lorax_merge.merge_many(groups, weights, **kw)
        got = lorax_merge.merge_many([on_cuda(g) for g in groups], weights.cuda(), **kw)
        for g, (a, b) in enumerate(zip(got, expected)):
            assert_same_bits(a, b, f"{strategy} group {g}")


@pytest.mark.parametrize("n_tasks", [128, 129])
def test_ties_with_128_and_129_tasks_equals_cpu(n_tasks):
    # 128 threshold jobs fill the descriptor table that travels with the launch; 129 need a
    # table uploaded from pinned memory, which a CUDA graph cannot capture.
    tasks = make_tasks(n_tasks, (3001,), torch.bfloat16, "tie_heavy", seed=n_tasks)
    weights = [(-1) ** i * (0.25 + i / n_tasks) for i in range(n_tasks)]
    for method in ("total", "frequency"):
        kw = {"density": 0.3, "majority_sign_method": method}
        cpu, gpu = both_devices(tasks, weights, "ties", **kw)
        assert_same_bits(gpu, cpu, f"{n_tasks} tasks, {method}")
    gpu_tasks = on_cuda(tasks)
    expected = lorax_merge.merge(gpu_tasks, weights, "ties", density=0.3)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    if n_tasks <= 128:
        with torch.cuda.graph(graph):
            captured = lorax_merge.merge(gpu_tasks, weights, "ties", density=0.3)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bits(captured, expected, "128 tasks, replayed")
    else:
        with pytest.raises(ValueError, match="CUDA graph"):
            with torch.cuda.graph(graph):
                lorax_merge.merge(gpu_tasks, weights, "ties", density=0.3)


def test_merge_many_of_tie_heavy_bf16_groups_equals_cpu():
    # 48 groups of 70,001 elements (each tensor selected by one block) and two of 1,000,003
    # (spread over one block per tile), all heavily tied, so the tie cut decides many
    # elements; 150 threshold jobs: the table is uploaded.
    groups = [make_tasks(3, (70001,), torch.bfloat16, "tie_heavy", seed=g) for g in range(48)]
    groups += [make_tasks(3, (1000003,), torch.bfloat16, "tie_heavy", seed=g) for g in (98, 99)]
    gpu_groups = [on_cuda(g) for g in groups]
    for strategy in ("ties", "magnitude_prune"):
        kw = {"strategy": strategy, "density": 0.3, "majority_sign_method": "frequency"}
        cpu = lorax_merge.merge_many(groups, [0.5, -1.0, 1.5], **kw)
        gpu = lorax_merge.merge_many(gpu_groups, [0.5, -1.0, 1.5], **kw)
        for g, (a, b) in enumerate(zip(gpu, cpu)):
            assert_same_bits(a, b, f"{strategy} group {g}")


# --------------------------------------------------------------------------- GPU guarantees


def _public_entry_points() -> dict[str, Callable[[], object]]:
    """Every public way into the factor-space kernels, as name -> call, on small CUDA inputs."""
    tasks = make_tasks(3, (257, 33), torch.bfloat16, "normal", seed=17, device="cuda")
    w_gpu = torch.tensor(WEIGHTS3, device="cuda")
    w_cpu = torch.tensor(WEIGHTS3, dtype=torch.float64)
    out = torch.empty(257, 33, device="cuda")
    strided_out = torch.empty(33, 257, device="cuda").t()
    large = [tasks, tasks[:2]] * 150  # descriptor tables too large for the launch
    stacked = torch.stack(tasks)
    adapters = [{"m.lora_A.weight": t, "m.lora_B.weight": t.t()} for t in tasks]
    calls: dict[str, Callable[[], object]] = {}
    for s in STRATEGIES:
        kw = {"density": 0.5, "seed": 1}
        for label, w in (("list", WEIGHTS3), ("gpu", w_gpu), ("cpu", w_cpu)):
            calls[f"merge {s} {label} weights"] = partial(lorax_merge.merge, tasks, w, s, **kw)
        calls[f"merge {s} out"] = partial(lorax_merge.merge, tasks, w_gpu, s, out=out, **kw)
        calls[f"merge {s} strided out"] = partial(
            lorax_merge.merge, tasks, WEIGHTS3, s, out=strided_out, **kw
        )
        many = partial(lorax_merge.merge_many, strategy=s, **kw)
        calls[f"merge_many {s} shared list"] = partial(many, [tasks] * 4, WEIGHTS3)
        calls[f"merge_many {s} shared gpu"] = partial(
            many, [tasks] * 4, w_gpu, out_dtype=torch.bfloat16
        )
        calls[f"merge_many {s} large"] = partial(many, large, [[1.0] * len(g) for g in large])
        calls[f"merge_many {s} mixed weights"] = partial(
            many,
            [tasks, tasks, tasks, tasks[:2], tasks[:2]],
            [w_gpu, WEIGHTS3, w_cpu, w_gpu[:2], [0.5, 0.25]],
        )
        strategy = strategy_registry[s](density=0.5, majority_sign_method="frequency", seed=3)
        calls[f"{type(strategy).__name__}.merge"] = partial(strategy.merge, tasks, w_gpu)
        for label, w in (("list", [1.0, 0.5, -0.5]), ("gpu", w_gpu), ("cpu", w_cpu)):
            calls[f"merge_adapters {s} {label} weights"] = partial(
                lorax_merge.merge_adapters, adapters, w, strategy=s, density=0.5, seed=2
            )
    # An adapter without one of the names takes its entries of a tensor of weights.
    partial_adapters = [*adapters, {"m.lora_A.weight": tasks[0]}]
    w4 = torch.tensor([*WEIGHTS3, 0.25], device="cuda")
    calls["merge_adapters gpu weights, a name some adapters lack"] = partial(
        lorax_merge.merge_adapters, partial_adapters, w4, strategy="ties", density=0.5
    )
    calls["prune magnitude"] = partial(utils.prune, tasks[0], 0.3, "magnitude")
    calls["prune random"] = partial(utils.prune, tasks[0], 0.3, "random", rescale=True, seed=4)
    for method in ("total", "frequency"):
        calls[f"majority sign mask {method}"] = partial(
            utils.calculate_majority_sign_mask, stacked, method
        )
    mask = utils.calculate_majority_sign_mask(stacked, "total")
    calls["disjoint merge"] = partial(utils.disjoint_merge, stacked, mask)
    server_adapters = [
        ({"q": {"lora_A": (t, "m.q.lora_A"), "lora_B": (t.t(), "m.q.lora_B")}},
         {"r": 33, "target_modules": ["q"]})
        for t in tasks
    ]  # fmt: skip
    params = {"weights": WEIGHTS3, "merge_strategy": "dare_ties", "density": 0.5}
    calls["merge_module_maps"] = partial(merge_module_maps, server_adapters, params, seed=6)
    return calls


def test_no_host_synchronisation_in_any_public_entry_point():
    calls = _public_entry_points()
    for call in calls.values():  # warm up: lazy initialisation is not part of a merge
        call()
    torch.cuda.synchronize()
    failures = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as exc:
                failures.append(f"{name}: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_graph_capture_and_replay(strategy):
    tasks = make_tasks(3, (4099,), torch.bfloat16, "normal", seed=18, device="cuda")
    kw = merge_kwargs(strategy, 0.4, seed=123)
    expected = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(captured, expected, f"{strategy} replay")
    # New inputs in the same buffers: the replay recomputes everything (thresholds too).
    fresh = make_tasks(3, (4099,), torch.bfloat16, "normal", seed=19, device="cuda")
    for t, f in zip(tasks, fresh):
        t.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(
        captured, lorax_merge.merge(fresh, WEIGHTS3, strategy, **kw), f"{strategy} new inputs"
    )


def _warm_up_beside_the_capture_stream(fn: Callable[[], object]) -> None:
    """Runs ``fn`` twice on a side stream, as torch wants before a capture (lazy
    initialisation, autograd's streams), and waits for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def test_graph_capture_of_merge_into_out_and_of_the_utils_helpers():
    tasks = make_tasks(3, (4099,), torch.bfloat16, "normal", seed=25, device="cuda")
    stacked = torch.stack(tasks)
    weights = torch.tensor(WEIGHTS3, device="cuda")
    out = torch.empty(4099, device="cuda")

    def run(into=None):
        merged = lorax_merge.merge(tasks, weights, "dare_ties", density=0.4, seed=5, out=into)
        mask = utils.calculate_majority_sign_mask(stacked, "frequency")
        return (
            merged,
            utils.prune(tasks[0], 0.3, "magnitude"),
            utils.prune(tasks[1], 0.3, "random", rescale=True, seed=4),
            mask,
            utils.disjoint_merge(stacked, mask),
        )

    _warm_up_beside_the_capture_stream(lambda: run(out))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(out)
    assert captured[0] is out

    def replay_equals_eager(what: str) -> None:
        graph.replay()
        torch.cuda.synchronize()
        for i, (got, expected) in enumerate(zip(captured, run())):
            assert_same_bits(got, expected, f"{what}: result {i}")

    replay_equals_eager("replay")
    # New values in the same buffers, the weights on the GPU included: a replay reads them.
    fresh = make_tasks(3, (4099,), torch.bfloat16, "normal", seed=26, device="cuda")
    for t, f in zip(tasks, fresh):
        t.copy_(f)
    stacked.copy_(torch.stack(fresh))
    weights.copy_(torch.tensor([-0.75, 1.5, 0.25], device="cuda"))
    replay_equals_eager("new inputs")


@pytest.mark.parametrize("strategy", ["ties", "dare_linear"])
def test_graph_capture_of_a_merge_and_its_backward(strategy):
    tasks = make_tasks(3, (4099,), torch.float32, "normal", seed=27, device="cuda")
    weights = torch.tensor(WEIGHTS3, device="cuda")
    grad_out = torch.randn(4099, generator=torch.Generator().manual_seed(9)).to("cuda")
    kw = merge_kwargs(strategy, 0.4, seed=11)

    def step(leaves, w):
        out = lorax_merge.merge(leaves, w, strategy, **kw)
        out.backward(grad_out)
        return out

    def fresh_leaves():
        leaves = [t.detach().clone().requires_grad_(True) for t in tasks]
        return leaves, weights.detach().clone().requires_grad_(True)

    leaves, w = fresh_leaves()
    _warm_up_beside_the_capture_stream(lambda: step(leaves, w))
    for p in (*leaves, w):
        p.grad = None  # the captured backward makes the gradients anew
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(leaves, w)
    graph.replay()
    torch.cuda.synchronize()
    eager_leaves, eager_w = fresh_leaves()
    expected = step(eager_leaves, eager_w)
    assert_same_bits(captured, expected, f"{strategy} result")
    assert_same_bits(w.grad, eager_w.grad, f"{strategy} weight gradients")
    for i, (got, want) in enumerate(zip(leaves, eager_leaves)):
        assert_same_bits(got.grad, want.grad, f"{strategy} task {i} gradient")


def test_graph_capture_of_a_small_merge_many_and_refusal_of_a_large_one():
    groups = [
        make_tasks(2, (100 + g,), torch.float32, "normal", seed=g, device="cuda") for g in range(4)
    ]
    kw = {"strategy": "ties", "density": 0.5}
    expected = lorax_merge.merge_many(groups, [1.0, -2.0], **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lorax_merge.merge_many(groups, [1.0, -2.0], **kw)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert_same_bits(a, b, "merge_many replay")
    many = groups * 100
    with pytest.raises(ValueError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            lorax_merge.merge_many(many, [1.0, -2.0], **kw)


def test_a_refused_capture_enqueues_nothing():
    # float32 groups whose table fits in a launch, then bfloat16 groups whose table does not:
    # the batch is refused before the float32 merges are enqueued, so the graph stays empty
    # (no orphan kernels writing into memory the capture frees).
    small = [make_tasks(3, (300,), torch.float32, seed=g, device="cuda") for g in range(4)]
    large = [make_tasks(3, (200,), torch.bfloat16, seed=g, device="cuda") for g in range(60)]
    lorax_merge.merge_many(small + large, WEIGHTS3, strategy="ties", density=0.5)  # warm-up
    torch.cuda.synchronize()
    with pytest.warns(UserWarning, match="CUDA Graph is empty"):
        with pytest.raises(ValueError, match="CUDA graph"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                lorax_merge.merge_many(small + large, WEIGHTS3, strategy="ties", density=0.5)


def test_the_backward_of_a_large_batch_refuses_a_capture():
    # 25 groups of 3 tasks: the forward's table travels with its launch, the backward's
    # (larger descriptors) does not, and is refused with the forward's error.
    groups = [
        [t.requires_grad_(True) for t in make_tasks(3, (64,), torch.float32, seed=g, device="cuda")]
        for g in range(25)
    ]
    weights = torch.tensor(WEIGHTS3, device="cuda", requires_grad=True)

    def loss():
        return sum(o.sum() for o in lorax_merge.merge_many(groups, weights, strategy="linear"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch's graph capture of a backward wants
        loss().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            loss().backward()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_graph_capture_and_replay_of_merge_many_with_device_weights(strategy):
    groups = [
        make_tasks(3, (1000 + 7 * g,), torch.bfloat16, "normal", seed=g, device="cuda")
        for g in range(6)
    ]
    shared = torch.tensor(WEIGHTS3, device="cuda")
    per_group = torch.randn(6, 3, device="cuda", dtype=torch.float64)
    kw = {"strategy": strategy, "density": 0.4, "majority_sign_method": "frequency", "seed": 5}

    def run():
        return lorax_merge.merge_many(groups, shared, **kw) + lorax_merge.merge_many(
            groups, list(per_group), **kw
        )

    expected = run()  # also the warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(captured, expected)):
        assert_same_bits(a, b, f"{strategy} output {i}")
    # Weights changed in place: a replay reads them where they are.
    shared.mul_(-2.0)
    per_group.add_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(captured, run())):
        assert_same_bits(a, b, f"{strategy} output {i}, new weights")


def _blocking_stream() -> tuple[torch.cuda.ExternalStream, Callable[[], None]]:
    """A CUDA stream created without cudaStreamNonBlocking (PyTorch's own streams are
    non-blocking), and the call that destroys it."""
    name = f"libcudart.so.{torch.version.cuda.split('.')[0]}"
    try:
        cudart = ctypes.CDLL(name)  # the runtime PyTorch has loaded
    except OSError:
        pytest.skip(f"cannot load {name} to create a blocking stream")
    handle = ctypes.c_void_p()
    assert cudart.cudaStreamCreateWithFlags(ctypes.byref(handle), 0) == 0
    return torch.cuda.ExternalStream(handle.value), partial(cudart.cudaStreamDestroy, handle)


def test_large_table_on_the_legacy_stream_during_a_capture_is_refused():
    # While a blocking stream captures (global mode), CUDA answers
    # cudaErrorStreamCaptureImplicit for the legacy default stream: a merge that needs an
    # uploaded table refuses with the documented ValueError, and the capture stays valid.
    tasks = make_tasks(129, (300,), torch.float32, "normal", seed=1, device="cuda")
    out = torch.empty(300, device="cuda")
    small = tasks[:3]
    expected = lorax_merge.merge(small, WEIGHTS3, "ties", density=0.5)
    lorax_merge.merge(tasks, [1.0] * 129, "ties", density=0.5, out=out)  # warm up
    torch.cuda.synchronize()
    capture_stream, destroy = _blocking_stream()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            captured = lorax_merge.merge(small, WEIGHTS3, "ties", density=0.5)
            with torch.cuda.stream(torch.cuda.default_stream()):
                with pytest.raises(ValueError, match="CUDA graph"):
                    lorax_merge.merge(tasks, [1.0] * 129, "ties", density=0.5, out=out)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bits(captured, expected, "the capture beside the refused call")
    finally:
        torch.cuda.synchronize()
        destroy()


def test_large_table_in_another_thread_leaves_a_capture_valid():
    # A merge whose table is uploaded through newly allocated pinned memory, in one thread,
    # while another thread captures a graph in the global mode (PyTorch's default): the
    # merge allocates in the thread-local capture mode, so the capture stays valid. (The
    # merge writes into `out` and needs no selection, so it allocates nothing else.)
    tasks = make_tasks(170, (777,), torch.float32, "normal", seed=3, device="cuda")
    weights = [(-1) ** i / (i + 1) for i in range(170)]
    out = torch.empty(777, device="cuda")
    expected = lorax_merge.merge(tasks, weights, "linear")
    small = tasks[:3]
    expected_small = lorax_merge.merge(small, WEIGHTS3, "ties", density=0.5)
    empty_pinned_cache = getattr(torch._C, "_host_emptyCache", None)
    pinned_stats = getattr(torch._C, "_cuda_hostMemoryStats", None)
    if empty_pinned_cache is None or pinned_stats is None:
        pytest.skip("this torch cannot empty or count its pinned-memory cache")
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    empty_pinned_cache()  # the table needs a new pinned block
    host_allocs = pinned_stats()["num_host_alloc"]
    started, finished = threading.Event(), threading.Event()
    captured: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def capture() -> None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured.append(lorax_merge.merge(small, WEIGHTS3, "ties", density=0.5))
                started.set()
                finished.wait(timeout=60)
            graph.replay()
            torch.cuda.synchronize()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=capture)
    thread.start()
    assert started.wait(timeout=60)
    try:
        with torch.cuda.stream(stream):
            lorax_merge.merge(tasks, weights, "linear", out=out)
    finally:
        finished.set()
        thread.join(timeout=60)
    torch.cuda.synchronize()
    assert not errors, errors
    assert pinned_stats()["num_host_alloc"] > host_allocs, "no pinned block was allocated"
    assert_same_bits(captured[0], expected_small, "captured while another thread merged")
    assert_same_bits(out, expected, "merged while another thread captured")


def test_runs_on_the_current_stream():
    base = make_tasks(3, (1 << 20,), torch.float32, "normal", seed=20, device="cuda")
    expected = [
        lorax_merge.merge(base, WEIGHTS3, s, **merge_kwargs(s, 0.5, seed=2)) for s in STRATEGIES
    ]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # the inputs below become ready late, on this stream
        tasks = [t * 1.0 for t in base]
        got = [
            lorax_merge.merge(tasks, WEIGHTS3, s, **merge_kwargs(s, 0.5, seed=2))
            for s in STRATEGIES
        ]
    stream.synchronize()
    for s, a, b in zip(STRATEGIES, got, expected):
        assert_same_bits(a, b, f"{s} on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    tasks = make_tasks(3, (999,), torch.float16, "normal", seed=21)
    current = torch.cuda.current_device()
    for strategy in STRATEGIES:
        kw = merge_kwargs(strategy, 0.5, seed=6)
        got = lorax_merge.merge([t.to("cuda:1") for t in tasks], WEIGHTS3, strategy, **kw)
        assert got.device == torch.device("cuda:1")
        assert_same_bits(got, lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw), strategy)
        many = lorax_merge.merge_many(
            [[t.to("cuda:1") for t in tasks]],
            torch.tensor(WEIGHTS3, device="cuda:1"),
            strategy=strategy,
            density=0.5,
            seed=[6],
        )
        assert many[0].device == torch.device("cuda:1")
    assert torch.cuda.current_device() == current


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tasks_on_two_gpus_are_an_error():
    a = torch.randn(10, device="cuda:0")
    b = torch.randn(10, device="cuda:1")
    with pytest.raises(ValueError, match="cuda"):
        lorax_merge.merge([a, b], [1.0, 1.0])
    with pytest.raises(ValueError, match="cuda"):
        lorax_merge.merge_many([[a], [b]], [1.0])


def test_tasks_on_gpu_and_cpu_are_an_error():
    a = torch.randn(10, device="cuda")
    b = torch.randn(10)
    with pytest.raises(ValueError, match="cpu|cuda"):
        lorax_merge.merge([a, b], [1.0, 1.0])
    with pytest.raises(ValueError, match="cpu|cuda"):
        lorax_merge.merge_many([[a], [b]], [1.0])
    with pytest.raises(ValueError, match="out"):
        lorax_merge.merge([a, a], [1.0, 1.0], out=torch.empty(10))


# --------------------------------------------------------------------------- huge tensors


@pytest.mark.slow
def test_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 4099
    if free < 4 * 2 * n + (2 << 30):
        pytest.skip("needs about 20 GB of free GPU memory")
    # Magnitude selection: the k largest sit past index 2**31, and the tie cut lies there.
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    x[-3:] = torch.tensor([5.0, -6.0, 7.0], dtype=torch.bfloat16)
    got = utils.prune(x, 3.5 / n, "magnitude")
    assert int((got != 0).sum()) == 3 and torch.equal(got[-3:], x[-3:])
    del got
    drop = 4101  # keep the three largest and all but the last `drop` + 3 ones (lower index first)
    got = utils.prune(x, (n - drop + 0.5) / n, "magnitude")
    assert bool((got[: n - drop - 3] != 0).all()) and bool((got[n - drop - 3 : -3] == 0).all())
    assert torch.equal(got[-3:], x[-3:])
    del got
    # Linear merge: every element, vector path and tail, against torch on the GPU.
    y = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    out = lorax_merge.merge([x, y], [0.5, -2.0], out_dtype=torch.bfloat16)
    step = 1 << 28
    for start in range(0, n, step):
        part = slice(start, min(n, start + step))
        expected = (x[part].float() * 0.5 + y[part].float() * -2.0).to(torch.bfloat16)
        assert torch.equal(out[part], expected), f"elements from {start}"
    del out, y
    # Random pruning far past 2**31: the mask of the last elements follows the generator
    # (checked first against the CPU kernel on a few elements).
    small = utils.prune(torch.ones(64), 0.5, "random", seed=3) != 0
    assert torch.equal(small, torch.tensor([_random_word(3, 0, i) < 2**31 for i in range(64)]))
    mask = (
        utils.prune(torch.ones(n, dtype=torch.bfloat16, device="cuda"), 0.5, "random", seed=3)[
            -5000:
        ]
        != 0
    )
    idx = torch.arange(n - 5000, n)
    cpu_mask = torch.tensor([_random_word(3, 0, int(i)) < 2**31 for i in idx])
    assert torch.equal(mask.cpu(), cpu_mask)


_MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _random_word(seed: int, stream: int, index: int) -> int:
    """The documented counter-based generator, for one element (pure Python)."""
    gamma = 0x9E3779B97F4A7C15
    key = _mix64((seed & _MASK) ^ _mix64((stream + gamma) & _MASK))
    bits = _mix64((key + ((index >> 1) + 1) * gamma) & _MASK)
    return (bits >> (32 * (index & 1))) & 0xFFFFFFFF
