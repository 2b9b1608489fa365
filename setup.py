"""Build of the lorax_merge extension.

Environment variables:
  LORAX_MERGE_CUDA        unset/"auto": compile the CUDA kernels when torch is a CUDA build and
                          a CUDA toolkit is found; "0": CPU only; "1": CUDA required (error if
                          that is impossible).
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "8.0;9.0". Default: the visible GPUs, or
                          "8.0;9.0+PTX" when no GPU is visible.
  LORAX_MERGE_PTXAS_VERBOSE=1   print ptxas register/spill reports while compiling.
  LORAX_MERGE_CPU_ARCH    -march for the CPU kernels: "native" (default: tuned for the building
                          machine) or e.g. "x86-64-v3"; "none" for the compiler's default, for
                          binaries that must run on other machines.
  LORAX_MERGE_DEBUG=1     -O0 -g host and device code.
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import sys

# torch looks for the toolkit at import time; `nvcc` on PATH may be a wrapper outside the
# toolkit, so point at the standard location before torch guesses from PATH.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

DEFAULT_ARCHS = "8.0;9.0+PTX"  # sm_80 and sm_90 machine code, PTX for newer GPUs


def cuda_wanted() -> bool:
    mode = os.environ.get("LORAX_MERGE_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no", "cpu"):
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode in ("1", "on", "true", "yes", "require"):
        if not available:
            sys.exit(
                "LORAX_MERGE_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    return available


def cuda_arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and not torch.cuda.is_available():
        archs = DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if not archs:
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return archs


def extension():
    debug = os.environ.get("LORAX_MERGE_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    openmp = "OpenMP" in torch.__config__.parallel_info()
    # No FMA contraction, so results do not depend on the instruction set; no trapping
    # math, so conditional arithmetic can be computed branch-free and vectorised.
    cxx = opt + ["-Wall", "-Wextra", "-Wno-unused-parameter", "-ffp-contract=off"]
    cxx += ["-fno-trapping-math"] + (["-fopenmp"] if openmp else [])
    cpu_arch = os.environ.get("LORAX_MERGE_CPU_ARCH", "native").strip()
    if cpu_arch and cpu_arch != "none":
        cxx.append(f"-march={cpu_arch}")
    link = ["-fopenmp"] if openmp else []
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    with_cuda = cuda_wanted()
    define_macros = [("LM_WITH_CUDA", "1" if with_cuda else "0")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "lorax_merge._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            define_macros=define_macros,
            py_limited_api=False,
        )
    archs = cuda_arch_list()
    define_macros.append(("LM_CUDA_ARCHS", f'"{archs}"'))
    # --fmad=false: no fused multiply-add contraction, so the kernels round exactly like the
    # CPU kernels (bit-identical results on both devices).
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "--fmad=false", "-Xcompiler", "-Wall"]
    if os.environ.get("LORAX_MERGE_PTXAS_VERBOSE") == "1":
        nvcc += ["-Xptxas", "-v"]
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return cpp_extension.CUDAExtension(
        "lorax_merge._C",
        sources,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        define_macros=define_macros,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
