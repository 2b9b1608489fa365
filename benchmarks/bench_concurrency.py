"""Concurrency and memory benchmark: GIL release, and peak memory against upstream.

1. **Two merges at once.** The compiled merge releases the GIL while it runs, so two Python
   threads that merge large tensors at the same time overlap. With ``torch.set_num_threads(1)``
   (one OpenMP thread per merge), each strategy is timed as two merges run one after the other
   and as two merges run at once in two threads; ``sequential / concurrent`` approaches 2 on a
   machine with two free cores, and would stay near 1 if the GIL were held. Medians of several
   runs.
2. **Peak extra memory of one merge**, as a multiple of the output's size, for ``lorax_merge``
   (with a new output and with ``out=``) and for the upstream code (``benchmarks/upstream.py``).
   Each case runs in a fresh process: it builds the inputs, warms the code path on a tiny
   input, resets the peak resident set size (``/proc/self/clear_refs``), runs one merge and
   reads the peak (``VmHWM``). The figure includes the output itself, except with ``out=``,
   where the caller's buffer already exists. Where the counter cannot be reset, ``ru_maxrss``
   before and after is used.

Prints markdown tables:

    python benchmarks/bench_concurrency.py            # about a minute on 2 cores
    python benchmarks/bench_concurrency.py --quick    # smaller tensors, fewer runs
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
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import upstream  # noqa: E402
from bench_common import import_lorax_merge, proc_status_kb, reset_peak_rss  # noqa: E402

STRATEGIES = ["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
WEIGHTS = [1.0, 0.5, -0.75]
DENSITY = 0.5
SEED = 7


def make_tasks(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in WEIGHTS]


# ------------------------------------------------------------------------------- concurrency


def _two_concurrent(fn, args_a, args_b) -> float:
    """Wall time of ``fn(*args_a)`` and ``fn(*args_b)`` started together in two threads."""
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def run(args):
        try:
            barrier.wait()
            fn(*args)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in (args_a, args_b)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def _two_sequential(fn, args_a, args_b) -> float:
    start = time.perf_counter()
    fn(*args_a)
    fn(*args_b)
    return time.perf_counter() - start


def concurrency_rows(shape: tuple[int, ...], reps: int) -> list[dict]:
    lorax_merge = import_lorax_merge()
    torch.set_num_threads(1)
    tasks_a = make_tasks(shape, torch.float32, seed=1)
    tasks_b = make_tasks(shape, torch.float32, seed=2)
    rows = []
    for strategy in STRATEGIES:

        def merge(tasks, strategy=strategy):
            return lorax_merge.merge(tasks, WEIGHTS, strategy, density=DENSITY, seed=SEED)

        merge(tasks_a)  # warm up
        seq, conc = [], []
        for _ in range(reps):  # interleaved, so that load changes hit both alike
            seq.append(_two_sequential(merge, (tasks_a,), (tasks_b,)))
            conc.append(_two_concurrent(merge, (tasks_a,), (tasks_b,)))
        s, c = statistics.median(seq), statistics.median(conc)
        rows.append({"strategy": strategy, "sequential": s, "concurrent": c, "speedup": s / c})
    return rows


# ------------------------------------------------------------------------------------ memory


def _status_bytes(field: str) -> int | None:
    kb = proc_status_kb(field)
    return None if kb is None else kb * 1024


def memory_case(impl: str, strategy: str, dtype_name: str, side: int) -> dict:
    """Peak extra memory of one merge in this (fresh) process."""
    dtype = getattr(torch, dtype_name)
    tasks = make_tasks((side, side), dtype)
    small = [t[:8, :8].clone() for t in tasks]
    out = None
    if impl == "upstream":
        weights = torch.tensor(WEIGHTS)

        def run(ts):
            return upstream.merge(ts, weights, strategy, density=DENSITY)
    else:
        lorax_merge = import_lorax_merge()
        if impl == "ours, out=":
            # the caller's buffer exists (and is resident) before the call
            out = torch.zeros((side, side), dtype=torch.float32)

        def run(ts):
            target = out if (out is not None and ts is tasks) else None
            return lorax_merge.merge(ts, WEIGHTS, strategy, density=DENSITY, seed=SEED, out=target)

    run(small)  # load and initialise the code path
    gc.collect()
    exact = reset_peak_rss()
    before = _status_bytes("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(tasks)
    if exact:
        peak = _status_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not exact:  # ru_maxrss is in KiB
        before, peak = before * 1024, peak * 1024
    out_bytes = result.numel() * result.element_size()
    extra = max(peak - before, 0)
    return {"extra": extra, "out_bytes": out_bytes, "ratio": extra / out_bytes, "exact": exact}


def memory_rows(side: int, dtypes: list[str]) -> list[dict]:
    cases = [
        (impl, strategy, dtype)
        for dtype in dtypes
        for strategy in STRATEGIES
        for impl in ("upstream", "ours", "ours, out=")
    ]
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for case in cases:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", *case, str(side)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory case {case} failed:\n{proc.stderr}")
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for dtype in dtypes:
        for strategy in STRATEGIES:
            rows.append(
                {
                    "strategy": strategy,
                    "dtype": dtype,
                    "upstream": results[("upstream", strategy, dtype)]["ratio"],
                    "ours": results[("ours", strategy, dtype)]["ratio"],
                    "ours_out": results[("ours, out=", strategy, dtype)]["ratio"],
                    "out_mib": results[("ours", strategy, dtype)]["out_bytes"] / 2**20,
                }
            )
    return rows


# ------------------------------------------------------------------------------------ report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller tensors, fewer runs")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--memory-case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_case:
        impl, strategy, dtype, side = args.memory_case
        print(json.dumps(memory_case(impl, strategy, dtype, int(side))))
        return 0

    shape = (1024, 2048) if args.quick else (4096, 4096)
    reps = 3 if args.quick else 5
    side = 1024 if args.quick else 2048
    print(
        f"# lorax_merge concurrency and memory ({os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f})\n"
    )
    print(
        f"## Two merges of 3 x {shape[0]} x {shape[1]} float32 tasks, one torch thread each "
        f"(median of {reps})\n"
    )
    print(
        "| strategy | two sequential (ms) | two concurrent threads (ms) | sequential / concurrent |"
    )
    print("| --- | ---: | ---: | ---: |")
    for r in concurrency_rows(shape, reps):
        print(
            f"| {r['strategy']} | {r['sequential'] * 1e3:.1f} | {r['concurrent'] * 1e3:.1f} "
            f"| {r['speedup']:.2f} |"
        )
    if not args.skip_memory:
        print(
            f"\n## Peak extra memory of one merge, x output size (3 tasks of {side} x {side}, "
            "density 0.5; fresh process per case)\n"
        )
        print(
            "| strategy | task dtype | output (MiB) | upstream | lorax_merge | "
            "lorax_merge with out= |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in memory_rows(side, ["float32", "bfloat16"]):
            print(
                f"| {r['strategy']} | {r['dtype']} | {r['out_mib']:.0f} | {r['upstream']:.2f} "
                f"| {r['ours']:.2f} | {r['ours_out']:.2f} |"
            )
        print(
            "\nBounds: lorax_merge < 2.5 x the output, < 1.5 x with out= "
            "(tests/test_reliability.py)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
