"""Per-kernel resource table from a build log made with ``LORAX_MERGE_PTXAS_VERBOSE=1``.

ptxas reports, for every kernel and architecture, the registers it uses, its stack frame and
its spill stores and loads. This prints them as one markdown table (kernel names demangled
with ``c++filt`` where it is installed), then a line saying whether any kernel spills:

    python benchmarks/ptxas_report.py build.log
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse(log: str) -> list[dict]:
    """One row per (kernel, architecture): mangled name, arch, registers, stack, spills."""
    rows, current, frame = [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current, frame = (m.group(1), m.group(2)), None
        elif (m := _FRAME.search(line)) and current:
            frame = tuple(int(v) for v in m.groups())
        elif (m := _REGS.search(line)) and current:
            stack, spill_stores, spill_loads = frame or (0, 0, 0)
            rows.append(
                {
                    "kernel": current[0],
                    "arch": current[1],
                    "registers": int(m.group(1)),
                    "stack": stack,
                    "spill_stores": spill_stores,
                    "spill_loads": spill_loads,
                }
            )
            current = None
    return rows


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names: demangled, namespaces and parameter lists dropped."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    readable = []
    for name in out.splitlines():
        name = re.sub(r"lorax_merge::cuda::\(anonymous namespace\)::|lorax_merge::|c10::", "", name)
        name = re.sub(r"\([^()]*\)$", "", name).removeprefix("void ")
        for value, label in (("0", "kNone"), ("1", "kTotal"), ("2", "kFrequency")):
            name = name.replace(f"(SignElection){value}", label)
        readable.append(name)
    return readable if len(readable) == len(names) else names


def table(rows: list[dict]) -> str:
    names = demangle([r["kernel"] for r in rows])
    lines = [
        "| kernel | arch | registers | stack bytes | spill stores | spill loads |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in sorted(zip(names, rows), key=lambda x: (x[0], x[1]["arch"])):
        lines.append(
            f"| `{name}` | {r['arch']} | {r['registers']} | {r['stack']} | "
            f"{r['spill_stores']} | {r['spill_loads']} |"
        )
    spilling = sum(1 for r in rows if r["spill_stores"] or r["spill_loads"])
    lines.append("")
    lines.append(f"{len(rows)} kernel builds, {spilling} with spills")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    rows = parse(Path(argv[0]).read_text(errors="replace"))
    if not rows:
        print("no ptxas reports found (build with LORAX_MERGE_PTXAS_VERBOSE=1)", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
