// CPU kernels of the gradient ops: the fused backward of a merge (one pass that reads each task
// and the incoming gradient once, recomputes the masks from the saved thresholds and seed, and
// writes the task gradients once) and the backward of the stacked disjoint merge.
//
// Work is split into blocks of kGradChunksPerBlock chunks (weight_grad_sum.h); a block is handled
// by one thread, one tile of kGradLanes elements at a time, and leaves one partial sum per task
// weight. The partial sums are added in a fixed pairwise tree after the parallel loop, so the
// weight gradients do not depend on the number of threads.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/counter_rng.h"
#include "../common/keys.h"
#include "../common/merge_rule.h"
#include "../common/weight_grad_sum.h"
#include "../grad_ops.h"

namespace lorax_merge {
namespace cpu {
namespace {

constexpr int64_t kTile = kGradLanes;  // elements per step: one lane step of a chunk
constexpr int64_t kBlockElems = kGradChunk * kGradChunksPerBlock;
// Least work (task elements read) worth handing to another thread (as in the forward).
constexpr int64_t kMinParallelWork = 1 << 17;

// One merge's backward with everything resolved on the host.
struct PreparedGrad {
  std::vector<const void*> tasks;
  std::vector<void*> task_grads;  // empty: task gradients not wanted
  std::vector<double> weights;
  std::vector<MagnitudeThreshold> thresholds;  // per task, magnitude pruning only
  Pruning pruning = Pruning::kNone;            // kNone when nothing is pruned
  bool rescale = false;
  double density = 1.0;
  uint64_t seed = 0;
  uint64_t keep_bound = 0;
  int64_t index_offset = 0;
  const void* grad = nullptr;  // gradient of the merge's result
  at::ScalarType grad_dtype = at::kFloat;
  int64_t numel = 0;
  bool weight_grads = false;
  std::vector<double> block_sums;  // [task][block] partial weight gradients
  void (*run_blocks)(PreparedGrad&, int64_t, int64_t) = nullptr;

  int64_t num_tasks() const { return static_cast<int64_t>(tasks.size()); }
  int64_t num_blocks() const { return (numel + kBlockElems - 1) / kBlockElems; }
};

template <typename acc_t>
void load_grad_tile(const PreparedGrad& m, int64_t base, int64_t len, acc_t* __restrict__ g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, m.grad_dtype, "lorax_merge_grad_load", [&] {
        const scalar_t* __restrict__ src = static_cast<const scalar_t*>(m.grad) + base;
        for (int64_t j = 0; j < len; ++j) g[j] = static_cast<acc_t>(src[j]);
      });
}

// Keep bits (0/1) and pruned values of one task over one tile, as the forward computes them;
// the comparisons are in the key's own width with the tie cut relative to the tile, so the
// loops vectorise.
template <typename scalar_t, typename acc_t>
void prune_tile(const PreparedGrad& m, int64_t task, const scalar_t* __restrict__ x, int64_t base,
                int64_t len, acc_t density, uint8_t* __restrict__ kept, acc_t* __restrict__ v) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  const int64_t first = m.index_offset + base;  // flat index of x[0]
  if (m.pruning == Pruning::kMagnitude) {
    // Keep-nothing ({max key, cut 0}) narrows to {kNaN, 0}: nothing compares above it.
    const MagnitudeThreshold threshold = m.thresholds[task];
    const key_t key = threshold.key > KeyTraits<scalar_t>::kNaN ? KeyTraits<scalar_t>::kNaN
                                                                : static_cast<key_t>(threshold.key);
    const int32_t cut = static_cast<int32_t>(std::clamp<int64_t>(threshold.cut - first, 0, len));
    for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
      const key_t k = magnitude_key(x[j]);
      kept[j] = static_cast<uint8_t>((k > key) | ((k == key) & (j < cut)));
    }
  } else if (m.pruning == Pruning::kRandom) {
    // Words in pairs from the pair holding `first`; `shift` skips its low word when odd.
    alignas(64) uint32_t words[kTile + 2];
    const uint64_t stream_key = dare_stream_key(m.seed, static_cast<uint64_t>(task));
    const int64_t shift = first & 1;
    const uint64_t first_pair = static_cast<uint64_t>(first) >> 1;
    for (int64_t p = 0; 2 * p < len + shift; ++p) {
      const uint64_t bits = dare_pair_bits(stream_key, first_pair + static_cast<uint64_t>(p));
      words[2 * p] = static_cast<uint32_t>(bits);
      words[2 * p + 1] = static_cast<uint32_t>(bits >> 32);
    }
    const uint32_t bound = static_cast<uint32_t>(m.keep_bound);
    const uint32_t* __restrict__ word = words + shift;
    for (int64_t j = 0; j < len; ++j) kept[j] = static_cast<uint8_t>(word[j] < bound);
  } else {
    for (int64_t j = 0; j < len; ++j) kept[j] = 1;
  }
  const bool rescale = m.rescale && m.pruning == Pruning::kRandom;
  for (int64_t j = 0; j < len; ++j) {
    v[j] = pruned_value<scalar_t, acc_t>(static_cast<acc_t>(x[j]), kept[j] != 0, rescale, density);
  }
}

// The gradient of one task over one tile from its shares s (task_share), keep bits and pruned
// values: the task gradient (when wanted) and the weight-gradient terms added to the lanes.
template <typename scalar_t, typename acc_t>
void task_tile_gradients(const acc_t* __restrict__ s, const uint8_t* __restrict__ kept,
                         const acc_t* __restrict__ v, int64_t len, acc_t w, bool rescale,
                         acc_t density, scalar_t* __restrict__ dst, acc_t* __restrict__ lane) {
  if (dst != nullptr) {
    if (rescale) {
      for (int64_t j = 0; j < len; ++j) {
        dst[j] = task_gradient<scalar_t, acc_t>(s[j], w, kept[j] != 0, true, density);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        dst[j] = task_gradient<scalar_t, acc_t>(s[j], w, kept[j] != 0, false, density);
      }
    }
  }
  if (lane != nullptr) {
    for (int64_t j = 0; j < len; ++j) lane[j] += weight_gradient_term(s[j], v[j]);
  }
}

template <typename scalar_t, typename acc_t, SignElection E>
void run_grad_blocks(PreparedGrad& m, int64_t block_begin, int64_t block_end) {
  constexpr bool kElects = E != SignElection::kNone;
  const int64_t n = m.num_tasks();
  const acc_t density = static_cast<acc_t>(static_cast<typename OpMath<scalar_t>::type>(m.density));
  const bool rescale = m.rescale && m.pruning == Pruning::kRandom;
  const bool task_grads = !m.task_grads.empty();
  // An electing merge keeps every task's tile between its two passes.
  const int64_t tiles_kept = kElects ? n : 1;
  std::vector<acc_t> values_buffer(static_cast<size_t>(tiles_kept * kTile));
  std::vector<uint8_t> kept_buffer(static_cast<size_t>(tiles_kept * kTile));
  std::vector<acc_t> lanes(m.weight_grads ? static_cast<size_t>(n * kGradLanes) : 0);
  std::vector<double> chunk_sums(m.weight_grads ? static_cast<size_t>(n * kGradChunksPerBlock) : 0);
  alignas(64) acc_t g[kTile];
  alignas(64) acc_t share[kTile];
  alignas(64) acc_t s[kTile];
  alignas(64) acc_t positive[kTile];  // 1 where the elected sign is +1, else 0
  const int64_t chunks = grad_chunks(m.numel);

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t chunk_begin = block * kGradChunksPerBlock;
    const int64_t chunk_end = std::min(chunks, chunk_begin + kGradChunksPerBlock);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      for (int64_t step = 0; step < kGradLaneSteps; ++step) {
        const int64_t base = chunk * kGradChunk + step * kTile;
        const int64_t len = std::min(kTile, m.numel - base);
        if (len <= 0) break;  // the lanes of missing elements would add +0: no change
        load_grad_tile(m, base, len, g);
        if constexpr (kElects) {
          // First pass: every task's pruned values, the election and each element's share.
          alignas(64) acc_t score[kTile], pos_count[kTile], neg_count[kTile];
          for (int64_t j = 0; j < len; ++j) score[j] = pos_count[j] = neg_count[j] = acc_t(0);
          for (int64_t t = 0; t < n; ++t) {
            acc_t* __restrict__ v = values_buffer.data() + t * kTile;
            prune_tile<scalar_t, acc_t>(m, t, static_cast<const scalar_t*>(m.tasks[t]) + base, base,
                                        len, density, kept_buffer.data() + t * kTile, v);
            for (int64_t j = 0; j < len; ++j) {
              score[j] += election_term<acc_t, E>(v[j]);
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
          acc_t* __restrict__ v = values_buffer.data() + (kElects ? t * kTile : 0);
          uint8_t* __restrict__ kept = kept_buffer.data() + (kElects ? t * kTile : 0);
          const acc_t* shares = g;
          if constexpr (kElects) {
            for (int64_t j = 0; j < len; ++j) {
              // agrees_with_majority, in a form that vectorises
              const bool up = positive[j] > acc_t(0);
              s[j] = task_share(share[j], (up & (v[j] > acc_t(0))) | (!up & (v[j] < acc_t(0))));
            }
            shares = s;
          } else {
            prune_tile<scalar_t, acc_t>(m, t, static_cast<const scalar_t*>(m.tasks[t]) + base, base,
                                        len, density, kept, v);
          }
          task_tile_gradients<scalar_t, acc_t>(
              shares, kept, v, len, static_cast<acc_t>(m.weights[t]), rescale, density,
              task_grads ? static_cast<scalar_t*>(m.task_grads[t]) + base : nullptr,
              m.weight_grads ? lanes.data() + t * kGradLanes : nullptr);
        }
      }
      if (m.weight_grads) {
        for (int64_t t = 0; t < n; ++t) {
          chunk_sums[t * kGradChunksPerBlock + (chunk - chunk_begin)] =
              static_cast<double>(fold_lanes(lanes.data() + t * kGradLanes));
        }
      }
    }
    if (m.weight_grads) {
      for (int64_t t = 0; t < n; ++t) {
        m.block_sums[t * m.num_blocks() + block] =
            pairwise_tree_sum(chunk_sums.data() + t * kGradChunksPerBlock, chunk_end - chunk_begin);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
auto pick_grad_runner(SignElection election) {
  switch (election) {
    case SignElection::kTotal:
      return &run_grad_blocks<scalar_t, acc_t, SignElection::kTotal>;
    case SignElection::kFrequency:
      return &run_grad_blocks<scalar_t, acc_t, SignElection::kFrequency>;
    default:
      return &run_grad_blocks<scalar_t, acc_t, SignElection::kNone>;
  }
}

PreparedGrad prepare_grad(const MergeGradRequest& request) {
  const MergeRequest& req = request.merge;
  PreparedGrad m;
  m.numel = req.numel();
  m.grad = req.out.const_data_ptr();
  m.grad_dtype = req.out.scalar_type();
  m.weights = host_weights(req.weights);
  m.pruning = req.prunes() ? req.pruning : Pruning::kNone;
  m.rescale = req.rescale;
  m.density = req.density;
  m.seed = static_cast<uint64_t>(req.seed);
  m.keep_bound = dare_keep_bound(req.density);
  m.index_offset = req.index_offset;
  for (const at::Tensor& t : req.tasks) m.tasks.push_back(t.const_data_ptr());
  for (const at::Tensor& t : request.task_grads) m.task_grads.push_back(t.data_ptr());
  if (m.pruning == Pruning::kMagnitude) {
    const int64_t* t = req.thresholds.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < req.num_tasks(); ++i) {
      m.thresholds.push_back(MagnitudeThreshold{static_cast<uint64_t>(t[2 * i]), t[2 * i + 1]});
    }
  }
  m.weight_grads = request.weight_grads.defined();
  if (m.weight_grads) m.block_sums.assign(static_cast<size_t>(m.num_tasks() * m.num_blocks()), 0.0);
  const at::ScalarType task_dtype = req.tasks[0].scalar_type();
  const bool wide = accumulate_type(task_dtype, m.grad_dtype) == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, task_dtype, "lorax_merge_grad_prepare", [&] {
        m.run_blocks = wide ? pick_grad_runner<scalar_t, double>(req.election)
                            : pick_grad_runner<scalar_t, float>(req.election);
      });
  return m;
}

void merge_backward_batch(const std::vector<MergeGradRequest>& requests) {
  std::vector<PreparedGrad> merges;
  merges.reserve(requests.size());
  for (const MergeGradRequest& r : requests) merges.push_back(prepare_grad(r));
  // One parallel loop over the blocks of every merge, as in the forward.
  std::vector<int64_t> block_offsets(merges.size() + 1, 0);
  int64_t work = 0;
  for (size_t i = 0; i < merges.size(); ++i) {
    block_offsets[i + 1] = block_offsets[i] + merges[i].num_blocks();
    work += merges[i].numel * merges[i].num_tasks();
  }
  const int64_t blocks = block_offsets.back();
  const int64_t grain =
      std::max<int64_t>(1, kMinParallelWork * blocks / std::max<int64_t>(work, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    size_t i =
        static_cast<size_t>(std::upper_bound(block_offsets.begin(), block_offsets.end(), begin) -
                            block_offsets.begin() - 1);
    for (int64_t block = begin; block < end; ++i) {
      const int64_t stop = std::min(end, block_offsets[i + 1]);
      if (stop > block)
        merges[i].run_blocks(merges[i], block - block_offsets[i], stop - block_offsets[i]);
      block = std::max(block, stop);
    }
  });
  for (size_t i = 0; i < merges.size(); ++i) {
    PreparedGrad& m = merges[i];
    if (!m.weight_grads) continue;
    double* dst = requests[i].weight_grads.data_ptr<double>();
    for (int64_t t = 0; t < m.num_tasks(); ++t) {
      dst[t] = pairwise_tree_sum(m.block_sums.data() + t * m.num_blocks(), m.num_blocks());
    }
  }
}

template <typename scalar_t, typename acc_t>
void disjoint_merge_backward_kernel(const at::Tensor& grad, const at::Tensor& mask,
                                    at::Tensor& out) {
  const int64_t n = mask.size(0);
  const int64_t positions = grad.numel();
  const acc_t* g = grad.const_data_ptr<acc_t>();
  const bool* selected = mask.const_data_ptr<bool>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t tiles = (positions + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / (kTile * std::max<int64_t>(n, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t count[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t base = tile * kTile;
      const int64_t len = std::min(kTile, positions - base);
      for (int64_t j = 0; j < len; ++j) count[j] = acc_t(0);
      for (int64_t i = 0; i < n; ++i) {
        const bool* m = selected + i * positions + base;
        for (int64_t j = 0; j < len; ++j) count[j] += m[j] ? acc_t(1) : acc_t(0);
      }
      for (int64_t i = 0; i < n; ++i) {
        const bool* m = selected + i * positions + base;
        scalar_t* row = dst + i * positions + base;
        for (int64_t j = 0; j < len; ++j) {
          row[j] = disjoint_merge_gradient<scalar_t, acc_t>(g[base + j], count[j], m[j]);
        }
      }
    }
  });
}

}  // namespace

struct CpuGradKernels {
  static void merge_backward(const std::vector<MergeGradRequest>& requests) {
    merge_backward_batch(requests);
  }

  static void disjoint_merge_backward(const at::Tensor& grad, const at::Tensor& mask,
                                      at::Tensor& out) {
    if (out.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "lorax_merge_disjoint_grad", [&] {
          disjoint_merge_backward_kernel<scalar_t, typename OpMath<scalar_t>::type>(grad, mask,
                                                                                    out);
        });
  }
};

}  // namespace cpu

TORCH_LIBRARY_IMPL(lorax_merge, CPU, m) {
  register_grad_ops<cpu::CpuGradKernels>(m);
}

}  // namespace lorax_merge
