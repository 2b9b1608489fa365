"""CUDA kernels: the same results as the CPU kernels, bit for bit, and the GPU-only
guarantees (no host synchronisation, graph capture, streams, devices, large tensors).

Every test here needs a visible CUDA device and an extension built with its CUDA kernels;
without them the module is skipped, with the reason. The device-parametrised core tests
(``test_strategies.py`` and friends) also run their CUDA cases when a GPU is visible.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ALL_DTYPES,
    ELECTING_STRATEGIES,
    STRATEGIES,
    assert_unmodified,
    make_tasks,
    merge_kwargs,
    snapshot,
)

import lorax_merge
from lorax_merge import utils

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
# Sizes around the vector width (8), the merge block (2048 elements) and the selection
# tile (32768 elements).
ODD_SIZES = [1, 3, 7, 9, 2047, 2049, 32767, 32769, 70001]


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same dtype and shape, and the same values (NaN where NaN) as ``expected``."""
    got_c = got.detach().cpu()
    exp_c = expected.detach().cpu()
    assert got_c.dtype == exp_c.dtype, f"{what}: dtype {got_c.dtype} != {exp_c.dtype}"
    assert got_c.shape == exp_c.shape, f"{what}: shape {tuple(got_c.shape)} != {tuple(exp_c.shape)}"
    torch.testing.assert_close(
        got_c, exp_c, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


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
        assert_same(gpu, cpu, f"{strategy} {dtype} d={density} {method}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_ties"])
def test_out_dtypes_equal_cpu(strategy, out_dtype):
    tasks = make_tasks(4, (3001,), torch.bfloat16, "normal", seed=3)
    kw = merge_kwargs(strategy, 0.4, seed=5)
    cpu, gpu = both_devices(tasks, [1.0, -0.5, 0.25, 2.0], strategy, out_dtype=out_dtype, **kw)
    assert gpu.dtype == out_dtype
    assert_same(gpu, cpu, f"{strategy} -> {out_dtype}")


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_odd_sizes_equal_cpu(strategy, n):
    tasks = make_tasks(2, (n,), torch.float16, "normal", seed=n)
    cpu, gpu = both_devices(tasks, [0.75, 1.5], strategy, **merge_kwargs(strategy, 0.35, seed=1))
    assert_same(gpu, cpu, f"{strategy} n={n}")


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
    assert_same(got, expected, f"{strategy} misaligned tasks")
    # A misaligned destination as well.
    buffer = torch.full((n + 1,), math.nan, dtype=expected.dtype, device="cuda")
    returned = lorax_merge.merge(views_gpu, WEIGHTS3, strategy, out=buffer[1:], **kw)
    assert returned.data_ptr() == buffer[1:].data_ptr()
    assert_same(buffer[1:], expected, f"{strategy} misaligned out")
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
    assert_same(got, expected, strategy)
    assert_unmodified(before, tasks_gpu)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_and_inf_equal_cpu(strategy):
    tasks = make_tasks(3, (1000,), torch.float32, "normal", seed=6)
    tasks[0][::97] = math.nan
    tasks[1][5::89] = math.inf
    tasks[2][7::101] = -math.inf
    cpu, gpu = both_devices(tasks, WEIGHTS3, strategy, **merge_kwargs(strategy, 0.5, seed=2))
    assert_same(gpu, cpu, strategy)


def test_empty_and_scalar_tensors():
    for shape in [(0,), (4, 0, 3), ()]:
        tasks = [torch.randn(shape) for _ in range(2)]
        for strategy in STRATEGIES:
            kw = merge_kwargs(strategy, 0.5, seed=3)
            cpu, gpu = both_devices(tasks, [1.0, 2.0], strategy, **kw)
            assert_same(gpu, cpu, f"{strategy} shape {shape}")


def test_seventeen_tasks_equal_cpu():
    tasks = make_tasks(17, (5000,), torch.bfloat16, "normal", seed=8)
    weights = [(-1) ** i * (0.1 + i / 17) for i in range(17)]
    for strategy in STRATEGIES:
        cpu, gpu = both_devices(tasks, weights, strategy, **merge_kwargs(strategy, 0.3, seed=12))
        assert_same(gpu, cpu, strategy)


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
        assert_same(got, expected, f"{strategy} weights {wdtype}")


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
        assert_same(gpu, cpu, f"{dtype} d={density}")


@pytest.mark.parametrize("n", [100, 32768, 32769, 300001])
def test_tie_heavy_bf16_magnitude_prune_equals_cpu(n):
    # Eight distinct values: the threshold key is shared by a large fraction of the tensor,
    # so the tie cut (lower flat index first) decides many elements, across many tiles.
    x = make_tasks(1, (n,), torch.bfloat16, "tie_heavy", seed=n)[0]
    for density in (1 / n, 0.1, 0.29, 0.5, 0.77, 1 - 1 / n):
        cpu = utils.prune(x, density, "magnitude")
        gpu = utils.prune(x.cuda(), density, "magnitude")
        assert_same(gpu, cpu, f"n={n} d={density}")
        kept = int(density * n)
        assert int((gpu != 0).sum()) <= kept


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_magnitude_threshold_across_tiles_equals_cpu(dtype):
    # Several selection tiles, with every digit pass of the key width exercised.
    x = make_tasks(1, (3, 40000), dtype, "normal", seed=15)[0]
    for density in (0.001, 0.3, 0.5, 0.9999):
        assert_same(
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
    assert_same(gpu, cpu, f"disjoint {dtype}")


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
        assert_same(a, b, f"group {g}")
    # Each group equals a plain merge with that group's derived seed.
    for g in (0, len(groups) - 1):
        one = lorax_merge.merge(
            gpu_groups[g],
            weights[g],
            strategy,
            density=0.4,
            seed=lorax_merge.derive_seed(77, g),
        )
        assert_same(gpu[g], one, f"group {g} vs merge")


def test_merge_many_with_gpu_weights_and_mixed_dtypes():
    groups = _groups(5, 40, torch.float32) + _groups(6, 7, torch.float16)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    groups = [g[:1] + g[:1] * 3 if len(g) < 4 else g for g in groups]  # four tasks each
    for strategy in STRATEGIES:
        kw = {"strategy": strategy, "density": 0.5, "seed": 3}
        expected = lorax_merge.merge_many(groups, weights, **kw)
        got = lorax_merge.merge_many([on_cuda(g) for g in groups], weights.cuda(), **kw)
        for g, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{strategy} group {g}")


# --------------------------------------------------------------------------- GPU guarantees


def test_no_host_synchronisation():
    tasks = make_tasks(3, (257, 33), torch.bfloat16, "normal", seed=17, device="cuda")
    w_gpu = torch.tensor(WEIGHTS3, device="cuda")
    groups = [tasks, tasks[:2]] * 150  # large enough for the uploaded-table path
    # Warm up (lazy initialisation is not part of a merge).
    for strategy in STRATEGIES:
        lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5, seed=1)
        lorax_merge.merge_many(
            groups, [[1.0] * len(g) for g in groups], strategy=strategy, density=0.5, seed=1
        )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for strategy in STRATEGIES:
            lorax_merge.merge(tasks, WEIGHTS3, strategy, density=0.5, seed=1)
            lorax_merge.merge(tasks, w_gpu, strategy, density=0.5, seed=1)
            lorax_merge.merge_many(
                groups, [[1.0] * len(g) for g in groups], strategy=strategy, density=0.5, seed=1
            )
            lorax_merge.merge_many([tasks] * 4, w_gpu, strategy=strategy, density=0.5, seed=1)
        utils.calculate_majority_sign_mask(torch.stack(tasks), "total")
        utils.prune(tasks[0], 0.3, "magnitude")
        utils.prune(tasks[0], 0.3, "random", seed=4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


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
    assert_same(captured, expected, f"{strategy} replay")
    # New inputs in the same buffers: the replay recomputes everything (thresholds too).
    fresh = make_tasks(3, (4099,), torch.bfloat16, "normal", seed=19, device="cuda")
    for t, f in zip(tasks, fresh):
        t.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    assert_same(
        captured, lorax_merge.merge(fresh, WEIGHTS3, strategy, **kw), f"{strategy} new inputs"
    )


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
        assert_same(a, b, "merge_many replay")
    many = groups * 100
    with pytest.raises(ValueError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            lorax_merge.merge_many(many, [1.0, -2.0], **kw)


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
        assert_same(a, b, f"{s} on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    tasks = make_tasks(3, (999,), torch.float16, "normal", seed=21)
    current = torch.cuda.current_device()
    for strategy in STRATEGIES:
        kw = merge_kwargs(strategy, 0.5, seed=6)
        got = lorax_merge.merge([t.to("cuda:1") for t in tasks], WEIGHTS3, strategy, **kw)
        assert got.device == torch.device("cuda:1")
        assert_same(got, lorax_merge.merge(tasks, WEIGHTS3, strategy, **kw), strategy)
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
