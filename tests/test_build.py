"""What the build put into the extension: CUDA machine code for the architectures it claims,
and CPU code of each capability level only where that level runs."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import lorax_merge
from lorax_merge import _C

INFO = lorax_merge.build_info()


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the toolkit, or the triton package that CUDA torch installs."""
    site_packages = Path(torch.__file__).resolve().parents[1]
    candidates = (
        shutil.which("cuobjdump"),
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump",
        site_packages / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump",
    )
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def test_build_info_describes_the_installation():
    assert INFO["version"] == lorax_merge.__version__
    assert INFO["torch_version"] == torch.__version__
    assert INFO["num_threads"] == torch.get_num_threads() >= 1
    assert isinstance(INFO["cuda_compiled"], bool)
    assert INFO["cuda_compiled"] == bool(INFO["cuda_archs"])
    assert INFO["cpu_capability"] in INFO["cpu_capabilities"]


@pytest.mark.skipif(not INFO["cuda_compiled"], reason="built without the CUDA kernels")
def test_every_kernel_has_machine_code_for_every_claimed_architecture():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found")
    listing = subprocess.run(
        [tool, "--list-elf", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    archs = {a.replace("+PTX", "").replace(".", "") for a in INFO["cuda_archs"]}
    for source in ("merge", "select", "stacked"):
        for arch in archs:
            assert f"{source}.sm_{arch}.cubin" in listing, (source, arch, listing)


# --------------------------------------------------------------------------- CPU levels

_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
# Registers of the wider levels, and AVX's VEX-encoded instructions on any vector register
_YMM, _ZMM = re.compile(r"%ymm\d"), re.compile(r"%zmm\d")
_VEX = re.compile(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s.*%[xyz]mm\d")


def _instructions_by_function(library: str, objdump: str) -> dict[str, list[str]]:
    listing = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions: dict[str, list[str]] = {}
    current: list[str] = []
    for line in listing.splitlines():
        match = _FUNCTION.match(line)
        if match:
            current = functions.setdefault(match.group(1), [])
        elif line.startswith(" "):
            current.append(line)
    return functions


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX registers are x86-64's"
)
@pytest.mark.skipif(
    bool(_C.CPU_ARCH),
    reason=f"built with LORAX_MERGE_CPU_ARCH={_C.CPU_ARCH}: every file targets that CPU",
)
def test_wide_registers_only_in_their_levels_functions():
    """AVX2 and AVX-512 code is only in functions of the lorax_merge::cpu::AVX2 and ::AVX512
    namespaces: nothing compiled for a wider level (an inline function or template that the
    linker could share with other levels, a static initialiser) reaches code that runs on
    every CPU."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    functions = _instructions_by_function(_C.__file__, objdump)
    misplaced = []
    wide_functions = {"AVX2": 0, "AVX512": 0}
    for name, lines in functions.items():
        level = next((lv for lv in ("AVX512", "AVX2") if f"::{lv}::" in name), None)
        uses_ymm = any(_YMM.search(line) for line in lines)
        uses_zmm = any(_ZMM.search(line) for line in lines)
        uses_vex = any(_VEX.match(line) for line in lines)
        if level is None and (uses_ymm or uses_zmm or uses_vex):
            misplaced.append(name)
        elif level == "AVX2" and uses_zmm:
            misplaced.append(name)
        if level is not None and (uses_zmm if level == "AVX512" else uses_ymm):
            wide_functions[level] += 1
    assert not misplaced, f"{len(misplaced)} functions use a wider level's code: {misplaced[:5]}"
    # The levels are really there, with their registers.
    assert wide_functions["AVX2"] > 0 and wide_functions["AVX512"] > 0, wide_functions
    assert set(INFO["cpu_capabilities"]) == {"default", "avx2", "avx512"}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_error_message_that_formats_a_number_is_raised(device):
    """The ops' messages format numbers through libstdc++'s streams, which work only in the
    shared libstdc++ that torch uses: an extension linked with a private, static copy (which
    setup.py refuses to build) crashed here instead of raising."""
    if device == "cuda" and not (INFO["cuda_compiled"] and torch.cuda.is_available()):
        pytest.skip("no CUDA device visible (or no CUDA kernels built)")
    x = torch.ones(4, device=device)
    with pytest.raises(ValueError, match=r"density must be >= 0 \(and not NaN\), got -1\.5"):
        torch.ops.lorax_merge.magnitude_thresholds([x], -1.5)
    with pytest.raises(ValueError, match="3 entries but there are 1 task tensors"):
        torch.ops.lorax_merge.merge([x], torch.ones(3), "none", "none", 1.0, False, 0, x.dtype)
