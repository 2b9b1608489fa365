"""Gradient benchmark (CPU): a merge's forward and backward against the forward alone, and
against the eager upstream code's forward and backward, in one run.

Measured on 3 task tensors of 4096 x 4096 float32, density 0.5, with the same threads:

* the forward alone (``lorax_merge.merge``, nothing requires grad);
* forward + backward with the tasks and the weights requiring grad, and with the weights alone
  (what ``learn_weights`` does); the loss's gradient is a fixed tensor (``out.backward(g)``);
* the upstream code (``benchmarks/upstream.py``: ``torch.topk`` masks, ``torch.stack``, the
  disjoint merge) forward + backward with the tasks and the weights requiring grad;
* the peak extra memory of one backward (tasks and weights requiring grad), in a fresh process:
  peak RSS during the backward minus the RSS before it, as a multiple of the gradients' size.

Targets (ties): forward + backward <= 3x the forward alone; >= 10x faster than upstream's
forward + backward. Other strategies are shown without targets.

    python benchmarks/bench_grad.py                 # ties (about a minute on 2 cores)
    python benchmarks/bench_grad.py --strategies ties dare_ties linear
    python benchmarks/bench_grad.py --quick         # 1024 x 1024, smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import upstream  # noqa: E402
from bench_common import import_lorax_merge, proc_status_kb, reset_peak_rss  # noqa: E402

N_TASKS = 3
DENSITY = 0.5
WEIGHTS = [0.5, 0.3, 0.2]
SEED = 1234
RATIO_TARGET = 3.0
SPEEDUP_TARGET = 10.0
TARGETED = ("ties",)  # the strategies the targets are set for


def make_inputs(side: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tasks = [torch.randn(side, side, generator=gen) for _ in range(N_TASKS)]
    return tasks, torch.randn(side, side, generator=gen)


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(strategy: str, tasks, grad_out, tasks_grad: bool, weights_grad: bool):
    lorax_merge = import_lorax_merge()

    def run():
        leaves = [t.requires_grad_(tasks_grad) for t in tasks]
        w = torch.tensor(WEIGHTS, requires_grad=weights_grad)
        out = lorax_merge.merge(leaves, w, strategy, density=DENSITY, seed=SEED)
        if tasks_grad or weights_grad:
            out.backward(grad_out)
            for t in leaves:
                t.grad = None

    return run


def theirs(strategy: str, tasks, grad_out):
    fn = upstream.STRATEGIES[strategy]

    def run():
        leaves = [t.requires_grad_(True) for t in tasks]
        w = torch.tensor(WEIGHTS, requires_grad=True)
        out = fn(leaves, w, density=DENSITY, majority_sign_method="total", apply_rescale=True)
        out.backward(grad_out)
        for t in leaves:
            t.grad = None

    return run


def memory_case(strategy: str, side: int) -> dict:
    """One forward and backward in this (fresh) process; the backward's peak extra memory."""
    lorax_merge = import_lorax_merge()
    tasks, grad_out = make_inputs(side)
    ours(strategy, *make_inputs(8), True, True)()  # load and initialise the code path
    leaves = [t.requires_grad_(True) for t in tasks]
    w = torch.tensor(WEIGHTS, requires_grad=True)
    out = lorax_merge.merge(leaves, w, strategy, density=DENSITY, seed=SEED)
    gc.collect()
    exact = reset_peak_rss()
    before_kb = proc_status_kb("VmRSS")
    out.backward(grad_out)
    peak_kb = proc_status_kb("VmHWM") if exact else proc_status_kb("VmRSS")
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
    return {"ratio": max(peak_kb - before_kb, 0) * 1024 / grad_bytes, "exact": exact}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["ties"])
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, few runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown-out", type=Path)
    parser.add_argument(
        "--memory-case", nargs=2, metavar=("STRATEGY", "SIDE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case[0], int(args.memory_case[1]))))
        return 0

    lorax_merge = import_lorax_merge()
    side = 1024 if args.quick else 4096
    reps = 3 if args.quick else 5
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tasks, grad_out = make_inputs(side)
    rows = []
    for strategy in args.strategies:
        forward = median_seconds(ours(strategy, tasks, grad_out, False, False), reps)
        both = median_seconds(ours(strategy, tasks, grad_out, True, True), reps)
        weights_only = median_seconds(ours(strategy, tasks, grad_out, False, True), reps)
        eager = median_seconds(theirs(strategy, tasks, grad_out), max(2, reps - 2), warmup=0)
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-case",
                strategy,
                str(side),
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        memory = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((strategy, forward, both, weights_only, eager, memory))
        print(
            f"  {strategy}: forward {forward * 1e3:.1f} ms, forward+backward {both * 1e3:.1f} ms,"
            f" upstream {eager * 1e3:.0f} ms",
            file=sys.stderr,
            flush=True,
        )

    info = lorax_merge.build_info()
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {threads} torch threads; "
        f"torch {torch.__version__}; lorax_merge {info.get('version', '?')}; load average before "
        f"the run {load_before:.2f}",
        "",
        f"#### Gradients: {N_TASKS} tasks of {side}x{side} float32, density {DENSITY} "
        f"(median of {reps} runs; {max(2, reps - 2)} for upstream)",
        "",
        "| strategy | forward (ms) | forward + backward (ms) | ratio | target | met "
        "| weights only (ms) | upstream forward + backward (ms) | speedup | target | met "
        "| backward peak extra memory |",
        "|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|:-:|---:|",
    ]
    for strategy, forward, both, weights_only, eager, memory in rows:
        ratio, speedup = both / forward, eager / both
        targeted = strategy in TARGETED
        ratio_target = f"<= {RATIO_TARGET:g}x" if targeted else "-"
        ratio_met = ("yes" if ratio <= RATIO_TARGET else "**no**") if targeted else "-"
        speedup_target = f">= {SPEEDUP_TARGET:g}x" if targeted else "-"
        speedup_met = ("yes" if speedup >= SPEEDUP_TARGET else "**no**") if targeted else "-"
        lines.append(
            f"| {strategy} | {forward * 1e3:.1f} | {both * 1e3:.1f} | {ratio:.2f}x "
            f"| {ratio_target} | {ratio_met} | {weights_only * 1e3:.1f} | {eager * 1e3:.0f} "
            f"| {speedup:.0f}x | {speedup_target} | {speedup_met} "
            f"| {memory['ratio']:.2f}x the gradients |"
        )
    lines += [
        "",
        "Forward + backward: tasks and weights require grad; weights only: what `learn_weights` "
        "does. Backward peak extra memory: peak RSS during one backward minus the RSS before it, "
        "in a fresh process, as a multiple of the task gradients' size.",
        f"Total benchmark time: {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
