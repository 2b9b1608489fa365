// CPU gradient ops: the host side of the backward kernels (kernels/merge_grad_tiles.h). It
// checks nothing (grad_ops.h has), resolves each merge's backward into a TileGrad, spreads
// its blocks over threads and adds the chunks' weight-gradient sums in the fixed pairwise
// tree of common/weight_grad_sum.h, so the weight gradients do not depend on the number of
// threads. The loops over the data are the kernels of the capability level in use.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/canonical_nan.h"
#include "../common/counter_rng.h"
#include "../common/weight_grad_sum.h"
#include "../grad_ops.h"
#include "capability.h"
#include "host_common.h"
#include "kernel_api.h"

namespace lorax_merge {
namespace cpu {
namespace {

constexpr int64_t kScratchAlign = 64;

// One merge's backward with everything resolved on the host; `tiles` points into the vectors.
struct PreparedGrad {
  std::vector<const void*> tasks;
  std::vector<void*> task_grads;
  std::vector<double> weights;
  std::vector<MagnitudeThreshold> thresholds;
  std::vector<double> chunk_sums;  // [task][chunk]
  TileGrad tiles;
};

void prepare_grad(const MergeGradRequest& request, PreparedGrad& m) {
  const MergeRequest& req = request.merge;
  for (const at::Tensor& t : req.tasks) m.tasks.push_back(t.const_data_ptr());
  for (const at::Tensor& t : request.task_grads) m.task_grads.push_back(t.data_ptr());
  m.weights = host_weights(req.weights);
  TileGrad& tiles = m.tiles;
  tiles.num_tasks = req.num_tasks();
  tiles.numel = req.numel();
  tiles.task_type = element_type(req.tasks[0].scalar_type());
  tiles.grad_type = element_type(req.out.scalar_type());
  tiles.wide = accumulate_type(req.tasks[0].scalar_type(), req.out.scalar_type()) == at::kDouble;
  tiles.election = req.election;
  tiles.pruning = req.prunes() ? req.pruning : Pruning::kNone;
  tiles.rescale = req.rescale;
  tiles.density = req.density;
  tiles.seed = static_cast<uint64_t>(req.seed);
  tiles.keep_bound =
      tiles.pruning == Pruning::kRandom ? static_cast<uint32_t>(dare_keep_bound(req.density)) : 0;
  tiles.index_offset = req.index_offset;
  tiles.grad = req.out.const_data_ptr();
  if (tiles.pruning == Pruning::kMagnitude) {
    const int64_t* t = req.thresholds.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < req.num_tasks(); ++i) {
      m.thresholds.push_back(MagnitudeThreshold{static_cast<uint64_t>(t[2 * i]), t[2 * i + 1]});
    }
  }
  if (request.weight_grads.defined()) {
    m.chunk_sums.assign(static_cast<size_t>(tiles.num_tasks * grad_chunks(tiles.numel)), 0.0);
  }
  tiles.tasks = m.tasks.data();
  tiles.task_grads = m.task_grads.empty() ? nullptr : m.task_grads.data();
  tiles.weights = m.weights.data();
  tiles.thresholds = m.thresholds.empty() ? nullptr : m.thresholds.data();
  tiles.chunk_sums = request.weight_grads.defined() ? m.chunk_sums.data() : nullptr;
}

void merge_backward_batch(const std::vector<MergeGradRequest>& requests) {
  std::vector<PreparedGrad> merges(requests.size());  // not moved after prepare: `tiles` points in
  for (size_t i = 0; i < requests.size(); ++i) prepare_grad(requests[i], merges[i]);
  // One parallel loop over the blocks of every merge, as in the forward.
  std::vector<int64_t> block_offsets(merges.size() + 1, 0);
  int64_t work = 0;
  int64_t most_tasks = 0;
  for (size_t i = 0; i < merges.size(); ++i) {
    const TileGrad& m = merges[i].tiles;
    block_offsets[i + 1] = block_offsets[i] + m.num_blocks();
    work += m.numel * m.num_tasks;
    most_tasks = std::max(most_tasks, m.num_tasks);
  }
  const int64_t blocks = block_offsets.back();
  const int64_t grain =
      std::max<int64_t>(1, kMinParallelWork * blocks / std::max<int64_t>(work, 1));
  const GradLevelKernels& kernels = active_grad_kernels();
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<unsigned char> scratch(
        static_cast<size_t>(grad_scratch_bytes(most_tasks) + kScratchAlign));
    void* aligned = scratch.data() +
                    (kScratchAlign - reinterpret_cast<uintptr_t>(scratch.data()) % kScratchAlign) %
                        kScratchAlign;
    size_t i =
        static_cast<size_t>(std::upper_bound(block_offsets.begin(), block_offsets.end(), begin) -
                            block_offsets.begin() - 1);
    for (int64_t block = begin; block < end; ++i) {
      const int64_t stop = std::min(end, block_offsets[i + 1]);
      if (stop > block) {
        kernels.merge_grad_blocks(merges[i].tiles, block - block_offsets[i],
                                  stop - block_offsets[i], aligned);
      }
      block = std::max(block, stop);
    }
  });
  for (size_t i = 0; i < merges.size(); ++i) {
    PreparedGrad& m = merges[i];
    if (!requests[i].weight_grads.defined()) continue;
    double* dst = requests[i].weight_grads.data_ptr<double>();
    const int64_t per_task = grad_chunks(m.tiles.numel);
    for (int64_t t = 0; t < m.tiles.num_tasks; ++t) {  // summed in place
      dst[t] =
          output_value<double>(pairwise_tree_sum(m.chunk_sums.data() + t * per_task, per_task));
    }
  }
}

}  // namespace

struct CpuGradKernels {
  static void merge_backward(const std::vector<MergeGradRequest>& requests) {
    merge_backward_batch(requests);
  }

  static void disjoint_merge_backward(const at::Tensor& grad, const at::Tensor& mask,
                                      at::Tensor& out) {
    if (out.numel() == 0) return;
    const int64_t n = mask.size(0);
    const int64_t positions = grad.numel();
    const ElementType type = element_type(out.scalar_type());
    const void* g = grad.const_data_ptr();
    const bool* m = mask.const_data_ptr<bool>();
    void* dst = out.data_ptr();
    const GradLevelKernels& kernels = active_grad_kernels();
    const int64_t grain = std::max<int64_t>(kTile, kMinParallelWork / std::max<int64_t>(n, 1));
    at::parallel_for(0, positions, grain, [&](int64_t begin, int64_t end) {
      kernels.disjoint_merge_grad(type, g, m, n, positions, begin, end, dst);
    });
  }
};

}  // namespace cpu

TORCH_LIBRARY_IMPL(lorax_merge, CPU, m) {
  register_grad_ops<cpu::CpuGradKernels>(m);
}

}  // namespace lorax_merge
