"""The markdown tables of benchmarks/bench_cpu.py: one column group per CPU capability level,
the targets beside the numbers."""

from __future__ import annotations

import platform

import torch

SPEEDUP_TARGETS = {"linear": 4.0, "ties": 30.0, "dare_linear": 15.0, "dare_ties": 15.0}
LORA_TARGET_US = 150.0
MEMORY_TARGET = 2.5


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(results: dict[str, dict]) -> str:
    """Markdown tables, one column group per capability level."""
    levels = list(results)
    first = results[levels[0]]
    memory = next((r["memory"] for r in results.values() if r["memory"]), {})
    n_big, n_up, n_lora, n_lora_up = first["reps"]
    side = first["side"]
    per_level = " | ".join(f"{r['level']} (ATen {r['torch_level']})" for r in results.values())
    lines = [
        f"CPU: {cpu_name()}, {first['threads']} torch threads; torch {torch.__version__}; "
        f"lorax_merge {first['version']}; capability level: {per_level}",
        f"Load average before the run: {first['load_before']:.2f} (timings are only meaningful "
        "on an idle machine).",
        f"Bandwidth floor: `torch.add(a, b, out=c)` on {first['bandwidth_numel'] >> 20}M float32 "
        "runs at "
        f"{first['bandwidth'] / 1e9:.1f} GB/s; "
        "floor = (bytes of the tasks + bytes of the output) / bandwidth.",
        "",
        f"### {first['tasks']} tasks of {side}x{side}, density {first['density']} "
        f"(median of {n_big} runs; {n_up} for upstream)",
        "",
    ]
    cols = "".join(
        f" | upstream, {lv} (ms) | lorax_merge, {lv} (ms) | speedup, {lv}" for lv in levels
    )
    lines += [
        f"| strategy | dtype{cols} | target | met | floor (ms) | x floor "
        "| peak extra memory, upstream | peak extra memory, lorax_merge |",
        "|---|---" + "|---:|---:|---:" * len(levels) + "|---:|:-:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(first["big"]):
        target = SPEEDUP_TARGETS.get(r["strategy"])
        cells, met = [], []
        for level in levels:
            row = results[level]["big"][i]
            speedup = row["upstream"] / row["ours"]
            cells.append(f"{fmt_ms(row['upstream'])} | {fmt_ms(row['ours'])} | {speedup:.1f}x")
            met.append(verdict(speedup >= target) if target else "-")
        mem_up = memory.get(f"upstream/{r['strategy']}/{r['dtype']}")
        mem_ours = memory.get(f"ours/{r['strategy']}/{r['dtype']}")
        mem_up_s = f"{mem_up['ratio']:.1f}x" if mem_up else "-"
        mem_ours_s = (
            f"{mem_ours['ratio']:.2f}x ({verdict(mem_ours['ratio'] < MEMORY_TARGET)})"
            if mem_ours
            else "-"
        )
        lines.append(
            f"| {r['strategy']} | {r['dtype']} | {' | '.join(cells)} "
            f"| {f'>= {target:g}x' if target else '-'} | {' / '.join(met)} "
            f"| {fmt_ms(r['floor'])} | {r['ours'] / r['floor']:.1f} | {mem_up_s} | {mem_ours_s} |"
        )
    cols = "".join(
        f" | upstream, {lv} (us) | lorax_merge, {lv} (us) | fastest, {lv}" for lv in levels
    )
    lines += [
        "",
        f"Peak extra memory: peak RSS of one merge minus the RSS before it (output included), "
        f"as a multiple of the output's size; target < {MEMORY_TARGET}x. The floor and x floor "
        f"columns are {levels[0]}'s.",
        "",
        f"### LoRA-sized call: {first['tasks']} x [16, 4096] float32 (median of {n_lora} calls, "
        f"{n_lora_up} for upstream)",
        "",
        f"| strategy{cols} | target | met |",
        "|---" + "|---:|---:|---:" * len(levels) + "|---:|:-:|",
    ]
    for i, r in enumerate(first["lora"]):
        cells, met = [], []
        for level in levels:
            row = results[level]["lora"][i]
            us_ours = row["ours"] * 1e6
            cells.append(
                f"{row['upstream'] * 1e6:.0f} | {us_ours:.1f} | {row['ours_min'] * 1e6:.1f}"
            )
            met.append(verdict(us_ours < LORA_TARGET_US))
        target = f"< {LORA_TARGET_US:g} us"
        lines.append(f"| {r['strategy']} | {' | '.join(cells)} | {target} | {' / '.join(met)} |")
    seconds = [sum(r["seconds"][k] for r in results.values()) for k in range(3)]
    lines += [
        "",
        f"Total benchmark time: {sum(seconds):.0f} s (large tensors {seconds[0]:.0f} s, "
        f"LoRA-sized {seconds[1]:.0f} s, memory {seconds[2]:.0f} s).",
    ]
    return "\n".join(lines)
