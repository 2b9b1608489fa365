// The fused backward of a merge, chunk by chunk (common/weight_grad_sum.h): for each tile of
// kGradLanes elements, every task's keep bits and pruned values are recomputed as the forward
// computes them (from the task's magnitude threshold or its random stream), then the sign
// election and each element's share of the incoming gradient; each task's gradient is
// written once and its weight-gradient terms are added to its lanes, with merge_rule.h's
// rule; each chunk's lanes are folded into the chunk's sum. Loops run over arrays of one tile
// so that they vectorise.
//
// Part of the gradient level kernels: included by grad_level_kernels.cpp only.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/ are compiled once per capability level, by level_kernels.cpp"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../common/counter_rng.h"
#include "../../common/keys.h"
#include "../../common/merge_rule.h"
#include "../../common/weight_grad_sum.h"
#include "../kernel_api.h"
#include "merge_tiles.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

static_assert(kTile == kGradLanes, "a tile is one lane step of a weight-gradient chunk");

// keep[j] = 1 where the forward keeps element j by magnitude; `first` is the flat index of
// x[0]. As prune_by_magnitude: narrow keys, compared as signed integers, and the tie cut
// relative to the tile.
template <typename scalar_t>
inline void keep_by_magnitude(const scalar_t* x, int64_t first, int64_t len,
                              MagnitudeThreshold threshold, uint8_t* __restrict keep) {
  using Traits = KeyTraits<scalar_t>;
  using key_t = typename Traits::key_t;
  using signed_key_t = std::make_signed_t<key_t>;
  const signed_key_t key = static_cast<signed_key_t>(narrow_threshold_key<scalar_t>(threshold));
  const int64_t cut_in_tile = threshold.cut - first;
  const int32_t cut =
      static_cast<int32_t>(cut_in_tile < 0 ? 0 : (cut_in_tile > len ? len : cut_in_tile));
  for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
    const signed_key_t k = static_cast<signed_key_t>(magnitude_key(x[j]));
    keep[j] = static_cast<uint8_t>((k > key) | ((k == key) & (j < cut)));
  }
}

// keep[j] = 1 where the forward keeps element j at random (task `stream`'s words of the flat
// indices first, first + 1, ...), as prune_randomly.
inline void keep_randomly(uint64_t seed, int64_t stream, uint32_t keep_bound, int64_t first,
                          int64_t len, uint8_t* __restrict keep) {
  alignas(64) uint32_t pair_words[kTile + 2];
  const int64_t skip = first & 1;
  const uint64_t key = dare_stream_key(seed, static_cast<uint64_t>(stream));
  const int64_t num_pairs = (len + skip + 1) / 2;
  const uint64_t first_pair = static_cast<uint64_t>(first / 2);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const uint64_t bits = dare_pair_bits(key, first_pair + p);
    pair_words[2 * p] = static_cast<uint32_t>(bits);
    pair_words[2 * p + 1] = static_cast<uint32_t>(bits >> 32);
  }
  const uint32_t* __restrict words = pair_words + skip;
  const int32_t bound = static_cast<int32_t>(keep_bound ^ 0x80000000u);
  for (int64_t j = 0; j < len; ++j) {
    keep[j] = static_cast<uint8_t>(static_cast<int32_t>(words[j] ^ 0x80000000u) < bound);
  }
}

// One call's scratch (grad_scratch_bytes): every task's tile of pruned values and keep bits
// (kept across the two passes of an electing merge) and lane sums.
template <typename acc_t>
struct GradScratch {
  acc_t* values;  // [num_tasks][kTile]
  uint8_t* keep;  // [num_tasks][kTile]
  acc_t* lanes;   // [num_tasks][kGradLanes]

  GradScratch(void* scratch, int64_t num_tasks) {
    unsigned char* p = static_cast<unsigned char*>(scratch);
    values = reinterpret_cast<acc_t*>(p);
    p += num_tasks * kTile * sizeof(double);
    lanes = reinterpret_cast<acc_t*>(p);
    p += num_tasks * kGradLanes * sizeof(double);
    keep = p;
  }
};

template <typename acc_t>
inline void load_grad_tile(const TileGrad& m, int64_t base, int64_t len, acc_t* g) {
  switch (m.grad_type) {
    case ElementType::kDouble:
      return load_run(static_cast<const double*>(m.grad) + base, len, g);
    case ElementType::kHalf:
      return load_run(static_cast<const c10::Half*>(m.grad) + base, len, g);
    case ElementType::kBFloat16:
      return load_run(static_cast<const c10::BFloat16*>(m.grad) + base, len, g);
    default:
      return load_run(static_cast<const float*>(m.grad) + base, len, g);
  }
}

// Keep bits and pruned values (merge_rule.h's pruned_value) of task t over one tile.
template <typename scalar_t, typename acc_t>
inline void prune_for_grad(const TileGrad& m, int64_t t, int64_t base, int64_t len, acc_t density,
                           uint8_t* __restrict keep, acc_t* __restrict v) {
  const scalar_t* x = static_cast<const scalar_t*>(m.tasks[t]) + base;
  const int64_t first = m.index_offset + base;
  alignas(64) acc_t xv[kTile];
  load_run(x, len, xv);
  if (m.pruning == Pruning::kMagnitude) {
    keep_by_magnitude(x, first, len, m.thresholds[t], keep);
  } else if (m.pruning == Pruning::kRandom) {
    keep_randomly(m.seed, t, m.keep_bound, first, len, keep);
  } else {
    for (int64_t j = 0; j < len; ++j) keep[j] = 1;
  }
  if (m.rescale && m.pruning == Pruning::kRandom) {
    alignas(64) acc_t rescaled[kTile];
    for (int64_t j = 0; j < len; ++j) rescaled[j] = xv[j] / density;
    round_to_task_dtype<scalar_t>(rescaled, len);
    for (int64_t j = 0; j < len; ++j) v[j] = keep[j] ? rescaled[j] : xv[j] * acc_t(0);
  } else {
    for (int64_t j = 0; j < len; ++j) v[j] = keep[j] ? xv[j] : xv[j] * acc_t(0);
  }
}

// Task t's gradient over one tile from its shares s (merge_rule.h's task_gradient, rounded in
// runs), stored once.
template <typename scalar_t, typename acc_t>
inline void store_task_gradient(const TileGrad& m, int64_t t, int64_t base, int64_t len,
                                const acc_t* __restrict s, const uint8_t* __restrict keep,
                                acc_t density) {
  const acc_t w = static_cast<acc_t>(m.weights[t]);
  alignas(64) acc_t grad[kTile];
  for (int64_t j = 0; j < len; ++j) grad[j] = value_gradient(s[j], w);
  round_to_task_dtype<scalar_t>(grad, len);
  if (m.rescale && m.pruning == Pruning::kRandom) {
    for (int64_t j = 0; j < len; ++j) grad[j] = rescaled_gradient(grad[j], density);
    round_to_task_dtype<scalar_t>(grad, len);
  }
  for (int64_t j = 0; j < len; ++j) grad[j] = masked_gradient(grad[j], keep[j] != 0);
  store_run(grad, len, static_cast<scalar_t*>(m.task_grads[t]) + base);
}

template <typename scalar_t, typename acc_t, SignElection E>
void merge_grad_blocks_typed(const TileGrad& m, int64_t block_begin, int64_t block_end,
                             void* scratch_memory) {
  constexpr bool kElects = E != SignElection::kNone;
  const int64_t n = m.num_tasks;
  const acc_t density = static_cast<acc_t>(static_cast<typename OpMath<scalar_t>::type>(m.density));
  const GradScratch<acc_t> scratch(scratch_memory, n);
  const bool weight_grads = m.chunk_sums != nullptr;
  alignas(64) acc_t g[kTile];
  alignas(64) acc_t share[kTile];
  alignas(64) acc_t s[kTile];
  alignas(64) acc_t positive[kTile];  // 1 where the elected sign is +1, else 0
  const int64_t chunks = grad_chunks(m.numel);

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t chunk_begin = block * kGradChunksPerBlock;
    const int64_t chunk_end =
        chunks < chunk_begin + kGradChunksPerBlock ? chunks : chunk_begin + kGradChunksPerBlock;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      if (weight_grads) {
        for (int64_t i = 0; i < n * kGradLanes; ++i) scratch.lanes[i] = acc_t(0);
      }
      for (int64_t step = 0; step < kGradLaneSteps; ++step) {
        const int64_t base = chunk * kGradChunk + step * kTile;
        if (base >= m.numel) break;  // the lanes of missing elements would add +0: no change
        const int64_t len = m.numel - base < kTile ? m.numel - base : kTile;
        load_grad_tile(m, base, len, g);
        if constexpr (kElects) {
          // First pass: every task's pruned values, the election and each element's share.
          using vote_t = typename OpMath<scalar_t>::type;
          alignas(64) vote_t score[kTile];
          alignas(64) acc_t pos_count[kTile], neg_count[kTile];
          for (int64_t j = 0; j < len; ++j) {
            score[j] = vote_t(0);
            pos_count[j] = neg_count[j] = acc_t(0);
          }
          for (int64_t t = 0; t < n; ++t) {
            acc_t* __restrict v = scratch.values + t * kTile;
            prune_for_grad<scalar_t>(m, t, base, len, density, scratch.keep + t * kTile, v);
            for (int64_t j = 0; j < len; ++j) {
              add_vote<acc_t, vote_t, E>(score[j], v[j]);
              pos_count[j] += v[j] > acc_t(0) ? acc_t(1) : acc_t(0);
              neg_count[j] += v[j] < acc_t(0) ? acc_t(1) : acc_t(0);
            }
          }
          for (int64_t j = 0; j < len; ++j) {
            const bool up = majority_is_positive(score[j]);
            positive[j] = up ? acc_t(1) : acc_t(0);
            share[j] = elected_share(g[j], up ? pos_count[j] : neg_count[j]);
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          const acc_t* v = scratch.values + (kElects ? t * kTile : 0);
          const uint8_t* keep = scratch.keep + (kElects ? t * kTile : 0);
          const acc_t* shares = g;
          if constexpr (kElects) {
            for (int64_t j = 0; j < len; ++j) {
              // agrees_with_majority, in a form that vectorises
              const bool up = positive[j] > acc_t(0);
              s[j] = task_share(share[j], (up & (v[j] > acc_t(0))) | (!up & (v[j] < acc_t(0))));
            }
            shares = s;
          } else {
            prune_for_grad<scalar_t>(m, t, base, len, density, scratch.keep, scratch.values);
          }
          if (m.task_grads != nullptr) {
            store_task_gradient<scalar_t>(m, t, base, len, shares, keep, density);
          }
          if (weight_grads) {
            acc_t* __restrict lane = scratch.lanes + t * kGradLanes;
            for (int64_t j = 0; j < len; ++j) lane[j] += weight_gradient_term(shares[j], v[j]);
          }
        }
      }
      if (weight_grads) {
        for (int64_t t = 0; t < n; ++t) {
          m.chunk_sums[t * chunks + chunk] =
              static_cast<double>(fold_lanes(scratch.lanes + t * kGradLanes));
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void merge_grad_blocks_elected(const TileGrad& m, int64_t block_begin, int64_t block_end,
                               void* scratch) {
  switch (m.election) {
    case SignElection::kTotal:
      return merge_grad_blocks_typed<scalar_t, acc_t, SignElection::kTotal>(m, block_begin,
                                                                            block_end, scratch);
    case SignElection::kFrequency:
      return merge_grad_blocks_typed<scalar_t, acc_t, SignElection::kFrequency>(m, block_begin,
                                                                                block_end, scratch);
    default:
      return merge_grad_blocks_typed<scalar_t, acc_t, SignElection::kNone>(m, block_begin,
                                                                           block_end, scratch);
  }
}

// disjoint_merge's gradient over positions [begin, end) (merge_rule.h's
// disjoint_merge_gradient, rounded in runs): grad in acc_t, out of scalar_t.
template <typename scalar_t, typename acc_t>
void disjoint_merge_grad_typed(const acc_t* grad, const bool* selected, int64_t n,
                               int64_t positions, int64_t begin, int64_t end, scalar_t* out) {
  alignas(64) acc_t count[kTile];
  alignas(64) acc_t share[kTile];
  alignas(64) acc_t v[kTile];
  for (int64_t base = begin; base < end; base += kTile) {
    const int64_t len = end - base < kTile ? end - base : kTile;
    for (int64_t j = 0; j < len; ++j) count[j] = acc_t(0);
    for (int64_t i = 0; i < n; ++i) {
      const bool* m = selected + i * positions + base;
      for (int64_t j = 0; j < len; ++j) count[j] += m[j] ? acc_t(1) : acc_t(0);
    }
    for (int64_t j = 0; j < len; ++j) share[j] = elected_share(grad[base + j], count[j]);
    round_to_task_dtype<scalar_t>(share, len);
    for (int64_t i = 0; i < n; ++i) {
      const bool* m = selected + i * positions + base;
      for (int64_t j = 0; j < len; ++j) v[j] = task_share(share[j], m[j]);
      store_run(v, len, out + i * positions + base);
    }
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
