// The gradient ops' bodies, written once for every device (as device_ops.h for the forward ops).
// A device provides a `GradKernels` type with
//   static void merge_backward(const std::vector<MergeGradRequest>&);
//   static void disjoint_merge_backward(const at::Tensor& grad, const at::Tensor& mask,
//                                       at::Tensor& out);
// and calls register_grad_ops<GradKernels>(m) from a TORCH_LIBRARY_IMPL block.
//
// The gradient is the upstream expression's, with the pruning masks, DARE masks and elected signs
// held constant (merge_rule.h, "Gradients"). A merge's backward recomputes its masks from the
// saved magnitude thresholds and seed: no mask is saved, and a backward needs the gradients plus
// a small scratch.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "merge_request.h"

namespace lorax_merge {

// The backward of one merge.
struct MergeGradRequest {
  MergeRequest merge;                  // the merge; merge.out holds the gradient of its result
  std::vector<at::Tensor> task_grads;  // contiguous, one per task, written; empty: not wanted
  at::Tensor weight_grads;             // [num_tasks] float64, written; undefined: not wanted
};

// The backward of a batch of merges (one group each, as merge_many's), with its outputs.
struct MergeGradBatch {
  std::vector<MergeGradRequest> requests;
  std::vector<at::Tensor> task_grads;  // every task's gradient, in order; empty: not wanted
  at::Tensor weight_grads;  // [total tasks] float64 on the tasks' device; [0]: not wanted
};

// Checks the arguments (as make_group_requests does for the forward; `grads` holds the gradient
// of each group's result) and allocates the outputs. `thresholds` ([total tasks, 2] int64 on
// the tasks' device, as magnitude_thresholds gives) is required when the merges prune by
// magnitude; element j of the tasks is flat index index_offset + j (as in merge_slice_out).
MergeGradBatch make_grad_batch(at::TensorList grads, at::TensorList tasks,
                               at::IntArrayRef group_sizes, const at::Tensor& weights,
                               c10::string_view pruning, c10::string_view election, double density,
                               bool rescale, at::IntArrayRef seeds, int64_t index_offset,
                               const std::optional<at::Tensor>& thresholds, bool tasks_need_grad,
                               bool weights_need_grad);

// disjoint_merge_backward's output: the mask's shape and device, `dtype` (the stacked tensor's).
at::Tensor new_disjoint_merge_grad(const at::Tensor& grad, const at::Tensor& mask,
                                   at::ScalarType dtype);

template <typename GradKernels>
struct GradOps {
  static std::tuple<std::vector<at::Tensor>, at::Tensor> merge_backward(
      at::TensorList grads, at::TensorList tasks, at::IntArrayRef group_sizes,
      const at::Tensor& weights, c10::string_view pruning, c10::string_view election,
      double density, bool rescale, at::IntArrayRef seeds, int64_t index_offset,
      const std::optional<at::Tensor>& thresholds, bool tasks_need_grad, bool weights_need_grad) {
    MergeGradBatch batch =
        make_grad_batch(grads, tasks, group_sizes, weights, pruning, election, density, rescale,
                        seeds, index_offset, thresholds, tasks_need_grad, weights_need_grad);
    if (!batch.requests.empty()) GradKernels::merge_backward(batch.requests);
    return {std::move(batch.task_grads), std::move(batch.weight_grads)};
  }

  static at::Tensor disjoint_merge_backward(const at::Tensor& grad, const at::Tensor& mask,
                                            at::ScalarType dtype) {
    at::Tensor out = new_disjoint_merge_grad(grad, mask, dtype);
    GradKernels::disjoint_merge_backward(grad.contiguous(), mask.contiguous(), out);
    return out;
  }
};

template <typename GradKernels>
void register_grad_ops(torch::Library& m) {
  using Ops = GradOps<GradKernels>;
  m.impl("merge_backward", &Ops::merge_backward);
  m.impl("disjoint_merge_backward", &Ops::disjoint_merge_backward);
}

}  // namespace lorax_merge
