// The stacked primitives (majority_sign_mask, disjoint_merge): element (i, j) of an
// [n, positions] tensor is task i at position j; a range of positions is handled a tile
// at a time, task after task.
//
// Part of the level kernels: included by level_kernels.cpp only.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/ are compiled once per capability level, by level_kernels.cpp"
#endif

#include <cstdint>

#include "../../common/merge_rule.h"
#include "../kernel_api.h"
#include "merge_tiles.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t, typename acc_t, SignElection E>
void majority_sign_mask_typed(const scalar_t* x, int64_t n, int64_t positions, int64_t begin,
                              int64_t end, bool* out) {
  alignas(64) acc_t score[kTile];
  alignas(64) acc_t v[kTile];
  for (int64_t base = begin; base < end; base += kTile) {
    const int64_t len = end - base < kTile ? end - base : kTile;
    for (int64_t j = 0; j < len; ++j) score[j] = acc_t(0);
    for (int64_t i = 0; i < n; ++i) {
      load_run(x + i * positions + base, len, v);
      for (int64_t j = 0; j < len; ++j) score[j] += election_term<acc_t, E>(v[j]);
    }
    for (int64_t i = 0; i < n; ++i) {
      load_run(x + i * positions + base, len, v);
      bool* dst = out + i * positions + base;
      for (int64_t j = 0; j < len; ++j) {
        dst[j] = agrees_with_majority(v[j], majority_is_positive(score[j]));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void disjoint_merge_typed(const scalar_t* x, const bool* selected, int64_t n, int64_t positions,
                          int64_t begin, int64_t end, acc_t* out) {
  alignas(64) acc_t sum[kTile];
  alignas(64) acc_t count[kTile];
  alignas(64) acc_t v[kTile];
  for (int64_t base = begin; base < end; base += kTile) {
    const int64_t len = end - base < kTile ? end - base : kTile;
    for (int64_t j = 0; j < len; ++j) sum[j] = count[j] = acc_t(0);
    for (int64_t i = 0; i < n; ++i) {
      load_run(x + i * positions + base, len, v);
      const bool* m = selected + i * positions + base;
      for (int64_t j = 0; j < len; ++j) add_masked(sum[j], count[j], v[j], m[j]);
    }
    for (int64_t j = 0; j < len; ++j) v[j] = masked_mean(sum[j], count[j]);
    store_run(v, len, out + base);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
