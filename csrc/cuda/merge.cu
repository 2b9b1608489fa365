// The fused merge kernel: one pass that reads every task tensor once, prunes (magnitude
// threshold or random mask), elects signs, weights and merges in registers, and writes the
// output once.
//
// Blocks map to (group, tile) through the group table (multi-tensor-apply style): a
// batch of merges of one task dtype is one launch. Each thread owns kElems consecutive
// elements, loaded with 16-byte (or narrower, aligned) vector accesses when every task
// pointer of the group allows it, element by element otherwise. Several tasks' chunks are
// loaded before the first is used, so a thread keeps several loads in flight.
#include <c10/cuda/CUDAException.h>

#include "../common/canonical_nan.h"
#include "../common/counter_rng.h"
#include "device_utils.cuh"

namespace lorax_merge {
namespace cuda {
namespace {

struct MergeParams {
  const unsigned char* table_device;
  int64_t groups_offset;
  int64_t tasks_offset;
  const MagnitudeThreshold* thresholds;
  double density;
  uint64_t keep_bound;
  int32_t num_groups;
  int32_t pruning;
  int32_t rescale;
  alignas(16) unsigned char table_inline[kInlineTableBytes];
};
static_assert(sizeof(MergeParams) <= kMaxKernelParamBytes, "the merge parameters fit in a launch");

template <typename scalar_t, typename acc_t>
struct MergeShape {
  static constexpr int kElems = sizeof(acc_t) == 8 ? 4 : 8;
  // Task chunks loaded before the first is used: 64 bytes of loads in flight per thread
  // when accumulating in float; fewer with double accumulators (register budget).
  static constexpr int kChunkBytes = kElems * static_cast<int>(sizeof(scalar_t));
  static constexpr int kAheadBytes = sizeof(acc_t) == 8 ? 16 : 64;
  static constexpr int kAhead = kAheadBytes / kChunkBytes > 1 ? kAheadBytes / kChunkBytes : 1;
  static_assert(kElems % 4 == 0, "a thread's elements cover whole groups of four random words");
};

// A task's magnitude threshold restricted to one thread's elements j0 .. j0 + n - 1, in the
// key's own width: keeps(key, i) == threshold.keeps(key, j0 + i).
template <typename scalar_t>
struct ThreadThreshold {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  key_t key;
  int32_t cut;  // elements i < cut may be kept on a key tie

  __device__ __forceinline__ ThreadThreshold(const MagnitudeThreshold& t, int64_t j0, int n) {
    key = narrow_threshold_key<scalar_t>(t);
    const int64_t rel = t.cut - j0;
    cut = rel <= 0 ? 0 : (rel >= n ? n : static_cast<int32_t>(rel));
  }
  __device__ __forceinline__ bool keeps(key_t k, int i) const {
    return k > key || (k == key && i < cut);
  }
};

// Writes one thread's results in the output dtype (one canonical NaN per dtype, as the CPU).
template <typename out_t, typename acc_t, int N>
__device__ __forceinline__ void store_result(void* out, int64_t j0, int64_t limit, bool vector,
                                             const acc_t (&r)[N]) {
  out_t v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = output_value<out_t>(r[i]);
  store_chunk<out_t, N>(static_cast<out_t*>(out), j0, limit, vector, v);
}

template <typename scalar_t, typename acc_t, SignElection E>
__global__ void __launch_bounds__(kMergeThreads, 2)
    fused_merge_kernel(const __grid_constant__ MergeParams p) {
  using Shape = MergeShape<scalar_t, acc_t>;
  constexpr int kElems = Shape::kElems;
  constexpr int kAhead = Shape::kAhead;
  using Accumulator = MergeAccumulator<acc_t, typename OpMath<scalar_t>::type, E>;

  const unsigned char* table = p.table_device != nullptr ? p.table_device : p.table_inline;
  const MergeGroup* groups = reinterpret_cast<const MergeGroup*>(table + p.groups_offset);
  const MergeTask* tasks = reinterpret_cast<const MergeTask*>(table + p.tasks_offset);
  const int64_t block = blockIdx.x;
  const int g = find_segment(groups, p.num_groups, block,
                             [](const MergeGroup& group) { return group.block_begin; });
  const MergeGroup group = groups[g];
  // j0: this thread's first element in the group's tensors; also its flat index, which the
  // random words and the magnitude tie cut are keyed by (even, as the random words come in
  // pairs).
  const int64_t j0 = (block - group.block_begin) * (kMergeThreads * kElems) +
                     static_cast<int64_t>(threadIdx.x) * kElems;
  if (j0 >= group.numel) return;
  const int64_t first_index = group.index_offset + j0;  // in the sliced tensors
  const bool full = j0 + kElems <= group.numel;
  const bool vector_loads = full && (group.flags & kVectorLoads) != 0;
  const bool vector_stores = full && (group.flags & kVectorStores) != 0;

  const Pruning pruning = static_cast<Pruning>(p.pruning);
  const bool rescale = p.rescale != 0;
  const acc_t density = static_cast<acc_t>(static_cast<typename OpMath<scalar_t>::type>(p.density));

  Accumulator acc[kElems];
  for (int t0 = 0; t0 < group.num_tasks; t0 += kAhead) {
    scalar_t raw[kAhead][kElems];
    acc_t weight[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (t0 + u < group.num_tasks) {
        const MergeTask task = tasks[group.first_task + t0 + u];
        load_chunk<scalar_t, kElems>(static_cast<const scalar_t*>(task.data), j0, group.numel,
                                     vector_loads, raw[u]);
        weight[u] =
            static_cast<acc_t>(task.weight_device != nullptr ? *task.weight_device : task.weight);
      }
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int t = t0 + u;
      if (t >= group.num_tasks) break;
      const acc_t w = weight[u];
      if (pruning == Pruning::kNone) {
#pragma unroll
        for (int i = 0; i < kElems; ++i) acc[i].add(static_cast<acc_t>(raw[u][i]), w);
      } else if (pruning == Pruning::kMagnitude) {
        // Magnitude pruning never rescales.
        const ThreadThreshold<scalar_t> threshold(p.thresholds[group.first_task + t], first_index,
                                                  kElems);
#pragma unroll
        for (int i = 0; i < kElems; ++i) {
          const bool kept = threshold.keeps(magnitude_key(raw[u][i]), i);
          acc[i].add(
              pruned_value<scalar_t, acc_t>(static_cast<acc_t>(raw[u][i]), kept, false, density),
              w);
        }
      } else {
        // One 64-bit draw gives the words of two consecutive elements. j0 is even; a slice
        // at an odd offset (the same for the whole group) starts on a pair's high word.
        const uint64_t key =
            dare_stream_key(group.seed, static_cast<uint64_t>(group.first_stream + t));
        const uint32_t bound = static_cast<uint32_t>(p.keep_bound);
        const uint64_t first_pair = static_cast<uint64_t>(first_index >> 1);
        uint32_t words[kElems];
        if ((first_index & 1) == 0) {
#pragma unroll
          for (int q = 0; q < kElems / 2; ++q) {
            const uint64_t bits = dare_pair_bits(key, first_pair + q);
            words[2 * q] = static_cast<uint32_t>(bits);
            words[2 * q + 1] = static_cast<uint32_t>(bits >> 32);
          }
        } else {
          uint64_t bits = dare_pair_bits(key, first_pair);
#pragma unroll
          for (int q = 0; q < kElems / 2; ++q) {
            const uint64_t next = dare_pair_bits(key, first_pair + q + 1);
            words[2 * q] = static_cast<uint32_t>(bits >> 32);
            words[2 * q + 1] = static_cast<uint32_t>(next);
            bits = next;
          }
        }
#pragma unroll
        for (int i = 0; i < kElems; ++i) {
          acc[i].add(pruned_value<scalar_t, acc_t>(static_cast<acc_t>(raw[u][i]), words[i] < bound,
                                                   rescale, density),
                     w);
        }
      }
    }
  }

  acc_t result[kElems];
#pragma unroll
  for (int i = 0; i < kElems; ++i) result[i] = acc[i].result();
  LM_DISPATCH_DTYPE(static_cast<ElementType>(group.out_dtype), out_t, [&] {
    store_result<out_t>(group.out, j0, group.numel, vector_stores, result);
  });
}

template <typename scalar_t, typename acc_t>
void launch_typed(const MergeLaunch& launch, const MergeParams& params, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(launch.num_blocks);
  LM_DISPATCH_ELECTION(launch.election, E, [&] {
    fused_merge_kernel<scalar_t, acc_t, E><<<blocks, kMergeThreads, 0, stream>>>(params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_merge(const MergeLaunch& launch, cudaStream_t stream) {
  if (launch.num_blocks == 0) return;
  MergeParams params;
  copy_shared_params(launch, params);
  params.thresholds = launch.thresholds;
  with_task_and_acc_types(launch.task_dtype, launch.wide_acc, [&](auto task, auto acc) {
    launch_typed<decltype(task), decltype(acc)>(launch, params, stream);
  });
}

}  // namespace cuda
}  // namespace lorax_merge
