#include "capability.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include <c10/util/Exception.h>

#if LM_CPU_X86_LEVELS
#include <cpuid.h>
#endif

namespace lorax_merge {
namespace cpu {
namespace {

constexpr const char* kEnvVar = "LORAX_MERGE_CPU_CAPABILITY";

#if LM_CPU_X86_LEVELS
// What the running CPU and operating system offer, from CPUID and XGETBV (as cpuinfo and
// libgcc read them): an instruction set counts only if the OS saves its registers.
struct X86Features {
  bool avx2 = false;    // AVX2, FMA, F16C, BMI1, BMI2, POPCNT; YMM state enabled
  bool avx512 = false;  // AVX-512 F, BW, VL, DQ; ZMM and mask state enabled
};

X86Features read_x86_features() {
  X86Features f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool fma = ecx & (1u << 12), popcnt = ecx & (1u << 23), osxsave = ecx & (1u << 27);
  const bool avx = ecx & (1u << 28), f16c = ecx & (1u << 29);
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;    // XMM, YMM
  const bool zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;  // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool bmi1 = ebx & (1u << 3), avx2 = ebx & (1u << 5), bmi2 = ebx & (1u << 8);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma && f16c && bmi1 && bmi2 && popcnt;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  return f;
}
#endif

const LevelKernels& kernels_of(CpuCapability level) {
  switch (level) {
#if LM_CPU_X86_LEVELS
    case CpuCapability::kAvx2:
      return AVX2::kLevelKernels;
    case CpuCapability::kAvx512:
      return AVX512::kLevelKernels;
#endif
    default:
      return DEFAULT::kLevelKernels;
  }
}

std::string supported_names() {
  std::string names;
  for (CpuCapability level : supported_capabilities()) {
    names += (names.empty() ? "" : ", ") + std::string(capability_name(level));
  }
  return names;
}

// The supported level called `name`; ValueError naming the supported ones otherwise.
CpuCapability parse_supported(const std::string& name, const char* source) {
  for (CpuCapability level : supported_capabilities()) {
    if (name == capability_name(level)) return level;
  }
  bool known = false;
  for (CpuCapability level :
       {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512}) {
    known = known || name == capability_name(level);
  }
  TORCH_CHECK_VALUE(false, "lorax_merge: ", source, "='", name, "' is ",
                    known ? "not supported by this CPU or not compiled into this build"
                          : "not a CPU capability level",
                    "; supported here: ", supported_names());
}

std::atomic<int> g_active{-1};  // a CpuCapability, or -1 before the first choice
std::mutex g_choose;

}  // namespace

const char* capability_name(CpuCapability level) {
  switch (level) {
    case CpuCapability::kAvx2:
      return "avx2";
    case CpuCapability::kAvx512:
      return "avx512";
    default:
      return "default";
  }
}

std::vector<CpuCapability> compiled_capabilities() {
#if LM_CPU_X86_LEVELS
  return {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512};
#else
  return {CpuCapability::kDefault};
#endif
}

bool cpu_supports(CpuCapability level) {
#if LM_CPU_X86_LEVELS
  static const X86Features features = read_x86_features();
  if (level == CpuCapability::kAvx2) return features.avx2;
  if (level == CpuCapability::kAvx512) return features.avx512;
#endif
  return level == CpuCapability::kDefault;
}

std::vector<CpuCapability> supported_capabilities() {
  std::vector<CpuCapability> levels;
  for (CpuCapability level : compiled_capabilities()) {
    if (cpu_supports(level)) levels.push_back(level);
  }
  return levels;
}

CpuCapability active_capability() {
  int active = g_active.load(std::memory_order_acquire);
  if (active >= 0) return static_cast<CpuCapability>(active);
  std::lock_guard<std::mutex> lock(g_choose);
  active = g_active.load(std::memory_order_relaxed);
  if (active < 0) {
    const char* forced = std::getenv(kEnvVar);
    const CpuCapability level = forced != nullptr && *forced != '\0'
                                    ? parse_supported(forced, kEnvVar)
                                    : supported_capabilities().back();
    active = static_cast<int>(level);
    g_active.store(active, std::memory_order_release);
  }
  return static_cast<CpuCapability>(active);
}

const LevelKernels& active_kernels() {
  return kernels_of(active_capability());
}

const GradLevelKernels& active_grad_kernels() {
  switch (active_capability()) {
#if LM_CPU_X86_LEVELS
    case CpuCapability::kAvx2:
      return AVX2::kGradLevelKernels;
    case CpuCapability::kAvx512:
      return AVX512::kGradLevelKernels;
#endif
    default:
      return DEFAULT::kGradLevelKernels;
  }
}

void set_active_capability(const std::string& name) {
  const CpuCapability level = parse_supported(name, "cpu capability");
  std::lock_guard<std::mutex> lock(g_choose);
  g_active.store(static_cast<int>(level), std::memory_order_release);
}

}  // namespace cpu
}  // namespace lorax_merge
