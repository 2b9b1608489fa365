// The fused merge backward on the GPU, and the backward of the stacked disjoint merge.
//
// One block of kGradLanes threads per chunk of kGradChunk elements: thread l owns elements
// l, l + kGradLanes, ... of the chunk (coalesced loads), recomputes every task's keep bit and
// pruned value from the saved thresholds or the seed, the elected sign and count, writes the
// task gradients and adds its weight-gradient terms in order; the block folds the lane sums by
// halving, as the CPU does (weight_grad_sum.h), and a second launch adds the chunk sums in the
// fixed pairwise tree. No atomics: the bits do not depend on scheduling.

#include <c10/cuda/CUDAException.h>

#include "../common/canonical_nan.h"
#include "../common/counter_rng.h"
#include "device_utils.cuh"
#include "grad_launch.h"

namespace lorax_merge {
namespace cuda {
namespace {

constexpr int kTreeThreads = 1024;

struct GradParams {
  const unsigned char* table_device;
  int64_t groups_offset;
  int64_t tasks_offset;
  double* chunk_sums;
  double density;
  uint64_t keep_bound;
  int64_t index_offset;
  int32_t num_groups;
  int32_t pruning;
  int32_t rescale;
  alignas(16) unsigned char table_inline[kInlineTableBytes];
};
// The tree kernel takes one more 8-byte argument.
static_assert(sizeof(GradParams) + sizeof(int64_t) <= kMaxKernelParamBytes,
              "the gradient parameters fit in a launch");

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* p, int32_t dtype, int64_t j) {
  acc_t value = acc_t(0);
  LM_DISPATCH_DTYPE(static_cast<ElementType>(dtype), grad_t,
                    [&] { value = static_cast<acc_t>(static_cast<const grad_t*>(p)[j]); });
  return value;
}

template <typename scalar_t>
struct TaskKeep {
  Pruning pruning;
  MagnitudeThreshold threshold;
  uint64_t stream_key;
  uint32_t bound;

  __device__ __forceinline__ TaskKeep(const GradParams& p, const GradTask& task, uint64_t seed,
                                      int32_t stream) {
    pruning = static_cast<Pruning>(p.pruning);
    threshold = pruning == Pruning::kMagnitude ? *task.threshold : keep_everything_threshold(0);
    threshold.key = narrow_threshold_key<scalar_t>(threshold);  // compared as the CPU does
    stream_key =
        pruning == Pruning::kRandom ? dare_stream_key(seed, static_cast<uint64_t>(stream)) : 0;
    bound = static_cast<uint32_t>(p.keep_bound);
  }
  // Whether the element at flat index `index` with value x is kept.
  __device__ __forceinline__ bool keeps(scalar_t x, int64_t index) const {
    if (pruning == Pruning::kMagnitude) {
      return threshold.keeps(static_cast<uint64_t>(magnitude_key(x)), index);
    }
    if (pruning == Pruning::kRandom) {
      const uint64_t bits = dare_pair_bits(stream_key, static_cast<uint64_t>(index) >> 1);
      return static_cast<uint32_t>(bits >> (32 * (index & 1))) < bound;
    }
    return true;
  }
};

template <typename scalar_t, typename acc_t, SignElection E>
__global__ void __launch_bounds__(kGradLanes)
    merge_backward_kernel(const __grid_constant__ GradParams p) {
  constexpr bool kElects = E != SignElection::kNone;
  __shared__ acc_t lanes[kGradLanes];

  const unsigned char* table = p.table_device != nullptr ? p.table_device : p.table_inline;
  const GradGroup* groups = reinterpret_cast<const GradGroup*>(table + p.groups_offset);
  const GradTask* tasks = reinterpret_cast<const GradTask*>(table + p.tasks_offset);
  const int64_t block = blockIdx.x;
  const int gi = find_segment(groups, p.num_groups, block,
                              [](const GradGroup& group) { return group.block_begin; });
  const GradGroup group = groups[gi];
  const int64_t chunk = block - group.block_begin;
  const int64_t first = chunk * kGradChunk + threadIdx.x;  // this thread's first element
  const bool rescale = p.rescale != 0 && static_cast<Pruning>(p.pruning) == Pruning::kRandom;
  const acc_t density = static_cast<acc_t>(static_cast<typename OpMath<scalar_t>::type>(p.density));

  acc_t g[kGradLaneSteps];
#pragma unroll
  for (int k = 0; k < kGradLaneSteps; ++k) {
    const int64_t j = first + k * kGradLanes;
    g[k] = j < group.numel ? load_as<acc_t>(group.grad, group.grad_dtype, j) : acc_t(0);
  }

  acc_t share[kGradLaneSteps];
  uint32_t positive = 0;  // bit k: the elected sign of element k is +1
  if constexpr (kElects) {
    using vote_t = typename OpMath<scalar_t>::type;
    vote_t score[kGradLaneSteps];
    acc_t pos_count[kGradLaneSteps], neg_count[kGradLaneSteps];
#pragma unroll
    for (int k = 0; k < kGradLaneSteps; ++k) {
      score[k] = vote_t(0);
      pos_count[k] = neg_count[k] = acc_t(0);
    }
    for (int t = 0; t < group.num_tasks; ++t) {
      const GradTask task = tasks[group.first_task + t];
      const TaskKeep<scalar_t> keep(p, task, group.seed, t);
      const scalar_t* x = static_cast<const scalar_t*>(task.data);
#pragma unroll
      for (int k = 0; k < kGradLaneSteps; ++k) {
        const int64_t j = first + k * kGradLanes;
        if (j < group.numel) {
          const scalar_t xj = x[j];
          const acc_t v = pruned_value<scalar_t, acc_t>(
              static_cast<acc_t>(xj), keep.keeps(xj, p.index_offset + j), rescale, density);
          add_vote<acc_t, vote_t, E>(score[k], v);
          pos_count[k] += v > acc_t(0) ? acc_t(1) : acc_t(0);
          neg_count[k] += v < acc_t(0) ? acc_t(1) : acc_t(0);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kGradLaneSteps; ++k) {
      const bool up = majority_is_positive(score[k]);
      positive |= static_cast<uint32_t>(up) << k;
      share[k] = elected_share(g[k], up ? pos_count[k] : neg_count[k]);
    }
  }

  const int64_t chunks = grad_chunks(group.numel);
  for (int t = 0; t < group.num_tasks; ++t) {
    const GradTask task = tasks[group.first_task + t];
    const TaskKeep<scalar_t> keep(p, task, group.seed, t);
    const scalar_t* x = static_cast<const scalar_t*>(task.data);
    scalar_t* dx = static_cast<scalar_t*>(task.grad);
    const acc_t w =
        static_cast<acc_t>(task.weight_device != nullptr ? *task.weight_device : task.weight);
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < kGradLaneSteps; ++k) {
      const int64_t j = first + k * kGradLanes;
      if (j < group.numel) {
        const scalar_t xj = x[j];
        const bool kept = keep.keeps(xj, p.index_offset + j);
        const acc_t v =
            pruned_value<scalar_t, acc_t>(static_cast<acc_t>(xj), kept, rescale, density);
        acc_t s = g[k];
        if constexpr (kElects) {
          s = task_share(share[k], agrees_with_majority(v, ((positive >> k) & 1u) != 0));
        }
        if (dx != nullptr) {
          acc_t q = static_cast<acc_t>(static_cast<scalar_t>(value_gradient(s, w)));
          if (rescale) q = static_cast<acc_t>(static_cast<scalar_t>(rescaled_gradient(q, density)));
          dx[j] = output_value<scalar_t>(masked_gradient(q, kept));
        }
        sum += weight_gradient_term(s, v);
      }
    }
    if (p.chunk_sums != nullptr) {
      lanes[threadIdx.x] = sum;
      __syncthreads();
      for (int s = kGradLanes / 2; s >= 1; s /= 2) {
        if (threadIdx.x < s) lanes[threadIdx.x] += lanes[threadIdx.x + s];
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        p.chunk_sums[group.sums_begin + t * chunks + chunk] = static_cast<double>(lanes[0]);
      }
      __syncthreads();  // lanes[0] is read before the next task overwrites it
    }
  }
}

// Adds each task's chunk sums in the pairwise tree: one block per group, level by level between
// the two halves of the scratch (a level reads one half and writes the other).
__global__ void __launch_bounds__(kTreeThreads)
    weight_grad_tree_kernel(const __grid_constant__ GradParams p, int64_t total_slots) {
  const unsigned char* table = p.table_device != nullptr ? p.table_device : p.table_inline;
  const GradGroup group = reinterpret_cast<const GradGroup*>(table + p.groups_offset)[blockIdx.x];
  const GradTask* tasks = reinterpret_cast<const GradTask*>(table + p.tasks_offset);
  const int64_t chunks = grad_chunks(group.numel);
  for (int t = 0; t < group.num_tasks; ++t) {
    double* src = p.chunk_sums + group.sums_begin + t * chunks;
    double* dst = src + total_slots;
    int64_t n = chunks;
    while (n > 1) {
      const int64_t pairs = n / 2;
      for (int64_t k = threadIdx.x; k < pairs; k += kTreeThreads)
        dst[k] = src[2 * k] + src[2 * k + 1];
      if (n % 2 != 0 && threadIdx.x == 0) dst[pairs] = src[n - 1];
      __syncthreads();
      double* swap = src;
      src = dst;
      dst = swap;
      n = (n + 1) / 2;
    }
    if (threadIdx.x == 0) {
      *tasks[group.first_task + t].weight_grad = n == 0 ? 0.0 : output_value<double>(src[0]);
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
void launch_typed(const GradLaunch& launch, const GradParams& params, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(launch.num_blocks);
  LM_DISPATCH_ELECTION(launch.election, E, [&] {
    merge_backward_kernel<scalar_t, acc_t, E><<<blocks, kGradLanes, 0, stream>>>(params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    disjoint_merge_backward_kernel(const typename OpMath<scalar_t>::type* __restrict__ grad,
                                   const bool* __restrict__ mask, scalar_t* __restrict__ out,
                                   int64_t rows, int64_t positions) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < positions;
       j += stride) {
    acc_t count = acc_t(0);
    for (int64_t i = 0; i < rows; ++i) count += mask[i * positions + j] ? acc_t(1) : acc_t(0);
    // The share rounded to the stacked dtype, as autograd rounds the upstream expression's.
    const acc_t share = static_cast<acc_t>(static_cast<scalar_t>(elected_share(grad[j], count)));
    for (int64_t i = 0; i < rows; ++i) {
      out[i * positions + j] = output_value<scalar_t>(task_share(share, mask[i * positions + j]));
    }
  }
}

template <typename scalar_t>
void disjoint_backward_typed(const void* grad, const bool* mask, void* out, int64_t rows,
                             int64_t positions, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t wanted = (positions + 255) / 256;
  const unsigned int blocks = static_cast<unsigned int>(wanted < 65535 * 16 ? wanted : 65535 * 16);
  disjoint_merge_backward_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
      static_cast<const acc_t*>(grad), mask, static_cast<scalar_t*>(out), rows, positions);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_merge_backward(const GradLaunch& launch, cudaStream_t stream) {
  if (launch.num_blocks == 0) return;
  GradParams params;
  copy_shared_params(launch, params);
  params.chunk_sums = launch.chunk_sums;
  params.index_offset = launch.index_offset;
  with_task_and_acc_types(launch.task_dtype, launch.wide_acc, [&](auto task, auto acc) {
    launch_typed<decltype(task), decltype(acc)>(launch, params, stream);
  });
  if (launch.chunk_sums != nullptr) {
    weight_grad_tree_kernel<<<static_cast<unsigned int>(launch.num_groups), kTreeThreads, 0,
                              stream>>>(params, launch.total_chunk_slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void launch_disjoint_merge_backward(ElementType dtype, const void* grad, const bool* mask,
                                    void* out, int64_t rows, int64_t positions,
                                    cudaStream_t stream) {
  if (positions == 0 || rows == 0) return;
  LM_DISPATCH_DTYPE(dtype, scalar_t, [&] {
    disjoint_backward_typed<scalar_t>(grad, mask, out, rows, positions, stream);
  });
}

}  // namespace cuda
}  // namespace lorax_merge
