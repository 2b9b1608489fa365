// Interface between the host side of the CUDA gradient ops (merge_grad_cuda.cpp) and their
// kernels (merge_grad.cu): descriptor structs and launchers, as launch.h for the forward.
//
// A merge backward of a batch of one task dtype is one launch with one block per chunk
// (kGradChunk elements, weight_grad_sum.h) of every group, then, when the weight gradients are
// wanted, one launch that adds each task's chunk sums in the fixed pairwise tree.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/keys.h"
#include "../common/merge_rule.h"
#include "../common/weight_grad_sum.h"
#include "launch.h"

namespace lorax_merge {
namespace cuda {

struct GradGroup {
  const void* grad;  // gradient of the group's result, `grad_dtype`
  int64_t numel;
  uint64_t seed;
  int64_t block_begin;  // first global block of this group (one block per chunk)
  int64_t sums_begin;   // chunk-sum slot of (task 0, chunk 0); task t starts t * chunks later
  int32_t first_task;   // index of the group's first task in the task table
  int32_t num_tasks;
  int32_t grad_dtype;  // ElementType
  int32_t unused;
};

struct GradTask {
  const void* data;
  void* grad;                           // the task's gradient, or nullptr: not wanted
  const MagnitudeThreshold* threshold;  // on the device; magnitude pruning only
  const double* weight_device;          // the weight as a double on the device, or nullptr
  double weight;                        // the weight when weight_device is nullptr
  double* weight_grad;                  // the weight's gradient (device), or nullptr
};

struct GradLaunch {
  ElementType task_dtype = ElementType::kFloat;
  bool wide_acc = false;
  SignElection election = SignElection::kNone;
  Pruning pruning = Pruning::kNone;  // kNone when nothing is pruned
  int32_t rescale = 0;
  double density = 1.0;
  uint64_t keep_bound = 0;
  int64_t index_offset = 0;       // flat index of element 0 (masks and tie cuts)
  double* chunk_sums = nullptr;   // 2 * total_chunk_slots doubles on the device; null: no weight
                                  // gradients
  int64_t total_chunk_slots = 0;  // sum over the tasks of grad_chunks(numel)
  int32_t num_groups = 0;
  int64_t num_blocks = 0;
  const unsigned char* table_device = nullptr;  // nullptr: the table is in table_inline
  int64_t groups_offset = 0;
  int64_t tasks_offset = 0;
  alignas(16) unsigned char table_inline[kInlineTableBytes];
};

void launch_merge_backward(const GradLaunch& launch, cudaStream_t stream);

// Gradient of disjoint_merge w.r.t. the stacked tensor [rows, positions]; `grad` has the
// accumulate dtype (float, double for double input), `out` the stacked dtype.
void launch_disjoint_merge_backward(ElementType dtype, const void* grad, const bool* mask,
                                    void* out, int64_t rows, int64_t positions,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace lorax_merge
