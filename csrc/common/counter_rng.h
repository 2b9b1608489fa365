// Counter-based random bits for DARE's random pruning.
//
// A keyed SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
// generators", OOPSLA 2014) used as a counter-based generator: the 64-bit output for
// counter c of a stream is mix64(stream_key + (c + 1) * golden_gamma), where
// stream_key = mix64(seed xor mix64(stream + golden_gamma)) and mix64 is SplitMix64's
// finaliser. Output c gives the random words of elements 2c (low half) and 2c + 1 (high
// half), so the word of an element depends only on (seed, stream, flat index): the same
// mask comes out on the CPU and the GPU, for any thread count and launch shape. It costs
// two 64-bit multiplies per pair of elements.
#pragma once

#include <cstdint>

#include "macros.h"

namespace lorax_merge {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

LM_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Key of one random stream under one seed; computed once per task.
LM_HOST_DEVICE uint64_t dare_stream_key(uint64_t seed, uint64_t stream) {
  return mix64(seed ^ mix64(stream + kGoldenGamma));
}

// Random words of elements 2*pair (low half) and 2*pair + 1 (high half).
LM_HOST_DEVICE uint64_t dare_pair_bits(uint64_t stream_key, uint64_t pair) {
  return mix64(stream_key + (pair + 1) * kGoldenGamma);
}

// An element is kept iff its word is below this bound, so it is kept with probability
// floor(density * 2^32) / 2^32. Computed once on the host, in double; below 2^32 for
// every density < 1.
inline uint64_t dare_keep_bound(double density) {
  if (!(density > 0.0)) return 0;
  if (density >= 1.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(density * 4294967296.0);
}

}  // namespace lorax_merge
