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

It prints markdown tables, with the targets beside the numbers, and the CPU capability level
the kernels ran at (``lorax_merge.build_info()["cpu_capability"]``):

    python benchmarks/bench_cpu.py                  # full run (about 2-3 minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick          # small sizes, smoke test
    python benchmarks/bench_cpu.py --markdown-out bench.md
    python benchmarks/bench_cpu.py --cpu-capability avx2,avx512   # levels side by side

``--cpu-capability`` runs the benchmark once per level in a fresh process with
``LORAX_MERGE_CPU_CAPABILITY`` and ``ATEN_CPU_CAPABILITY`` set to it, so the upstream code's
torch kernels run at that level too, as on a CPU without the wider instructions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from bench_cpu_report import fmt_ms, report  # noqa: E402

STRATEGIES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
N_TASKS = 3
DENSITY = 0.5
WEIGHTS = [0.5, 0.3, 0.2]
SEED = 1234
BANDWIDTH_NUMEL = 4096 * 4096


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


def measure(args: argparse.Namespace) -> dict:
    """Every timing of one run, at the CPU capability level this process uses."""
    lorax_merge = import_lorax_merge()
    side = 1024 if args.quick else 4096
    reps_big = 3 if args.quick else 5
    reps_lora = 100 if args.quick else 500
    reps_lora_upstream = 50 if args.quick else 100  # upstream takes milliseconds per call
    started = time.perf_counter()
    # bandwidth floor, measured in this run on buffers larger than any cache
    bandwidth = bandwidth_bytes_per_s(BANDWIDTH_NUMEL, reps=10)
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
        memory = {"/".join(k): v for k, v in run_memory_cases(cases, side, args.threads).items()}
    info = lorax_merge.build_info()
    return {
        "level": info["cpu_capability"],
        "tasks": N_TASKS,
        "density": DENSITY,
        "bandwidth_numel": BANDWIDTH_NUMEL,
        "torch_level": torch.backends.cpu.get_cpu_capability(),
        "version": info["version"],
        "threads": torch.get_num_threads(),
        "side": side,
        "reps": [reps_big, max(3, reps_big - 2), reps_lora, reps_lora_upstream],
        "bandwidth": bandwidth,
        "load_before": load_before,
        "big": rows,
        "lora": lora_rows,
        "memory": memory,
        "seconds": [big_done - started, lora_done - big_done, time.perf_counter() - lora_done],
    }


def run_at_levels(levels: list[str], args: argparse.Namespace) -> dict:
    """measure() in a fresh process per level, lorax_merge's and ATen's CPU level forced
    alike (as on a machine that has no wider instructions); memory in the first only."""
    results = {}
    for i, level in enumerate(levels):
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_cpu_{os.getpid()}_{level}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json-out", str(out)]
        cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        cmd += ["--skip-memory"] if i > 0 or args.skip_memory else []
        env = dict(os.environ, LORAX_MERGE_CPU_CAPABILITY=level, ATEN_CPU_CAPABILITY=level)
        print(f"level {level}:", file=sys.stderr, flush=True)
        subprocess.run(cmd, env=env, check=True)
        results[level] = json.loads(out.read_text())
        out.unlink()
    return results


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
        "--cpu-capability",
        metavar="LEVELS",
        help="comma-separated CPU capability levels (default, avx2, avx512) or 'all' (every "
        "level this machine runs): one run per level, lorax_merge and ATen forced to it, the "
        "tables side by side. Default: one run at the level chosen at import",
    )
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-case",
        nargs=4,
        metavar=("IMPL", "STRATEGY", "DTYPE", "SIDE"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    if args.memory_case:
        impl, strategy, dtype_name, side = args.memory_case
        print(json.dumps(memory_case(impl, strategy, dtype_name, int(side))))
        return 0
    if args.json_out:
        args.json_out.write_text(json.dumps(measure(args)))
        return 0
    if args.cpu_capability:
        from lorax_merge import _C

        supported = _C.supported_cpu_capabilities()
        wanted = args.cpu_capability.split(",")
        levels = supported if wanted == ["all"] else wanted
        unknown = [lv for lv in levels if lv not in supported]
        if unknown:
            parser.error(f"--cpu-capability: {unknown} not supported here; supported: {supported}")
        results = run_at_levels(levels, args)
    else:
        result = measure(args)
        results = {result["level"]: result}
    text = report(results)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
