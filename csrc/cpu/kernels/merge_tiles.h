// The fused merge, tile by tile: each task's values over one tile are pruned (magnitude or
// random), weighted and accumulated while they are in L1, with merge_rule.h's rule; the
// result is stored once. Loops run over arrays of one tile so that they vectorise.
//
// Part of the level kernels: included by level_kernels.cpp only.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/ are compiled once per capability level, by level_kernels.cpp"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../common/canonical_nan.h"
#include "../../common/counter_rng.h"
#include "../../common/keys.h"
#include "../../common/merge_rule.h"
#include "../kernel_api.h"
#include "simd.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// The per-tile steps are inlined into the tile loop whatever the compiler's size estimates
// say: an out-of-line step costs a call per tile and loses the loop's constants.
#define LM_TILE_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------- element conversions

// v[j] = acc_t(x[j]) for a run of at most kTile elements.
template <typename acc_t, typename scalar_t>
inline void load_run(const scalar_t* x, int64_t len, acc_t* v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
    if constexpr (std::is_same_v<acc_t, float>) {
      half_run_to_float(bits, len, v);
    } else {
      alignas(64) float f[kTile];
      half_run_to_float(bits, len, f);
      for (int64_t j = 0; j < len; ++j) v[j] = static_cast<acc_t>(f[j]);
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
    for (int64_t j = 0; j < len; ++j) v[j] = static_cast<acc_t>(bfloat16_to_float(bits[j]));
  } else {
    for (int64_t j = 0; j < len; ++j) v[j] = static_cast<acc_t>(x[j]);
  }
}

// The canonical NaN of a dtype (common/canonical_nan.h): positive, every payload bit set.
template <typename T>
inline T canonical_nan() {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double");
  using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const bits_t bits = static_cast<bits_t>(CanonicalNaN<T>::kBits);
  T value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// dst[j] = out_t(v[j]), every NaN written as the dtype's canonical NaN (what
// common/canonical_nan.h's output_value gives). A double becomes a 16-bit float through
// float, as c10's 16-bit types are constructed from float.
template <typename out_t, typename acc_t>
inline void store_run(const acc_t* v, int64_t len, out_t* dst) {
  if constexpr (std::is_same_v<out_t, c10::Half> || std::is_same_v<out_t, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
    const float* f = nullptr;
    alignas(64) float narrowed[kTile];
    if constexpr (std::is_same_v<acc_t, float>) {
      f = v;
    } else {
      for (int64_t j = 0; j < len; ++j) narrowed[j] = static_cast<float>(v[j]);
      f = narrowed;
    }
    if constexpr (std::is_same_v<out_t, c10::Half>) {
      float_run_to_half(f, len, bits);
    } else {
      for (int64_t j = 0; j < len; ++j) bits[j] = float_to_bfloat16(f[j]);
    }
    for (int64_t j = 0; j < len; ++j) {
      bits[j] = f[j] != f[j] ? CanonicalNaN<out_t>::kBits : bits[j];
    }
  } else {
    const out_t nan = canonical_nan<out_t>();
    for (int64_t j = 0; j < len; ++j) {
      const out_t r = static_cast<out_t>(v[j]);
      dst[j] = r != r ? nan : r;
    }
  }
}

// v[j] = acc_t(scalar_t(v[j])): a value rounded to the task dtype, as `tensor / density`
// gives it. A double becomes a 16-bit float through float, as c10's 16-bit types are
// constructed from float.
template <typename scalar_t, typename acc_t>
inline void round_to_task_dtype(acc_t* v, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t j = 0; j < len; ++j) v[j] = static_cast<acc_t>(static_cast<float>(v[j]));
  } else {
    alignas(64) float narrowed[kTile];
    float* f = narrowed;
    if constexpr (std::is_same_v<acc_t, float>) {
      f = v;
    } else {
      for (int64_t j = 0; j < len; ++j) narrowed[j] = static_cast<float>(v[j]);
    }
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      half_round_trip(f, len);
    } else {
      for (int64_t j = 0; j < len; ++j) f[j] = bfloat16_to_float(float_to_bfloat16(f[j]));
    }
    if constexpr (!std::is_same_v<acc_t, float>) {
      for (int64_t j = 0; j < len; ++j) v[j] = static_cast<acc_t>(narrowed[j]);
    }
  }
}

template <typename acc_t>
LM_TILE_INLINE void store_tile(ElementType out_type, const acc_t* v, int64_t len, void* out,
                               int64_t base) {
  switch (out_type) {
    case ElementType::kDouble:
      return store_run(v, len, static_cast<double*>(out) + base);
    case ElementType::kHalf:
      return store_run(v, len, static_cast<c10::Half*>(out) + base);
    case ElementType::kBFloat16:
      return store_run(v, len, static_cast<c10::BFloat16*>(out) + base);
    default:
      return store_run(v, len, static_cast<float*>(out) + base);
  }
}

// The task's values over a tile in acc_t: the input itself when it needs no conversion.
template <typename acc_t, typename scalar_t>
LM_TILE_INLINE const acc_t* values_of(const scalar_t* x, int64_t len, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    load_run(x, len, buffer);
    return buffer;
  }
}

// ---------------------------------------------------------------- pruning one tile

// v = x pruned to its entries above the task's magnitude threshold (dropped: x * 0);
// xv is x in acc_t (v may be xv).
template <typename scalar_t, typename acc_t>
LM_TILE_INLINE void prune_by_magnitude(const scalar_t* x, const acc_t* xv, int64_t base,
                                       int64_t len, MagnitudeThreshold threshold, acc_t* v) {
  using Traits = KeyTraits<scalar_t>;
  using key_t = typename Traits::key_t;
  // The threshold in the key's own width (keep-nothing becomes {kNaN, cut 0}, which
  // keeps nothing either) and the tie cut relative to the tile, so the comparisons stay
  // narrow and vectorise.
  // Keys compare as signed integers (they are below 2^(bits - 1)), which every instruction
  // set has for vectors.
  using signed_key_t = std::make_signed_t<key_t>;
  const signed_key_t key = static_cast<signed_key_t>(narrow_threshold_key<scalar_t>(threshold));
  const int64_t cut_in_tile = threshold.cut - base;
  const int32_t cut =
      static_cast<int32_t>(cut_in_tile < 0 ? 0 : (cut_in_tile > len ? len : cut_in_tile));
  // kTies: which elements whose key equals the threshold are kept: none (the tie cut lies
  // before the tile), all (after it) or those before the cut (inside it: one tile a task).
  auto prune = [&](auto key_of, auto ties) {
    constexpr int kTies = decltype(ties)::value;
    for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
      const signed_key_t k = static_cast<signed_key_t>(key_of(x[j]));
      bool kept;
      if constexpr (kTies == 0) {
        kept = k > key;
      } else if constexpr (kTies == 1) {
        kept = k >= key;
      } else {
        kept = (k > key) | ((k == key) & (j < cut));
      }
      const acc_t value = xv[j], dropped = value * acc_t(0);  // the loop has no branch
      v[j] = kept ? value : dropped;
    }
  };
  auto prune_ties = [&](auto key_of) {
    if (cut_in_tile <= 0) {
      prune(key_of, std::integral_constant<int, 0>{});
    } else if (cut_in_tile >= len) {
      prune(key_of, std::integral_constant<int, 1>{});
    } else {
      prune(key_of, std::integral_constant<int, 2>{});
    }
  };
  // Below kInf, a NaN's own bits compare like its key: the NaN fold can be left out.
  if (key < static_cast<signed_key_t>(Traits::kInf)) {
    prune_ties([](scalar_t e) { return Traits::raw_abs_bits(e); });
  } else {
    prune_ties([](scalar_t e) { return magnitude_key(e); });
  }
}

// v = x pruned by the random words of (seed, stream, flat index); kept entries divided by
// the density and rounded to the task dtype when `rescale`. xv is x in acc_t (v may be xv).
template <typename scalar_t, typename acc_t>
LM_TILE_INLINE void prune_randomly(const TileMerge& m, int64_t task, const acc_t* xv, int64_t base,
                                   int64_t len, acc_t density, acc_t* v) {
  // The words of the pairs from the one holding the tile's first flat index: a slice at an
  // odd offset starts on its pair's high word.
  alignas(64) uint32_t pair_words[kTile + 2];
  const int64_t first = m.index_offset + base;
  const int64_t skip = first & 1;
  uint32_t* words = pair_words;
  const uint64_t key = dare_stream_key(m.seed, static_cast<uint64_t>(m.first_stream + task));
  const int64_t num_pairs = (len + skip + 1) / 2;
  const uint64_t first_pair = static_cast<uint64_t>(first / 2);
  // dare_pair_bits(key, pair) is mix64(key + (pair + 1) * golden_gamma): the counter is
  // stepped by addition, which vectorises without 64-bit multiplications.
  uint64_t counter = key + (first_pair + 1) * kGoldenGamma;
  for (int64_t p = 0; p < num_pairs; ++p, counter += kGoldenGamma) {
    const uint64_t bits = mix64(counter);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    std::memcpy(words + 2 * p, &bits, sizeof(bits));  // low half first: one 64-bit store
#else
    words[2 * p] = static_cast<uint32_t>(bits);
    words[2 * p + 1] = static_cast<uint32_t>(bits >> 32);
#endif
  }
  words += skip;
  // word < bound as a signed comparison (both offset by 2^31), which every instruction set
  // has for vectors.
  const int32_t bound = static_cast<int32_t>(m.keep_bound ^ 0x80000000u);
  auto kept = [&](int64_t j) { return static_cast<int32_t>(words[j] ^ 0x80000000u) < bound; };
  if (m.rescale) {
    alignas(64) acc_t rescaled[kTile];
    for (int64_t j = 0; j < len; ++j) rescaled[j] = xv[j] / density;
    round_to_task_dtype<scalar_t>(rescaled, len);
    for (int64_t j = 0; j < len; ++j) {
      const acc_t dropped = xv[j] * acc_t(0);  // computed either way: the loop has no branch
      v[j] = kept(j) ? rescaled[j] : dropped;
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t value = xv[j], dropped = value * acc_t(0);
      v[j] = kept(j) ? value : dropped;
    }
  }
}

// ---------------------------------------------------------------- accumulating a tile

// Tasks are accumulated kTaskBlock at a time: each element's state is read and written
// once per block rather than once per task (the order of the tasks is kept).
constexpr int kTaskBlock = 4;

// Per-tile accumulator state as arrays (one entry per element of the tile), so that the
// loops over a tile vectorise; the rule itself is merge_rule.h's.
// The elected counts are int32 lanes: one integer step a task instead of a mask-and-add.
template <typename acc_t, typename vote_t, SignElection E>
struct TileState {
  alignas(64) vote_t score[kTile];
  alignas(64) acc_t pos_sum[kTile];
  alignas(64) int32_t pos_count[kTile];
  alignas(64) acc_t neg_sum[kTile];
  alignas(64) int32_t neg_count[kTile];

  // Adds tasks v[0], ..., v[N - 1] (weights w[0..N)), in that order. The first call of a
  // tile (kFirst) starts from the empty state instead of reading it; the last (kLast)
  // writes the elements' results instead of the state.
  template <int N, bool kFirst, bool kLast>
  void add(const acc_t* const* v, const acc_t* w, int64_t len, acc_t* __restrict result) {
    const acc_t* __restrict v0 = v[0];
    const acc_t* __restrict v1 = v[N > 1 ? 1 : 0];
    const acc_t* __restrict v2 = v[N > 2 ? 2 : 0];
    const acc_t* __restrict v3 = v[N > 3 ? 3 : 0];
    for (int64_t j = 0; j < len; ++j) {
      vote_t s = vote_t(0);
      acc_t ps = acc_t(0), ns = acc_t(0);
      int32_t pc = 0, nc = 0;
      if constexpr (!kFirst) {
        s = score[j];
        ps = pos_sum[j];
        pc = pos_count[j];
        ns = neg_sum[j];
        nc = neg_count[j];
      }
      add_elected<acc_t, vote_t, E>(s, ps, pc, ns, nc, v0[j], w[0]);
      if constexpr (N > 1) add_elected<acc_t, vote_t, E>(s, ps, pc, ns, nc, v1[j], w[1]);
      if constexpr (N > 2) add_elected<acc_t, vote_t, E>(s, ps, pc, ns, nc, v2[j], w[2]);
      if constexpr (N > 3) add_elected<acc_t, vote_t, E>(s, ps, pc, ns, nc, v3[j], w[3]);
      if constexpr (kLast) {
        result[j] = elected_result(s, ps, pc, ns, nc);
      } else {
        score[j] = s;
        pos_sum[j] = ps;
        pos_count[j] = pc;
        neg_sum[j] = ns;
        neg_count[j] = nc;
      }
    }
  }
};

template <typename acc_t, typename vote_t>
struct TileState<acc_t, vote_t, SignElection::kNone> {
  alignas(64) acc_t sum[kTile];

  template <int N, bool kFirst, bool kLast>
  void add(const acc_t* const* v, const acc_t* w, int64_t len, acc_t* __restrict result) {
    const acc_t* __restrict v0 = v[0];
    const acc_t* __restrict v1 = v[N > 1 ? 1 : 0];
    const acc_t* __restrict v2 = v[N > 2 ? 2 : 0];
    const acc_t* __restrict v3 = v[N > 3 ? 3 : 0];
    for (int64_t j = 0; j < len; ++j) {
      acc_t s = kFirst ? negative_zero<acc_t>() : sum[j];
      s += v0[j] * w[0];
      if constexpr (N > 1) s += v1[j] * w[1];
      if constexpr (N > 2) s += v2[j] * w[2];
      if constexpr (N > 3) s += v3[j] * w[3];
      if constexpr (kLast) {
        result[j] = s;
      } else {
        sum[j] = s;
      }
    }
  }
};

template <bool kFirst, bool kLast, typename State, typename acc_t>
inline void add_block(State& state, int count, const acc_t* const* values, const acc_t* weights,
                      int64_t len, acc_t* result) {
  switch (count) {
    case 4:
      return state.template add<4, kFirst, kLast>(values, weights, len, result);
    case 3:
      return state.template add<3, kFirst, kLast>(values, weights, len, result);
    case 2:
      return state.template add<2, kFirst, kLast>(values, weights, len, result);
    default:
      return state.template add<1, kFirst, kLast>(values, weights, len, result);
  }
}

// One block of tasks into the tile's state (or, for the last block, its results).
template <typename State, typename acc_t>
inline void add_block(State& state, bool first, bool last, int count, const acc_t* const* values,
                      const acc_t* weights, int64_t len, acc_t* result) {
  if (first && last) return add_block<true, true>(state, count, values, weights, len, result);
  if (first) return add_block<true, false>(state, count, values, weights, len, result);
  if (last) return add_block<false, true>(state, count, values, weights, len, result);
  add_block<false, false>(state, count, values, weights, len, result);
}

template <typename scalar_t, typename acc_t, SignElection E>
void merge_tiles_typed(const TileMerge& m, int64_t tile_begin, int64_t tile_end) {
  const acc_t density = static_cast<acc_t>(static_cast<typename OpMath<scalar_t>::type>(m.density));
  TileState<acc_t, typename OpMath<scalar_t>::type, E> state;
  alignas(64) acc_t pruned[kTaskBlock][kTile];
  alignas(64) acc_t result[kTile];
  const acc_t* values[kTaskBlock];
  acc_t weights[kTaskBlock];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t base = tile * kTile;
    const int64_t len = m.numel - base < kTile ? m.numel - base : kTile;
    for (int64_t first = 0; first < m.num_tasks; first += kTaskBlock) {
      const int count =
          static_cast<int>(m.num_tasks - first < kTaskBlock ? m.num_tasks - first : kTaskBlock);
      for (int b = 0; b < count; ++b) {
        const int64_t t = first + b;
        const scalar_t* x = static_cast<const scalar_t*>(m.tasks[t]) + base;
        weights[b] = static_cast<acc_t>(m.weights[t]);
        values[b] = values_of(x, len, pruned[b]);
        if (m.pruning == Pruning::kMagnitude) {
          prune_by_magnitude(x, values[b], m.index_offset + base, len, m.thresholds[t], pruned[b]);
          values[b] = pruned[b];
        } else if (m.pruning == Pruning::kRandom) {
          prune_randomly<scalar_t>(m, t, values[b], base, len, density, pruned[b]);
          values[b] = pruned[b];
        }
      }
      add_block(state, first == 0, first + count == m.num_tasks, count, values, weights, len,
                result);
    }
    store_tile(m.out_type, result, len, m.out, base);
  }
}

template <typename scalar_t, typename acc_t>
void merge_tiles_elected(const TileMerge& m, int64_t tile_begin, int64_t tile_end) {
  switch (m.election) {
    case SignElection::kTotal:
      return merge_tiles_typed<scalar_t, acc_t, SignElection::kTotal>(m, tile_begin, tile_end);
    case SignElection::kFrequency:
      return merge_tiles_typed<scalar_t, acc_t, SignElection::kFrequency>(m, tile_begin, tile_end);
    default:
      return merge_tiles_typed<scalar_t, acc_t, SignElection::kNone>(m, tile_begin, tile_end);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
