"""Build of the lorax_merge extension.

Environment variables:
  LORAX_MERGE_CUDA        unset/"auto": compile the CUDA kernels when torch is a CUDA build and
                          a CUDA toolkit is found; "0": CPU only; "1": CUDA required (error if
                          that is impossible).
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "8.0;9.0". Default: the visible GPUs, or
                          "8.0;9.0+PTX" when no GPU is visible.
  LORAX_MERGE_PTXAS_VERBOSE=1   print ptxas register/spill reports while compiling.
  LORAX_MERGE_CPU_ARCH    unset or "none" (default): the compiler's baseline target, so the
                          library runs on any CPU of its architecture; the CPU kernels are
                          compiled once per capability level and the best level is chosen at
                          run time. "native" (or e.g. "x86-64-v3"): -march for every file as
                          well, for a library that only runs on the building machine (or that
                          architecture level).
  LORAX_MERGE_DEBUG=1     -O0 -g host and device code.
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

# torch looks for the toolkit at import time; `nvcc` on PATH may be a wrapper outside the
# toolkit, so point at the standard location before torch guesses from PATH.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

DEFAULT_ARCHS = "8.0;9.0+PTX"  # sm_80 and sm_90 machine code, PTX for newer GPUs

# CPU capability levels (csrc/cpu/capability.h): the kernels of LEVEL_SOURCES are compiled once
# per level, with its instruction sets, into the namespace lorax_merge::cpu::<level>; the best
# level the running CPU supports is chosen at load time. FMA may be used by the compiler's
# vectoriser but never contracts a*b+c (-ffp-contract=off), so every level rounds alike.
# The merges' kernels, and the gradients' in a translation unit of their own (so that neither
# changes how the compiler inlines the other).
LEVEL_SOURCES = ["csrc/cpu/kernels/level_kernels.cpp", "csrc/cpu/kernels/grad_level_kernels.cpp"]
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mpopcnt"]
X86_64_LEVELS = {
    "DEFAULT": [],
    "AVX2": _AVX2,
    "AVX512": _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}


def cpu_levels() -> dict[str, list[str]]:
    """Capability levels to compile, lowest (the architecture's baseline) first."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_64_LEVELS
    return {"DEFAULT": []}  # aarch64: NEON is part of the baseline


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
    cpu_arch = os.environ.get("LORAX_MERGE_CPU_ARCH", "none").strip()
    if cpu_arch and cpu_arch != "none":
        cxx.append(f"-march={cpu_arch}")
    else:
        cpu_arch = ""
    link = ["-fopenmp"] if openmp else []
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + LEVEL_SOURCES)
    with_cuda = cuda_wanted()
    define_macros = [
        ("LM_WITH_CUDA", "1" if with_cuda else "0"),
        ("LM_CPU_X86_LEVELS", "1" if "AVX2" in cpu_levels() else "0"),
        ("LM_CPU_ARCH", f'"{cpu_arch}"'),
    ]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "lorax_merge._C",
            sources,
            depends=depends,
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
        depends=depends,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        define_macros=define_macros,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the CPU kernels compiled once per capability level.

    Each level's object is compiled with its own flags and -DCPU_CAPABILITY=<level>, with
    hidden visibility, and linked after the other objects, the baseline level first: where
    a library function (an inline function or template that every level instantiates) is
    emitted out of line by several objects, the linker keeps the first copy, the one
    compiled for the baseline, so no wider instructions reach code that other levels call.
    tests/test_build.py checks the built library for it.
    """

    def build_extension(self, ext) -> None:
        args = ext.extra_compile_args
        cxx = args["cxx"] if isinstance(args, dict) else list(args)

        def compile_level(level: str, flags: list[str]) -> list[str]:
            level_flags = cxx + flags + ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
            return self.compiler.compile(
                LEVEL_SOURCES,
                output_dir=os.path.join(self.build_temp, f"cpu_{level}"),
                macros=ext.define_macros + [("CPU_CAPABILITY", level)],
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={"cxx": level_flags, "nvcc": []},
                depends=ext.depends,
            )

        # The levels at once (each is its own ninja run in its own folder): on a machine with
        # many cores the build then waits for one level, not for each in turn. The objects
        # keep the levels' order, the baseline first, for the link.
        levels = cpu_levels()
        with ThreadPoolExecutor(max_workers=len(levels)) as pool:
            per_level = list(pool.map(lambda item: compile_level(*item), levels.items()))
        ext.extra_objects = [obj for objects in per_level for obj in objects]
        super().build_extension(ext)
        check_shared_libstdcxx(self.get_ext_fullpath(ext.name))


def elf_needed(path: str) -> list[str] | None:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object (None otherwise)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, shentsize, shnum = (
        int.from_bytes(data[0x28:0x30], "little"),
        int.from_bytes(data[0x3A:0x3C], "little"),
        int.from_bytes(data[0x3C:0x3E], "little"),
    )
    sections = [data[shoff + i * shentsize : shoff + (i + 1) * shentsize] for i in range(shnum)]
    for header in sections:
        if int.from_bytes(header[4:8], "little") != 6:  # SHT_DYNAMIC
            continue
        offset = int.from_bytes(header[24:32], "little")
        size = int.from_bytes(header[32:40], "little")
        strtab = sections[int.from_bytes(header[40:44], "little")]
        str_offset = int.from_bytes(strtab[24:32], "little")
        names = []
        for entry in range(offset, offset + size, 16):
            tag = int.from_bytes(data[entry : entry + 8], "little")
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                start = str_offset + int.from_bytes(data[entry + 8 : entry + 16], "little")
                names.append(data[start : data.index(b"\0", start)].decode())
        return names
    return None


def check_shared_libstdcxx(path: str) -> None:
    """Fails the build when the compiler linked libstdc++ into the extension statically.

    torch uses the shared libstdc++; a second, private copy in the extension is not
    initialised the same way (with gcc 13 its iostreams are not set up at all), so the first
    error message that formats a number crashes the process. Some toolchains (a g++ built
    with static libstdc++ as its default) do this silently.
    """
    if not sys.platform.startswith("linux"):
        return
    needed = elf_needed(path)
    if needed is None or any(name.startswith("libstdc++") for name in needed):
        return
    raise RuntimeError(
        f"{path} does not load the shared libstdc++ (it needs {', '.join(needed) or 'nothing'}): "
        "the C++ compiler linked libstdc++ into it statically, which crashes the extension on "
        "its first error message. Build with a compiler that links it dynamically, e.g. "
        "CXX=/usr/bin/g++ (the system's g++)."
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
