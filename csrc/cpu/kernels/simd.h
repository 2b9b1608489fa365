// The instruction-set-specific pieces of the level kernels, chosen by the macros that the
// level's compiler flags define (__AVX512F__, __AVX2__, __F16C__, __ARM_NEON). Every piece
// has a plain C++ path with the same results (the DEFAULT level on x86-64 uses it); the
// loops elsewhere in kernels/ are left to the compiler's vectoriser, which the level's
// flags steer.
//
// Part of the level kernels: included by level_kernels.cpp only. Nothing here calls an
// inline function defined outside the level's namespace with wider instructions
// (intrinsics aside): such a function could be emitted out of line and shared with the
// other levels by the linker.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/ are compiled once per capability level, by level_kernels.cpp"
#endif

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../common/keys.h"
#include "../kernel_api.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Raw bits of a 16-bit float, and the float it holds.
inline uint16_t bits_of(c10::Half v) {
  return v.x;
}
inline uint16_t bits_of(c10::BFloat16 v) {
  return v.x;
}

inline float bfloat16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even; NaN becomes 0x7FC0 (what c10::BFloat16(float) does).
inline uint16_t float_to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}

#if defined(__AVX512F__)
// The zero-masking forms with every lane selected: the plain forms of some conversions
// start from an undefined register, which GCC 12 reports as maybe uninitialised.
constexpr __mmask16 kAllLanes = 0xFFFF;
#endif

// IEEE binary16 conversions, round to nearest even. The F16C and NEON instructions and
// c10's portable code agree on every value (NaN payloads aside).
inline float half_to_float(uint16_t bits) {
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#elif defined(__aarch64__)
  __fp16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__aarch64__)
  const __fp16 h = static_cast<__fp16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
#else
  return c10::detail::fp16_ieee_from_fp32_value(f);
#endif
}

// dst[j] = float(src[j]) for a run of binary16 values.
inline void half_run_to_float(const uint16_t* src, int64_t len, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= len; j += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    _mm512_storeu_ps(dst + j, _mm512_maskz_cvtph_ps(kAllLanes, h));
  }
#elif defined(__F16C__)
  for (; j + 8 <= len; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
#elif defined(__aarch64__)
  for (; j + 4 <= len; j += 4) {
    vst1q_f32(dst + j, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + j))));
  }
#endif
  for (; j < len; ++j) dst[j] = half_to_float(src[j]);
}

// dst[j] = binary16(src[j]) for a run of floats.
inline void float_run_to_half(const float* src, int64_t len, uint16_t* dst) {
  int64_t j = 0;
#if defined(__F16C__)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif
#if defined(__AVX512F__)
  for (; j + 16 <= len; j += 16) {
    const __m256i h = _mm512_maskz_cvtps_ph(kAllLanes, _mm512_loadu_ps(src + j), kRound);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), h);
  }
#elif defined(__F16C__)
  for (; j + 8 <= len; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
#elif defined(__aarch64__)
  for (; j + 4 <= len; j += 4) {
    vst1_u16(dst + j, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + j))));
  }
#endif
  for (; j < len; ++j) dst[j] = float_to_half(src[j]);
}

// v[j] = float(binary16(v[j])): a run of floats rounded to binary16.
inline void half_round_trip(float* v, int64_t len) {
  int64_t j = 0;
#if defined(__F16C__)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif
#if defined(__AVX512F__)
  for (; j + 16 <= len; j += 16) {
    const __m256i h = _mm512_maskz_cvtps_ph(kAllLanes, _mm512_loadu_ps(v + j), kRound);
    _mm512_storeu_ps(v + j, _mm512_maskz_cvtph_ps(kAllLanes, h));
  }
#elif defined(__F16C__)
  for (; j + 8 <= len; j += 8) {
    _mm256_storeu_ps(v + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + j), kRound)));
  }
#elif defined(__aarch64__)
  for (; j + 4 <= len; j += 4) vst1q_f32(v + j, vcvt_f32_f16(vcvt_f16_f32(vld1q_f32(v + j))));
#endif
  for (; j < len; ++j) v[j] = half_to_float(float_to_half(v[j]));
}

// ---------------------------------------------------------------------------------------
// Magnitude keys of a vector of elements whose keys fit 32-bit lanes (float32, float16,
// bfloat16), eight at a time on x86-64 (also at the AVX-512 level: 256-bit vectors and a
// table-driven compress beat AVX-512's compress instruction on the CPUs measured), with
// magnitude_key's rule: the sign bit cleared, every NaN folded onto kNaN.
// Without kFoldNaN, NaNs keep their own bits (above kInf): comparisons with a bound below
// kInf come out the same, for three instructions less.

#if defined(__AVX2__)
constexpr int64_t kKeyLanes = 8;
using KeyVector = __m256i;

// Keys are below 2^31, so signed 32-bit comparisons order them.
template <bool kFoldNaN, typename scalar_t>
inline KeyVector load_keys(const scalar_t* p) {
  using Traits = KeyTraits<scalar_t>;
  __m256i bits;
  if constexpr (sizeof(scalar_t) == 4) {
    bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int32_t>(Traits::kNaN));
  bits = _mm256_and_si256(bits, abs_mask);
  if constexpr (!kFoldNaN) return bits;
  const __m256i nan =
      _mm256_cmpgt_epi32(bits, _mm256_set1_epi32(static_cast<int32_t>(Traits::kInf)));
  return _mm256_or_si256(bits, _mm256_and_si256(nan, abs_mask));
}

#elif defined(__aarch64__)
constexpr int64_t kKeyLanes = 4;
using KeyVector = uint32x4_t;

template <bool kFoldNaN, typename scalar_t>
inline KeyVector load_keys(const scalar_t* p) {
  using Traits = KeyTraits<scalar_t>;
  uint32x4_t bits;
  if constexpr (sizeof(scalar_t) == 4) {
    bits = vld1q_u32(reinterpret_cast<const uint32_t*>(p));
  } else {
    bits = vmovl_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)));
  }
  const uint32x4_t abs_mask = vdupq_n_u32(Traits::kNaN);
  bits = vandq_u32(bits, abs_mask);
  if constexpr (!kFoldNaN) return bits;
  const uint32x4_t nan = vcgtq_u32(bits, vdupq_n_u32(Traits::kInf));
  return vorrq_u32(bits, vandq_u32(nan, abs_mask));
}
#endif

#if defined(__AVX2__)
// kCompressLanes.lanes[m]: the numbers of the set bits of the 8-bit mask m, one per byte,
// lowest first: a permutation that moves the selected lanes of a vector to its front.
struct CompressTable {
  uint64_t lanes[256];
  constexpr CompressTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int packed = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if ((m >> lane) & 1) lanes[m] |= uint64_t(lane) << (8 * packed++);
      }
    }
  }
};
constexpr CompressTable kCompressLanes;
#endif

#if defined(__AVX2__) || defined(__aarch64__)
#define LM_CPU_KEY_VECTORS 1

// The bracket scan over whole vectors of x[*i, end), advancing *i to where they stop: adds
// the number of keys above `hi` to *above and appends the keys in [lo, hi] and their
// offsets from `origin` to keys[*count], offsets[*count], in index order. Branch-free: each
// vector writes kKeyLanes entries at the end of the output and keeps the selected ones, so
// the output needs kKeyLanes entries of room beyond `capacity`. Returns false, with *i
// where it stopped, once more than `capacity` are kept. kFoldNaN must be set if hi >= kInf.
template <bool kFoldNaN, typename scalar_t>
inline bool scan_bracket_vectors(const scalar_t* x, int64_t* i, int64_t end, int64_t origin,
                                 uint32_t lo, uint32_t hi, uint32_t* keys, uint32_t* offsets,
                                 int64_t* count, int64_t capacity, int64_t* above) {
  int64_t n = *count, j = *i;
  // Per-lane counts of keys above hi, added up every block so that no lane overflows.
  constexpr int64_t kBlockVectors = int64_t(1) << 24;
  bool full = false;
  while (j + kKeyLanes <= end && !full) {
    const int64_t vectors = (end - j) / kKeyLanes;
    const int64_t block_end = j + kKeyLanes * (vectors < kBlockVectors ? vectors : kBlockVectors);
#if defined(__AVX2__)
    // key >= lo as key > lo - 1: lo - 1 is -1 for lo == 0, below every key.
    const __m256i vlo_minus_1 = _mm256_set1_epi32(static_cast<int32_t>(lo) - 1);
    const __m256i vhi = _mm256_set1_epi32(static_cast<int32_t>(hi));
    __m256i high_counts = _mm256_setzero_si256();  // minus the count, per lane
    __m256i first_offset = _mm256_set1_epi32(static_cast<int32_t>(j - origin));
    const __m256i step = _mm256_set1_epi32(static_cast<int32_t>(kKeyLanes));
    // One vector: count the keys above, append the keys inside and their offsets.
    auto scan_one = [&](int64_t at) {
      const __m256i key = load_keys<kFoldNaN>(x + at);
      const __m256i high = _mm256_cmpgt_epi32(key, vhi);
      high_counts = _mm256_add_epi32(high_counts, high);
      const __m256i in = _mm256_andnot_si256(high, _mm256_cmpgt_epi32(key, vlo_minus_1));
      const unsigned inside = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(in)));
      const __m256i order = _mm256_cvtepu8_epi32(
          _mm_cvtsi64_si128(static_cast<long long>(kCompressLanes.lanes[inside])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + n),
                          _mm256_permutevar8x32_epi32(key, order));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + n),
                          _mm256_add_epi32(first_offset, order));
      first_offset = _mm256_add_epi32(first_offset, step);
      n += __builtin_popcount(inside);
    };
    // Two vectors a step, one check of the room left (kCandidateSlack covers both).
    for (; j + 2 * kKeyLanes <= block_end; j += 2 * kKeyLanes) {
      scan_one(j);
      scan_one(j + kKeyLanes);
      if (n > capacity) break;
    }
    if (j < block_end && n <= capacity) {
      scan_one(j);
      j += kKeyLanes;
    }
    if (n > capacity) full = true;
    alignas(32) int32_t high_lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(high_lanes), high_counts);
    for (int32_t c : high_lanes) *above -= c;
#else  // aarch64
    const uint32x4_t vlo = vdupq_n_u32(lo), vhi = vdupq_n_u32(hi);
    uint32x4_t high_counts = vdupq_n_u32(0);  // minus the count, per lane
    alignas(16) uint32_t key_lanes[4];
    alignas(16) uint32_t in_lanes[4];
    for (; j < block_end; j += kKeyLanes) {
      const uint32x4_t key = load_keys<kFoldNaN>(x + j);
      const uint32x4_t high = vcgtq_u32(key, vhi);
      high_counts = vaddq_u32(high_counts, high);
      vst1q_u32(key_lanes, key);
      vst1q_u32(in_lanes, vbicq_u32(vcgeq_u32(key, vlo), high));
      const uint32_t offset = static_cast<uint32_t>(j - origin);
      for (int lane = 0; lane < 4; ++lane) {
        keys[n] = key_lanes[lane];
        offsets[n] = offset + lane;
        n += in_lanes[lane] & 1;
      }
      if (n > capacity) {
        full = true;
        break;
      }
    }
    *above += static_cast<int64_t>(0u - vaddvq_u32(high_counts));
#endif
  }
  *i = j;
  *count = n;
  return !full;
}
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
