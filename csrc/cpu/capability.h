// CPU capability levels, chosen at run time as ATen's DispatchStub does with CPU_CAPABILITY.
//
// setup.py compiles the CPU kernels (kernels/level_kernels.cpp) once per level, each with its
// own instruction-set flags and inside a namespace named after the level:
//   x86-64:  DEFAULT (the x86-64 baseline, SSE2), AVX2 (+FMA, F16C, BMI1/2, POPCNT), AVX512
//            (F, BW, VL, DQ on top of AVX2);
//   others:  DEFAULT only (NEON is part of the aarch64 baseline).
// The best level this CPU supports is chosen once, on first use; the environment variable
// LORAX_MERGE_CPU_CAPABILITY=default|avx2|avx512 picks a lower one (as ATEN_CPU_CAPABILITY
// does for ATen). Every level gives bit-identical results.
#pragma once

#include <string>
#include <vector>

#include "kernel_api.h"

namespace lorax_merge {
namespace cpu {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// "default", "avx2", "avx512": the names LORAX_MERGE_CPU_CAPABILITY takes.
const char* capability_name(CpuCapability level);

// The levels compiled into this library, lowest first.
std::vector<CpuCapability> compiled_capabilities();

// Whether this CPU and operating system can run a level's instructions.
bool cpu_supports(CpuCapability level);

// The compiled levels this CPU can run, lowest first.
std::vector<CpuCapability> supported_capabilities();

// The level in use. The first call chooses it: LORAX_MERGE_CPU_CAPABILITY's level if set
// (ValueError naming the supported levels if it is unknown or unsupported), else the best
// supported one.
CpuCapability active_capability();

// The kernels of the level in use.
const LevelKernels& active_kernels();
const GradLevelKernels& active_grad_kernels();

// Switches to another supported level (tests and benchmarks compare the levels in one
// process). Raises ValueError, naming the supported levels, for any other name.
void set_active_capability(const std::string& name);

}  // namespace cpu
}  // namespace lorax_merge
