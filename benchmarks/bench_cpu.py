"""CPU benchmark: lorax_merge against the upstream pure-PyTorch merge code.

One run measures, on the CPU and with the same threads:

* every strategy on 3 task tensors of 4096 x 4096 (float32 and bfloat16,
  density 0.5), ``lorax_merge.merge`` against ``benchmarks/upstream.py`` (the
  server's topk / bernoulli / stack code), median of several runs each;
* a memory-bandwidth floor for the same bytes: the time of a large
  ``torch.add(a, b, out=c)`` gives the bandwidth, and a merge must at least
  read every task once and write the output once;
* a LoRA-sized call (3 x [16, 4096] float32), median of hundreds of calls, in
  microseconds;
* the peak extra memory of one merge, as a multiple of the output's size.
  Each case runs in a fresh Python process: it builds the inputs, warms the
  code path on a tiny input, resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs``) and records the resident set size, runs one
  merge and reads the peak (``VmHWM``).  The difference (which includes the
  output itself) divided by the output's size is reported.  Where the counter
  cannot be reset, ``ru_maxrss`` before and after is used instead.

It prints markdown tables, with the targets beside the numbers:

    python benchmarks/bench_cpu.py                  # full run (about 2-3 minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick          # small sizes, smoke test
    python benchmarks/bench_cpu.py --markdown-out bench.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import upstream  # noqa: E402
from bench_common import import_lorax_merge, proc_status_kb, reset_peak_rss  # noqa: E402

STRATEGIES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPEEDUP_TARGETS = {"linear": 4.0, "ties": 30.0, "dare_linear": 15.0, "dare_ties": 15.0}
LORA_TARGET_US = 150.0
MEMORY_TARGET = 2.5
N_TASKS = 3
DENSITY = 0.5
WEIGHTS = [0.5, 0.3, 0.2]
SEED = 1234


# --------------------------------------------------------------------------- helpers


def sample_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall times of ``reps`` calls of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    return statistics.median(sample_seconds(fn, reps, warmup))


def make_tasks(size: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen, dtype=dtype) for _ in range(N_TASKS)]


def ours_fn(strategy: str):
    lorax_merge = import_lorax_merge()

    def run(tasks, weights):
        return lorax_merge.merge(tasks, weights, strategy, density=DENSITY, seed=SEED)

    return run


def upstream_fn(strategy: str):
    fn = upstream.STRATEGIES[strategy]

    def run(tasks, weights):
        return fn(tasks, weights, density=DENSITY, majority_sign_method="total")

    return run


def bandwidth_bytes_per_s(numel: int, reps: int) -> float:
    """Bandwidth of ``torch.add(a, b, out=c)`` on float32 buffers (2 reads, 1 write)."""
    a = torch.randn(numel)
    b = torch.randn(numel)
    c = torch.empty(numel)
    seconds = median_seconds(lambda: torch.add(a, b, out=c), reps=reps, warmup=2)
    return 3 * a.numel() * a.element_size() / seconds


def time_big_cases(
    dtype_name: str, tasks: list[torch.Tensor], weights: torch.Tensor, reps: int, bandwidth: float
) -> list[dict]:
    """Time every strategy, ours and upstream, on one set of large tasks."""
    rows = []
    for strategy in STRATEGIES:
        ours = partial(ours_fn(strategy), tasks, weights)
        theirs = partial(upstream_fn(strategy), tasks, weights)
        out = ours()
        t_ours = median_seconds(ours, reps=reps, warmup=1)
        gc.collect()
        t_up = median_seconds(theirs, reps=max(3, reps - 2), warmup=0)  # seconds per run
        gc.collect()
        moved = sum(t.numel() * t.element_size() for t in tasks) + out.numel() * out.element_size()
        rows.append(
            {
                "strategy": strategy,
                "dtype": dtype_name,
                "ours": t_ours,
                "upstream": t_up,
                "floor": moved / bandwidth,
            }
        )
        print(
            f"  {dtype_name} {strategy}: ours {fmt_ms(t_ours)} ms, upstream {fmt_ms(t_up)} ms",
            file=sys.stderr,
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- memory (subprocess)


def memory_case(impl: str, strategy: str, dtype_name: str, side: int) -> dict:
    """Run one merge in this (fresh) process and measure its peak extra memory."""
    dtype = DTYPES[dtype_name]
    tasks = make_tasks((side, side), dtype)
    weights = torch.tensor(WEIGHTS)
    fn = ours_fn(strategy) if impl == "ours" else upstream_fn(strategy)
    fn(make_tasks((8, 8), dtype), weights)  # load and initialise the code path
    gc.collect()
    exact = reset_peak_rss()
    if exact:
        before_kb = proc_status_kb("VmRSS")
    else:
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn(tasks, weights)
    if exact:
        peak_kb = proc_status_kb("VmHWM")
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_bytes = out.numel() * out.element_size()
    extra = max(peak_kb - before_kb, 0) * 1024
    return {
        "extra_bytes": extra,
        "out_bytes": out_bytes,
        "ratio": extra / out_bytes,
        "exact": exact,
    }


def run_memory_cases(cases: list[tuple[str, str, str]], side: int, threads: int) -> dict:
    """Each case in its own subprocess, two at a time (memory, not time, is measured)."""

    def one(case):
        impl, strategy, dtype_name = case
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-case",
            impl,
            strategy,
            dtype_name,
            str(side),
            "--threads",
            str(threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory case {case} failed:\n{proc.stderr}")
        return case, json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, cases))


# --------------------------------------------------------------------------- report


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few runs (smoke test)"
    )
    parser.add_argument("--markdown-out", type=Path, help="also write the tables to this file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument(
        "--memory-case",
        nargs=4,
        metavar=("IMPL", "STRATEGY", "DTYPE", "SIDE"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    if args.memory_case:
        impl, strategy, dtype_name, side = args.memory_case
        print(json.dumps(memory_case(impl, strategy, dtype_name, int(side))))
        return 0

    lorax_merge = import_lorax_merge()

    side = 1024 if args.quick else 4096
    reps_big = 3 if args.quick else 5
    reps_lora = 100 if args.quick else 500
    reps_lora_upstream = 50 if args.quick else 100  # upstream takes milliseconds per call
    started = time.perf_counter()

    # bandwidth floor, measured in this run on buffers larger than any cache
    bandwidth_numel = 4096 * 4096
    bandwidth = bandwidth_bytes_per_s(bandwidth_numel, reps=10)
    load_before = os.getloadavg()[0]

    weights = torch.tensor(WEIGHTS)  # the server's torch.tensor(weights)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        tasks = make_tasks((side, side), dtype)
        rows += time_big_cases(dtype_name, tasks, weights, reps_big, bandwidth)
        del tasks
        gc.collect()

    big_done = time.perf_counter()
    lora_tasks = [torch.randn(16, 4096) for _ in range(N_TASKS)]
    lora_rows = []
    for strategy in STRATEGIES:
        ours, theirs = ours_fn(strategy), upstream_fn(strategy)
        ours_times = sample_seconds(partial(ours, lora_tasks, weights), reps=reps_lora, warmup=20)
        t_up = median_seconds(
            partial(theirs, lora_tasks, weights), reps=reps_lora_upstream, warmup=5
        )
        lora_rows.append(
            {
                "strategy": strategy,
                "ours": statistics.median(ours_times),
                "ours_min": min(ours_times),
                "upstream": t_up,
            }
        )
    lora_done = time.perf_counter()

    memory: dict = {}
    if not args.skip_memory:
        dtype_names = ["fp32"] if args.quick else list(DTYPES)
        cases = [
            (impl, s, d) for d in dtype_names for s in STRATEGIES for impl in ("ours", "upstream")
        ]
        print(f"  peak memory: {len(cases)} cases, one process each", file=sys.stderr, flush=True)
        memory = run_memory_cases(cases, side, threads)

    elapsed = time.perf_counter() - started
    info = lorax_merge.build_info()
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {threads} torch threads; "
        f"torch {torch.__version__}; lorax_merge {info.get('version', '?')}",
        f"Load average before the run: {load_before:.2f} (timings are only meaningful on an idle "
        "machine).",
        f"Bandwidth floor: `torch.add(a, b, out=c)` on {bandwidth_numel >> 20}M float32 runs at "
        f"{bandwidth / 1e9:.1f} GB/s; "
        "floor = (bytes of the tasks + bytes of the output) / bandwidth.",
        "",
        f"### {N_TASKS} tasks of {side}x{side}, density {DENSITY} (median of {reps_big} runs; "
        f"{max(3, reps_big - 2)} for upstream)",
        "",
        "| strategy | dtype | upstream (ms) | lorax_merge (ms) | speedup | target | met "
        "| floor (ms) | x floor | peak extra memory, upstream | peak extra memory, lorax_merge |",
        "|---|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = r["upstream"] / r["ours"]
        target = SPEEDUP_TARGETS.get(r["strategy"])
        mem_up = memory.get(("upstream", r["strategy"], r["dtype"]))
        mem_ours = memory.get(("ours", r["strategy"], r["dtype"]))
        mem_up_s = f"{mem_up['ratio']:.1f}x" if mem_up else "-"
        if mem_ours:
            mem_ours_s = f"{mem_ours['ratio']:.2f}x ({verdict(mem_ours['ratio'] < MEMORY_TARGET)})"
        else:
            mem_ours_s = "-"
        lines.append(
            f"| {r['strategy']} | {r['dtype']} | {fmt_ms(r['upstream'])} | {fmt_ms(r['ours'])} "
            f"| {speedup:.1f}x | {f'>= {target:g}x' if target else '-'} "
            f"| {verdict(speedup >= target) if target else '-'} | {fmt_ms(r['floor'])} "
            f"| {r['ours'] / r['floor']:.1f} | {mem_up_s} | {mem_ours_s} |"
        )
    lines += [
        "",
        f"Peak extra memory: peak RSS of one merge minus the RSS before it (output included), "
        f"as a multiple of the output's size; target < {MEMORY_TARGET}x.",
        "",
        f"### LoRA-sized call: {N_TASKS} x [16, 4096] float32 (median of {reps_lora} calls, "
        f"{reps_lora_upstream} for upstream)",
        "",
        "| strategy | upstream (us) | lorax_merge (us) | lorax_merge fastest (us) | speedup "
        "| target | met |",
        "|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in lora_rows:
        us_ours, us_up = r["ours"] * 1e6, r["upstream"] * 1e6
        lines.append(
            f"| {r['strategy']} | {us_up:.0f} | {us_ours:.1f} | {r['ours_min'] * 1e6:.1f} "
            f"| {us_up / us_ours:.1f}x "
            f"| < {LORA_TARGET_US:g} us | {verdict(us_ours < LORA_TARGET_US)} |"
        )
    lines += [
        "",
        f"Total benchmark time: {elapsed:.0f} s (large tensors {big_done - started:.0f} s, "
        f"LoRA-sized {lora_done - big_done:.0f} s, memory {started + elapsed - lora_done:.0f} s).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
