// The final store of every result, shared by the CPU and CUDA kernels.
//
// A result is rounded once to the output dtype, and every NaN is written as one canonical
// NaN per dtype: positive, all payload bits set. That is the NaN the GPU's arithmetic and
// conversions produce (PTX's f32 and f64 operations return the canonical NaN, and
// cvt.rn.{f16,bf16}.f32 turns any NaN into 0x7FFF), whereas x86 keeps payloads and signs
// (-Inf * 0 gives 0xFFC00000) and c10's host converters give 0x7FC0 (bfloat16) or
// 0x7E00 | sign (float16). Writing one pattern makes the two devices' outputs equal bit for
// bit, NaN included, whatever the inputs' NaN payloads were.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "macros.h"

namespace lorax_merge {

template <typename T>
struct CanonicalNaN;

template <>
struct CanonicalNaN<float> {
  static constexpr uint32_t kBits = 0x7FFFFFFFu;
  LM_HOST_DEVICE static float value() {
    const uint32_t bits = kBits;
    float v;
    memcpy(&v, &bits, sizeof(v));
    return v;
  }
};

template <>
struct CanonicalNaN<double> {
  static constexpr uint64_t kBits = 0x7FFFFFFFFFFFFFFFull;
  LM_HOST_DEVICE static double value() {
    const uint64_t bits = kBits;
    double v;
    memcpy(&v, &bits, sizeof(v));
    return v;
  }
};

template <>
struct CanonicalNaN<c10::Half> {
  static constexpr uint16_t kBits = 0x7FFFu;
  LM_HOST_DEVICE static c10::Half value() { return c10::Half(kBits, c10::Half::from_bits()); }
};

template <>
struct CanonicalNaN<c10::BFloat16> {
  static constexpr uint16_t kBits = 0x7FFFu;
  LM_HOST_DEVICE static c10::BFloat16 value() {
    return c10::BFloat16(kBits, c10::BFloat16::from_bits());
  }
};

// The value an output element of dtype out_t receives for the accumulated result r.
template <typename out_t, typename acc_t>
LM_HOST_DEVICE out_t output_value(acc_t r) {
  return r != r ? CanonicalNaN<out_t>::value() : static_cast<out_t>(r);
}

}  // namespace lorax_merge
