// The order in which the gradient of a merge weight is summed, shared by the CPU and CUDA
// kernels so that both give the same bits for any thread count and launch shape.
//
// The gradient of weight i is the sum over the elements j of one term t_j. The elements are
// split into chunks of kGradChunk, from the tensor's start:
//   * inside a chunk, lane l (0 <= l < kGradLanes) adds t_{l}, t_{l + kGradLanes}, ...,
//     t_{l + (kGradLaneSteps - 1) kGradLanes} in that order, starting from +0 (elements past the
//     end add +0), in the accumulation type;
//   * the lane sums are folded by halving: lane l += lane l + s for s = kGradLanes / 2, ..., 1;
//     lane 0 is the chunk's sum;
//   * the chunk sums, converted to double, are added as a pairwise tree: level by level, node k
//     is the sum of nodes 2k and 2k + 1, and an odd last node passes up unchanged.
#pragma once

#include <cstdint>

#include "macros.h"

// Always inlined, also on the host: the CPU's level kernels (cpu/kernels/) must not share an
// out-of-line copy compiled for a wider instruction set with other levels.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LM_GRAD_SUM_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LM_GRAD_SUM_INLINE inline __attribute__((always_inline))
#else
#define LM_GRAD_SUM_INLINE inline
#endif

namespace lorax_merge {

constexpr int kGradLanes = 256;
constexpr int kGradLaneSteps = 8;
constexpr int64_t kGradChunk = int64_t(kGradLanes) * kGradLaneSteps;
constexpr int64_t kGradChunksPerBlock = 16;  // chunks per unit of CPU work

LM_GRAD_SUM_INLINE int64_t grad_chunks(int64_t numel) {
  return (numel + kGradChunk - 1) / kGradChunk;
}

// Pairwise tree sum of values[0 .. n), in place (values is overwritten).
LM_GRAD_SUM_INLINE double pairwise_tree_sum(double* values, int64_t n) {
  if (n == 0) return 0.0;
  while (n > 1) {
    const int64_t pairs = n / 2;
    for (int64_t k = 0; k < pairs; ++k) values[k] = values[2 * k] + values[2 * k + 1];
    if (n % 2 != 0) values[pairs] = values[n - 1];
    n = (n + 1) / 2;
  }
  return values[0];
}

// Folds lane sums by halving; lane[0] is the sum afterwards.
template <typename acc_t>
LM_GRAD_SUM_INLINE acc_t fold_lanes(acc_t* lane) {
  for (int s = kGradLanes / 2; s >= 1; s /= 2) {
    for (int l = 0; l < s; ++l) lane[l] += lane[l + s];
  }
  return lane[0];
}

}  // namespace lorax_merge
