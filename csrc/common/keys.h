// Sortable magnitude keys.
//
// Magnitude pruning ranks elements by |x|. For IEEE floats, clearing the sign bit
// leaves a bit pattern whose unsigned order is the order of |x|: +0 and -0 become
// the same key, +Inf is the largest finite-or-infinite key, and every NaN lies
// above it. NaNs are folded onto one key (all ones) so that they tie with each
// other and the tie rule (lower flat index first) orders them, as torch.topk ranks
// NaN above +Inf. Keys are compared as unsigned integers; radix selection works on
// their bits.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "macros.h"

namespace lorax_merge {

template <typename scalar_t>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using key_t = uint32_t;
  static constexpr int kBits = 31;  // sign bit cleared
  static constexpr key_t kInf = 0x7F800000u;
  static constexpr key_t kNaN = 0x7FFFFFFFu;
  LM_HOST_DEVICE static key_t raw_abs_bits(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits & 0x7FFFFFFFu;
  }
};

template <>
struct KeyTraits<double> {
  using key_t = uint64_t;
  static constexpr int kBits = 63;
  static constexpr key_t kInf = 0x7FF0000000000000ull;
  static constexpr key_t kNaN = 0x7FFFFFFFFFFFFFFFull;
  LM_HOST_DEVICE static key_t raw_abs_bits(double v) {
    uint64_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits & 0x7FFFFFFFFFFFFFFFull;
  }
};

template <>
struct KeyTraits<c10::Half> {
  using key_t = uint16_t;
  static constexpr int kBits = 15;
  static constexpr key_t kInf = 0x7C00u;
  static constexpr key_t kNaN = 0x7FFFu;
  LM_HOST_DEVICE static key_t raw_abs_bits(c10::Half v) {
    return static_cast<key_t>(v.x & 0x7FFFu);
  }
};

template <>
struct KeyTraits<c10::BFloat16> {
  using key_t = uint16_t;
  static constexpr int kBits = 15;
  static constexpr key_t kInf = 0x7F80u;
  static constexpr key_t kNaN = 0x7FFFu;
  LM_HOST_DEVICE static key_t raw_abs_bits(c10::BFloat16 v) {
    return static_cast<key_t>(v.x & 0x7FFFu);
  }
};

// The magnitude key of v: unsigned order of keys == order of |v|, NaN largest.
template <typename scalar_t>
LM_HOST_DEVICE typename KeyTraits<scalar_t>::key_t magnitude_key(scalar_t v) {
  using Traits = KeyTraits<scalar_t>;
  const typename Traits::key_t bits = Traits::raw_abs_bits(v);
  return bits > Traits::kInf ? Traits::kNaN : bits;
}

// Result of selecting the k largest keys of one tensor. An element with key `key_of_x`
// at flat index i is kept iff key_of_x > key, or key_of_x == key and i < cut.
// k == 0 is {kNaN-of-widest-type, 0}: nothing compares above it and no index is below 0.
struct MagnitudeThreshold {
  uint64_t key;
  int64_t cut;

  LM_HOST_DEVICE bool keeps(uint64_t key_of_x, int64_t index) const {
    return key_of_x > key || (key_of_x == key && index < cut);
  }
};

// A threshold's key in the key width of scalar_t, as every kernel compares it: a key above
// the dtype's NaN key (keep-nothing, or a threshold selected for a wider dtype) becomes the
// NaN key, so that NaN elements before the cut are kept and nothing else.
template <typename scalar_t>
LM_HOST_DEVICE typename KeyTraits<scalar_t>::key_t narrow_threshold_key(
    const MagnitudeThreshold& threshold) {
  using Traits = KeyTraits<scalar_t>;
  return threshold.key > Traits::kNaN ? Traits::kNaN
                                      : static_cast<typename Traits::key_t>(threshold.key);
}

LM_HOST_DEVICE MagnitudeThreshold keep_nothing_threshold() {
  return MagnitudeThreshold{~uint64_t(0), 0};
}

LM_HOST_DEVICE MagnitudeThreshold keep_everything_threshold(int64_t numel) {
  return MagnitudeThreshold{0, numel};
}

// k = int(density * numel), computed in double as Python does.
LM_HOST_DEVICE int64_t magnitude_keep_count(double density, int64_t numel) {
  if (!(density > 0.0)) return 0;
  if (density >= 1.0) return numel;
  const double k = density * static_cast<double>(numel);
  return k >= static_cast<double>(numel) ? numel : static_cast<int64_t>(k);
}

// Picking one radix digit: given a histogram of the candidates' digit values and the
// 1-based rank (from the top) of the wanted key among the candidates, return the digit
// holding it, the rank within that digit, and how many candidates share the digit.
struct DigitPick {
  int64_t digit;
  int64_t rank_in_digit;
  int64_t count_in_digit;
};

// Sixteen bins a step first (a block whose count does not reach the rank holds no pick), so a
// wide histogram takes a few hundred steps rather than thousands.
template <typename count_t>
LM_HOST_DEVICE DigitPick pick_digit_from_top(const count_t* histogram, int64_t bins, int64_t rank) {
  constexpr int64_t kBlock = 16;
  int64_t above = 0, end = bins;  // the bins at and above `end` hold `above` keys
  for (; end >= kBlock; end -= kBlock) {
    int64_t block = 0;
    for (int64_t b = end - kBlock; b < end; ++b) block += static_cast<int64_t>(histogram[b]);
    if (above + block >= rank) break;
    above += block;
  }
  for (int64_t d = end - 1; d >= 0; --d) {
    const int64_t c = static_cast<int64_t>(histogram[d]);
    if (above + c >= rank) return DigitPick{d, rank - above, c};
    above += c;
  }
  return DigitPick{0, rank - above, 0};
}

}  // namespace lorax_merge
