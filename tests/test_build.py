"""What the build put into the extension: CUDA machine code for the architectures it claims."""

from __future__ import annotations

import os
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
