// The single pass of sampled-bracket selection: over [begin, end), count the keys above
// `hi` and copy the elements whose key lies in [lo, hi] as (key, flat index), in index
// order. Returns how many were copied, or -1 if more than `capacity` would be.
// Where AVX-512 is available (-march), 16 keys are formed and compared per step and only
// the elements inside the bracket (a few percent) are handled one by one.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../common/keys.h"

namespace lorax_merge {
namespace cpu {

struct Candidate {
  uint64_t key;
  int64_t index;
};

#if defined(__AVX512F__)
// Magnitude keys of 16 consecutive elements, as 32-bit lanes (magnitude_key's rule).
template <typename scalar_t>
inline __m512i magnitude_keys16(const scalar_t* p) {
  using Traits = KeyTraits<scalar_t>;
  __m512i bits;
  if constexpr (sizeof(scalar_t) == 4) {
    bits = _mm512_loadu_si512(static_cast<const void*>(p));
  } else {
    bits = _mm512_maskz_cvtepu16_epi32(0xFFFF,
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int32_t>(Traits::kNaN));
  bits = _mm512_and_si512(bits, abs_mask);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(bits, _mm512_set1_epi32(static_cast<int32_t>(Traits::kInf)));
  return _mm512_mask_mov_epi32(bits, nan, abs_mask);
}
#endif

template <typename scalar_t>
int64_t scan_bracket(const scalar_t* x, int64_t begin, int64_t end,
                     typename KeyTraits<scalar_t>::key_t lo, typename KeyTraits<scalar_t>::key_t hi,
                     Candidate* out, int64_t capacity, int64_t* above) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  int64_t count = 0, count_above = 0;
  int64_t i = begin;
#if defined(__AVX512F__)
  if constexpr (sizeof(key_t) <= 4) {
    const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo));
    const __m512i vhi = _mm512_set1_epi32(static_cast<int32_t>(hi));
    alignas(64) uint32_t lanes[16];
    for (; i + 16 <= end; i += 16) {
      if (count + 16 > capacity) return -1;
      const __m512i keys = magnitude_keys16(x + i);
      count_above += __builtin_popcount(_mm512_cmpgt_epu32_mask(keys, vhi));
      uint32_t inside = _mm512_cmpge_epu32_mask(keys, vlo) & _mm512_cmple_epu32_mask(keys, vhi);
      if (inside == 0) continue;
      _mm512_store_si512(static_cast<void*>(lanes), keys);
      do {
        const int lane = __builtin_ctz(inside);
        out[count++] = Candidate{lanes[lane], i + lane};
        inside &= inside - 1;
      } while (inside != 0);
    }
  }
#endif
  for (; i < end; ++i) {
    const key_t key = magnitude_key(x[i]);
    count_above += key > hi;
    if (key >= lo && key <= hi) {
      if (count >= capacity) return -1;
      out[count++] = Candidate{key, i};
    }
  }
  *above = count_above;
  return count;
}

}  // namespace cpu
}  // namespace lorax_merge
