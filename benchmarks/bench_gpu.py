"""GPU benchmark: lorax_merge's CUDA kernels against the upstream pure-PyTorch merge code.

One run measures, on one CUDA device:

* the device-to-device copy bandwidth (``dst.copy_(src)`` of a large buffer; bytes = read
  + write), the ceiling a memory-bound merge is compared with;
* every strategy on 4 task tensors of 8192 x 8192, bfloat16 and float32 (density 0.5,
  weights given as a list, so the result is float32): ``lorax_merge.merge`` against
  ``benchmarks/upstream.py`` on the GPU, and the merge's effective bandwidth
  (each input read once + the output written once, over the kernels' time) as a fraction
  of the copy bandwidth;
* a batched merge of three adapters shaped like a Llama-3-8B rank-16 LoRA adapter (the
  A and B factors of all 7 projection modules in all 32 layers, bfloat16, 448 groups of 3
  tensors): ``lorax_merge.merge_many`` against the upstream per-module loop.

Times are CUDA-event intervals, the median of many runs after warm-up: around whole calls
(host work included), and around the kernels alone (the call queued behind a sleep kernel,
so the host's work overlaps it). It prints markdown tables with the targets beside the numbers:

    python benchmarks/bench_gpu.py                   # full run (a minute or two on an H200)
    python benchmarks/bench_gpu.py --quick           # small sizes, smoke test
    python benchmarks/bench_gpu.py --markdown-out gpu_bench.md --json-out gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import upstream  # noqa: E402
from bench_common import import_lorax_merge  # noqa: E402

lorax_merge = import_lorax_merge()

STRATEGIES = ["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
#: fraction of the copy bandwidth each strategy must reach on the big case
BANDWIDTH_TARGETS = {"linear": 0.75, "dare_linear": 0.75, "dare_ties": 0.75, "ties": 0.40}
#: speed-up over the upstream code on the big case
SPEEDUP_TARGETS = {"ties": 50.0, "dare_linear": 10.0, "dare_ties": 10.0}
#: batched adapter merge: TIES under this many milliseconds, and this much faster
ADAPTER_TIES_MS = 1.0
ADAPTER_SPEEDUP = 20.0
DENSITY = 0.5
SEED = 1234

# Llama-3-8B: hidden 4096, MLP 14336, 8 key/value heads of 128.
LLAMA3_8B_PROJECTIONS = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
LLAMA3_8B_LAYERS = 32
LORA_RANK = 16


# --------------------------------------------------------------------------- timing


def _event_seconds(fn: Callable[[], object], reps: int, before: Callable[[], object]) -> float:
    """Median CUDA-event interval around ``fn()``, ``before()`` being queued ahead of each."""
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        before()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cuda_median_seconds(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median CUDA-event time of ``fn()`` (one call per interval, host work included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _event_seconds(fn, reps, before=lambda: None)


def cuda_device_seconds(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median GPU time of ``fn()``'s kernels alone: the stream is first kept busy (a sleep
    kernel) while the host queues the call, so host work does not show in the interval."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    host = cuda_median_seconds(fn, 3, warmup=0)
    cycles = int(max(2e-3, 4 * host) * 2e9)  # comfortably longer than queueing the call
    return _event_seconds(fn, reps, before=lambda: torch.cuda._sleep(cycles))


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    seconds = cuda_median_seconds(lambda: dst.copy_(src), reps, warmup=3)
    return 2 * src.numel() * src.element_size() / seconds


# --------------------------------------------------------------------------- cases


BIG_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def big_case(
    side: int, n_tasks: int, dtype_name: str, reps: int, upstream_reps: int, copy_bw: float
) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    tasks = [
        torch.randn(side, side, generator=gen, device="cuda", dtype=torch.float32).to(
            BIG_DTYPES[dtype_name]
        )
        for _ in range(n_tasks)
    ]
    weights = [round(1.0 / (i + 2), 3) for i in range(n_tasks)]
    w_gpu = torch.tensor(weights, device="cuda")
    numel = tasks[0].numel()
    rows = []
    for strategy in STRATEGIES:
        kw = (
            {"density": DENSITY, "seed": SEED}
            if strategy.startswith("dare")
            else {"density": DENSITY}
        )

        def ours(strategy=strategy, kw=kw):
            return lorax_merge.merge(tasks, weights, strategy, **kw)

        out = ours()
        nbytes = n_tasks * numel * tasks[0].element_size() + numel * out.element_size()
        del out
        t_ours = cuda_median_seconds(ours, reps)
        t_gpu = cuda_device_seconds(ours, reps, warmup=1)

        def theirs(strategy=strategy):
            return upstream.merge(tasks, w_gpu, strategy, density=DENSITY, apply_rescale=True)

        t_up = cuda_median_seconds(theirs, upstream_reps, warmup=1)
        torch.cuda.empty_cache()
        rows.append(
            {
                "case": f"{n_tasks} x {side}x{side} {dtype_name}",
                "strategy": strategy,
                "ours_s": t_ours,
                "ours_gpu_s": t_gpu,
                "upstream_s": t_up,
                "bytes": nbytes,
                # the kernels' bandwidth: the host's launch work is not the memory system's
                "fraction_of_copy": nbytes / t_gpu / copy_bw,
                "speedup": t_up / t_ours,
            }
        )
    return rows


def adapter_shapes(layers: int) -> list[tuple[int, int]]:
    """Shapes of the A ([r, in]) and B ([out, r]) factors of every module of every layer."""
    shapes = []
    for _ in range(layers):
        for d_in, d_out in LLAMA3_8B_PROJECTIONS.values():
            shapes.append((LORA_RANK, d_in))
            shapes.append((d_out, LORA_RANK))
    return shapes


def adapter_case(layers: int, n_adapters: int, reps: int, upstream_reps: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(SEED + 1)
    shapes = adapter_shapes(layers)
    groups = [
        [
            (0.02 * torch.randn(shape, generator=gen, device="cuda")).to(torch.bfloat16)
            for _ in range(n_adapters)
        ]
        for shape in shapes
    ]
    weights = [round(1.0 / (i + 2), 3) for i in range(n_adapters)]
    w_gpu = torch.tensor(weights, device="cuda")
    numel = sum(g[0].numel() for g in groups)
    rows = []
    for strategy in ["linear", "ties", "dare_ties"]:
        kw = {"density": DENSITY, "seed": SEED}

        def ours(strategy=strategy, kw=kw):
            return lorax_merge.merge_many(groups, weights, strategy=strategy, **kw)

        outs = ours()
        nbytes = n_adapters * numel * 2 + sum(o.numel() * o.element_size() for o in outs)
        del outs
        t_ours = cuda_median_seconds(ours, reps, warmup=3)
        t_gpu = cuda_device_seconds(ours, reps, warmup=1)

        def theirs(strategy=strategy):
            return [
                upstream.merge(g, w_gpu, strategy, density=DENSITY, apply_rescale=True)
                for g in groups
            ]

        t_up = cuda_median_seconds(theirs, upstream_reps, warmup=1)
        rows.append(
            {
                "case": f"{n_adapters} adapters, {len(groups)} modules ({layers} layers), bf16",
                "strategy": strategy,
                "ours_s": t_ours,
                "ours_gpu_s": t_gpu,
                "upstream_s": t_up,
                "bytes": nbytes,
                "speedup": t_up / t_ours,
            }
        )
    return rows


# --------------------------------------------------------------------------- report


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def big_table(rows: list[dict], copy_bw: float) -> str:
    head = ["case", "strategy", "lorax_merge ms", "of which GPU ms", "GB/s", "% of copy"]
    head += ["target", "upstream ms", "speed-up", "target", "met"]
    lines = [
        f"Copy bandwidth (device to device, read + write): {copy_bw / 1e9:.0f} GB/s",
        "",
        _row(head),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bw_target = BANDWIDTH_TARGETS.get(r["strategy"])
        sp_target = SPEEDUP_TARGETS.get(r["strategy"])
        checks = []
        if bw_target is not None:
            checks.append(r["fraction_of_copy"] >= bw_target)
        if sp_target is not None:
            checks.append(r["speedup"] >= sp_target)
        cells = [
            r["case"],
            r["strategy"],
            f"{r['ours_s'] * 1e3:.3f}",
            f"{r['ours_gpu_s'] * 1e3:.3f}",
            f"{r['bytes'] / r['ours_gpu_s'] / 1e9:.0f}",
            f"{100 * r['fraction_of_copy']:.0f}%",
            "" if bw_target is None else f">= {100 * bw_target:.0f}%",
            f"{r['upstream_s'] * 1e3:.2f}",
            f"{r['speedup']:.1f}x",
            "" if sp_target is None else f">= {sp_target:.0f}x",
            verdict(all(checks) if checks else None),
        ]
        lines.append(_row(cells))
    lines.append("")
    lines.append(
        "lorax_merge ms: the whole call (host work included), against which the speed-up is "
        "counted; GPU ms: its kernels alone, from which GB/s and the fraction of the copy "
        "bandwidth are counted."
    )
    return "\n".join(lines)


def adapter_table(rows: list[dict]) -> str:
    head = ["case", "strategy", "lorax_merge.merge_many ms", "of which GPU ms", "upstream loop ms"]
    lines = [
        _row(head + ["speed-up", "target", "met"]),
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        target, ok = "", None
        if r["strategy"] == "ties":
            target = f"< {ADAPTER_TIES_MS:g} ms and >= {ADAPTER_SPEEDUP:.0f}x"
            ok = r["ours_s"] * 1e3 < ADAPTER_TIES_MS and r["speedup"] >= ADAPTER_SPEEDUP
        cells = [
            r["case"],
            r["strategy"],
            f"{r['ours_s'] * 1e3:.3f}",
            f"{r['ours_gpu_s'] * 1e3:.3f}",
            f"{r['upstream_s'] * 1e3:.2f}",
            f"{r['speedup']:.1f}x",
            target,
            verdict(ok),
        ]
        lines.append(_row(cells))
    lines.append("")
    lines.append(
        "lorax_merge.merge_many ms: the whole call (host work included); GPU ms: its kernels "
        "alone; the target is checked on the whole call."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--reps", type=int, default=30, help="timed runs of lorax_merge per case")
    parser.add_argument(
        "--upstream-reps", type=int, default=5, help="timed runs of the upstream code"
    )
    parser.add_argument("--markdown-out", type=Path, help="also write the tables here")
    parser.add_argument("--json-out", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device visible; nothing to benchmark", file=sys.stderr)
        return 2
    info = lorax_merge.build_info()
    if not info.get("cuda_compiled"):
        print("lorax_merge was built without its CUDA kernels", file=sys.stderr)
        return 2

    side, layers = (1024, 2) if args.quick else (8192, LLAMA3_8B_LAYERS)
    reps = 5 if args.quick else args.reps
    upstream_reps = 2 if args.quick else args.upstream_reps
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth((64 if args.quick else 2048) << 20, 10 if args.quick else 30)
    big = []
    for dtype_name in BIG_DTYPES:
        big += big_case(side, 4, dtype_name, reps, upstream_reps, copy_bw)
        torch.cuda.empty_cache()
    adapters = adapter_case(layers, 3, reps, upstream_reps)

    header = (
        f"GPU: {name}; torch {torch.__version__}; lorax_merge {info.get('version')} "
        f"(CUDA archs {info.get('cuda_archs')}); density {DENSITY}; medians of {reps} runs "
        f"(upstream: {upstream_reps}), CUDA events"
    )
    text = "\n\n".join([header, big_table(big, copy_bw), adapter_table(adapters)]) + "\n"
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text)
    if args.json_out:
        payload = {"device": name, "copy_bandwidth": copy_bw, "big": big, "adapters": adapters}
        args.json_out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
