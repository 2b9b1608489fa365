// The passes over the data of the magnitude-threshold selection (select.h drives them):
// the sampled bracket's scan, radix digit histograms, the copy of a radix bucket and the
// search for the tie cut. Each works on one range of one tensor.
//
// Part of the level kernels: included by level_kernels.cpp only.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/ are compiled once per capability level, by level_kernels.cpp"
#endif

#include <cstdint>
#include <type_traits>

#include "../../common/keys.h"
#include "../kernel_api.h"
#include "simd.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Keys are formed a block at a time into an array (a loop the compiler vectorises), then
// used one by one.
constexpr int64_t kKeyBlock = 256;

template <typename scalar_t>
using StoredKey =
    std::conditional_t<sizeof(typename KeyTraits<scalar_t>::key_t) <= 4, uint32_t, uint64_t>;

template <typename scalar_t>
inline void keys_of_block(const scalar_t* x, int64_t len,
                          typename KeyTraits<scalar_t>::key_t* keys) {
  for (int64_t j = 0; j < len; ++j) keys[j] = magnitude_key(x[j]);
}

template <typename scalar_t>
int64_t scan_bracket_typed(const scalar_t* x, int64_t begin, int64_t end, uint64_t lo_key,
                           uint64_t hi_key, void* keys_out, uint32_t* offsets, int64_t capacity,
                           int64_t* above) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  using stored_key_t = StoredKey<scalar_t>;
  stored_key_t* keys = static_cast<stored_key_t*>(keys_out);
  const key_t lo = static_cast<key_t>(lo_key), hi = static_cast<key_t>(hi_key);
  int64_t count = 0, count_above = 0, i = begin;
#if defined(LM_CPU_KEY_VECTORS)
  if constexpr (sizeof(key_t) <= 4) {
    const bool scanned = hi < KeyTraits<scalar_t>::kInf
                             ? scan_bracket_vectors<false>(x, &i, end, begin, lo, hi, keys, offsets,
                                                           &count, capacity, &count_above)
                             : scan_bracket_vectors<true>(x, &i, end, begin, lo, hi, keys, offsets,
                                                          &count, capacity, &count_above);
    if (!scanned) return -1;
  }
#endif
  // Branch-free: every key is written at the end of the output, the ones inside kept.
  alignas(64) key_t block[kKeyBlock];
  for (; i < end; i += kKeyBlock) {
    const int64_t len = end - i < kKeyBlock ? end - i : kKeyBlock;
    keys_of_block(x + i, len, block);
    for (int64_t j = 0; j < len; ++j) {
      const key_t key = block[j];
      count_above += key > hi;
      keys[count] = key;
      offsets[count] = static_cast<uint32_t>(i + j - begin);
      count += (key >= lo) & (key <= hi);
      if (count > capacity) return -1;
    }
  }
  *above += count_above;
  return count;
}

template <typename scalar_t>
void digit_histogram_typed(const scalar_t* x, int64_t begin, int64_t end, int shift, int bits,
                           uint64_t prefix, uint64_t prefix_mask, uint32_t* counts) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  const key_t want = static_cast<key_t>(prefix), mask = static_cast<key_t>(prefix_mask);
  const uint32_t bins = uint32_t(1) << bits;
  const key_t digit_mask = static_cast<key_t>(bins - 1);
  // Digits of a block, with `bins` (one past the last bin) for keys off the prefix.
  alignas(64) key_t keys[kKeyBlock];
  alignas(64) uint32_t digits[kKeyBlock];
  auto block_digits = [&](int64_t i, int64_t len) {
    keys_of_block(x + i, len, keys);
    for (int64_t j = 0; j < len; ++j) {
      const key_t key = keys[j];
      digits[j] = (key & mask) == want ? static_cast<uint32_t>((key >> shift) & digit_mask) : bins;
    }
  };
  // A large histogram, or few keys: one set of counters (the caller's), no lanes to clear.
  if (bins > 2048 || end - begin < 8 * static_cast<int64_t>(bins)) {
    for (int64_t i = begin; i < end; i += kKeyBlock) {
      const int64_t len = end - i < kKeyBlock ? end - i : kKeyBlock;
      block_digits(i, len);
      for (int64_t j = 0; j < len; ++j) {
        if (digits[j] < bins) ++counts[digits[j]];
      }
    }
    return;
  }
  // Four interleaved sets of counters (plus the off-prefix bin), so that repeated digits
  // do not serialise on store-to-load forwarding.
  uint32_t lanes[4][2048 + 1] = {};
  for (int64_t i = begin; i < end; i += kKeyBlock) {
    const int64_t len = end - i < kKeyBlock ? end - i : kKeyBlock;
    block_digits(i, len);
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) {
      ++lanes[0][digits[j]];
      ++lanes[1][digits[j + 1]];
      ++lanes[2][digits[j + 2]];
      ++lanes[3][digits[j + 3]];
    }
    for (; j < len; ++j) ++lanes[0][digits[j]];
  }
  for (uint32_t b = 0; b < bins; ++b) {
    counts[b] += lanes[0][b] + lanes[1][b] + lanes[2][b] + lanes[3][b];
  }
}

template <typename scalar_t>
int64_t copy_matching_typed(const scalar_t* x, int64_t begin, int64_t end, uint64_t prefix,
                            uint64_t prefix_mask, Candidate* out) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  const key_t want = static_cast<key_t>(prefix), mask = static_cast<key_t>(prefix_mask);
  alignas(64) key_t keys[kKeyBlock];
  int64_t count = 0;
  for (int64_t i = begin; i < end; i += kKeyBlock) {
    const int64_t len = end - i < kKeyBlock ? end - i : kKeyBlock;
    keys_of_block(x + i, len, keys);
    for (int64_t j = 0; j < len; ++j) {
      if ((keys[j] & mask) == want) out[count++] = Candidate{keys[j], i + j};
    }
  }
  return count;
}

template <typename scalar_t>
int64_t find_equal_rank_typed(const scalar_t* x, int64_t begin, int64_t end, uint64_t key_bits,
                              int64_t rank) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  const key_t key = static_cast<key_t>(key_bits);
  alignas(64) key_t keys[kKeyBlock];
  int64_t seen = 0;
  for (int64_t i = begin; i < end; i += kKeyBlock) {
    const int64_t len = end - i < kKeyBlock ? end - i : kKeyBlock;
    keys_of_block(x + i, len, keys);
    for (int64_t j = 0; j < len; ++j) {
      if (keys[j] == key && ++seen == rank) return i + j + 1;
    }
  }
  return -1;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
