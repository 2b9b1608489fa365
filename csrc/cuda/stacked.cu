// Primitives on stacked task tensors [rows, positions]: the majority sign mask and the
// disjoint merge. One thread per position walks the rows in order, as the CPU does, so the
// sums are formed in the same order.
#include <c10/cuda/CUDAException.h>

#include "../common/canonical_nan.h"
#include "device_utils.cuh"

namespace lorax_merge {
namespace cuda {
namespace {

constexpr int kStackedThreads = 256;

unsigned int stacked_blocks(int64_t positions) {
  const int64_t blocks = (positions + kStackedThreads - 1) / kStackedThreads;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

template <typename scalar_t, SignElection E>
__global__ void __launch_bounds__(kStackedThreads)
    sign_mask_kernel(const scalar_t* __restrict__ x, bool* __restrict__ mask, int64_t rows,
                     int64_t positions) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < positions;
       j += stride) {
    acc_t score = acc_t(0);
    for (int64_t i = 0; i < rows; ++i)
      score += election_term<acc_t, E>(static_cast<acc_t>(x[i * positions + j]));
    const bool positive = majority_is_positive(score);
    for (int64_t i = 0; i < rows; ++i) {
      mask[i * positions + j] =
          agrees_with_majority(static_cast<acc_t>(x[i * positions + j]), positive);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kStackedThreads)
    disjoint_merge_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                          typename OpMath<scalar_t>::type* __restrict__ out, int64_t rows,
                          int64_t positions) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < positions;
       j += stride) {
    MaskedMean<acc_t> mean;
    for (int64_t i = 0; i < rows; ++i) {
      mean.add(static_cast<acc_t>(x[i * positions + j]), mask[i * positions + j]);
    }
    out[j] = output_value<acc_t>(mean.result());
  }
}

}  // namespace

void launch_sign_mask(ElementType dtype, SignElection election, const void* stacked, bool* mask,
                      int64_t rows, int64_t positions, cudaStream_t stream) {
  if (positions == 0 || rows == 0) return;
  TORCH_CHECK(election != SignElection::kNone, "lorax_merge: a sign mask needs a sign method");
  LM_DISPATCH_DTYPE(dtype, scalar_t, [&] {
    LM_DISPATCH_ELECTION(election, E, [&] {
      if constexpr (E != SignElection::kNone) {
        sign_mask_kernel<scalar_t, E><<<stacked_blocks(positions), kStackedThreads, 0, stream>>>(
            static_cast<const scalar_t*>(stacked), mask, rows, positions);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_disjoint_merge(ElementType dtype, const void* stacked, const bool* mask, void* out,
                           int64_t rows, int64_t positions, cudaStream_t stream) {
  if (positions == 0) return;
  LM_DISPATCH_DTYPE(dtype, scalar_t, [&] {
    using acc_t = typename OpMath<scalar_t>::type;
    disjoint_merge_kernel<scalar_t><<<stacked_blocks(positions), kStackedThreads, 0, stream>>>(
        static_cast<const scalar_t*>(stacked), mask, static_cast<acc_t*>(out), rows, positions);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lorax_merge
