// CUDA kernel of lora_delta_out: one thread per delta entry, each running the shared rule
// (common/lora_delta_rule.h) with the build's --fmad=false, so entries are bit-identical to
// the CPU kernel's. Threads of a block share a row (B's row is a broadcast load) and read
// consecutive columns of A (coalesced).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/lora_delta_rule.h"
#include "../lora_delta.h"

namespace lorax_merge {
namespace cuda {
namespace {

constexpr int kDeltaThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDeltaThreads)
    lora_delta_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t rank, int64_t k,
                      int64_t row_begin, int64_t column_blocks, T scale, T* __restrict__ out) {
  const int64_t block = blockIdx.x;
  const int64_t i = block / column_blocks;
  const int64_t j = (block % column_blocks) * kDeltaThreads + threadIdx.x;
  if (j >= k) return;
  out[i * k + j] = lora_delta_entry<T>(b + (row_begin + i) * rank, a, rank, k, j, scale);
}

void lora_delta_out(const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                    int64_t row_begin, const at::Tensor& out) {
  check_lora_delta(lora_a, lora_b, row_begin, out);
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();
  const int64_t k = a.size(1);
  const int64_t column_blocks = (k + kDeltaThreads - 1) / kDeltaThreads;
  const int64_t blocks = out.size(0) * column_blocks;
  TORCH_CHECK_VALUE(blocks <= 0x7FFFFFFF, "lorax_merge: too many rows for one delta launch");
  const unsigned int grid = static_cast<unsigned int>(blocks);
  if (a.scalar_type() == at::kDouble) {
    lora_delta_kernel<double><<<grid, kDeltaThreads, 0, stream>>>(
        a.const_data_ptr<double>(), b.const_data_ptr<double>(), a.size(0), k, row_begin,
        column_blocks, scale, const_cast<at::Tensor&>(out).data_ptr<double>());
  } else {
    lora_delta_kernel<float><<<grid, kDeltaThreads, 0, stream>>>(
        a.const_data_ptr<float>(), b.const_data_ptr<float>(), a.size(0), k, row_begin,
        column_blocks, static_cast<float>(scale), const_cast<at::Tensor&>(out).data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lorax_merge, CUDA, m) {
  m.impl("lora_delta_out", &cuda::lora_delta_out);
}

}  // namespace lorax_merge
