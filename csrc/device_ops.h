// The op bodies, written once for every device. A device provides a `Kernels` type with
//   static void fused_merge(const MergeRequest&);
//   static void fused_merge_many(const std::vector<MergeRequest>&);
//   static void majority_sign_mask(const at::Tensor& stacked, SignElection, at::Tensor& mask);
//   static void disjoint_merge(const at::Tensor& stacked, const at::Tensor& mask, at::Tensor& out);
//   static void magnitude_thresholds(const std::vector<at::Tensor>& tasks, double density,
//                                    at::Tensor& out);  // int64 [N, 2]: key, cut per task
// and calls register_device_ops<Kernels>(m) from its TORCH_LIBRARY_IMPL block. Arguments are
// checked, and outputs allocated, by merge_request.h's functions.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "merge_request.h"

namespace lorax_merge {

template <typename Kernels>
struct DeviceOps {
  static at::Tensor merge(at::TensorList tasks, const at::Tensor& weights, c10::string_view pruning,
                          c10::string_view election, double density, bool rescale, int64_t seed,
                          at::ScalarType out_dtype) {
    at::Tensor out = new_merge_output(tasks, out_dtype);
    Kernels::fused_merge(
        make_request(tasks, weights, pruning, election, density, rescale, seed, 0, out));
    return out;
  }

  static void merge_out(at::TensorList tasks, const at::Tensor& weights, c10::string_view pruning,
                        c10::string_view election, double density, bool rescale, int64_t seed,
                        at::Tensor& out) {
    if (out.is_contiguous()) {  // make_request checks the tasks and `out`
      const MergeRequest request =
          make_request(tasks, weights, pruning, election, density, rescale, seed, 0, out);
      check_out_overlap(request);
      Kernels::fused_merge(request);
      return;
    }
    // A strided destination gets a contiguous result copied in; check it before the copy,
    // which would otherwise broadcast into a destination of the wrong shape.
    check_tasks(tasks);
    check_out(out, tasks[0], out.scalar_type());
    at::Tensor result =
        merge(tasks, weights, pruning, election, density, rescale, seed, out.scalar_type());
    out.copy_(result);
  }

  static std::vector<at::Tensor> merge_many(at::TensorList tasks, at::IntArrayRef group_sizes,
                                            const at::Tensor& weights, c10::string_view pruning,
                                            c10::string_view election, double density, bool rescale,
                                            at::IntArrayRef seeds, at::ScalarType out_dtype) {
    std::vector<MergeRequest> requests = make_group_requests(
        tasks, group_sizes, weights, pruning, election, density, rescale, seeds, out_dtype);
    if (!requests.empty()) Kernels::fused_merge_many(requests);
    std::vector<at::Tensor> outs;
    outs.reserve(requests.size());
    for (MergeRequest& r : requests) outs.push_back(std::move(r.out));
    return outs;
  }

  // A merge of the slice [index_offset, index_offset + numel) of larger tensors, whose
  // magnitude thresholds (from magnitude_thresholds) are given or, when absent, selected
  // from the slice itself.
  static void merge_slice_out(at::TensorList tasks, const at::Tensor& weights,
                              c10::string_view pruning, c10::string_view election, double density,
                              bool rescale, int64_t seed, int64_t index_offset,
                              const std::optional<at::Tensor>& thresholds, const at::Tensor& out) {
    MergeRequest request =
        make_request(tasks, weights, pruning, election, density, rescale, seed, 0, out);
    request.index_offset = index_offset;
    request.thresholds = check_slice(thresholds.value_or(at::Tensor()), index_offset,
                                     request.num_tasks(), request.tasks[0]);
    check_out_overlap(request);
    if (!request.thresholds.defined() && index_offset > 0 && request.prunes() &&
        request.pruning == Pruning::kMagnitude) {
      // Selected from the slice, whose tie cut counts from the slice's first element; the
      // kernels compare it with indices in the sliced tensors.
      request.thresholds = new_thresholds_output(request.tasks, density);
      Kernels::magnitude_thresholds(request.tasks, density, request.thresholds);
      request.thresholds.select(1, 1).add_(index_offset);
    }
    Kernels::fused_merge(request);
  }

  // merge_slice_out as a functional op: a new result (the one autograd can differentiate).
  static at::Tensor merge_with_thresholds(at::TensorList tasks, const at::Tensor& weights,
                                          c10::string_view pruning, c10::string_view election,
                                          double density, bool rescale, int64_t seed,
                                          int64_t index_offset,
                                          const std::optional<at::Tensor>& thresholds,
                                          at::ScalarType out_dtype) {
    at::Tensor out = new_merge_output(tasks, out_dtype);
    merge_slice_out(tasks, weights, pruning, election, density, rescale, seed, index_offset,
                    thresholds, out);
    return out;
  }

  static at::Tensor magnitude_thresholds(at::TensorList tasks, double density) {
    at::Tensor out = new_thresholds_output(tasks, density);
    std::vector<at::Tensor> contiguous;
    contiguous.reserve(tasks.size());
    for (const at::Tensor& t : tasks) contiguous.push_back(t.contiguous());
    Kernels::magnitude_thresholds(contiguous, density, out);
    return out;
  }

  static at::Tensor magnitude_prune(const at::Tensor& x, double density) {
    at::Tensor out = new_merge_output({x}, x.scalar_type());
    Kernels::fused_merge(
        make_request({x}, unit_weight(), "magnitude", "none", density, false, 0, 0, out));
    return out;
  }

  static at::Tensor random_prune(const at::Tensor& x, double density, bool rescale, int64_t seed,
                                 int64_t stream) {
    at::Tensor out = new_merge_output({x}, x.scalar_type());
    Kernels::fused_merge(
        make_request({x}, unit_weight(), "random", "none", density, rescale, seed, stream, out));
    return out;
  }

  static at::Tensor majority_sign_mask(const at::Tensor& stacked, c10::string_view method) {
    SignElection election;
    at::Tensor mask = new_sign_mask_output(stacked, method, election);
    Kernels::majority_sign_mask(stacked.contiguous(), election, mask);
    return mask;
  }

  static at::Tensor disjoint_merge(const at::Tensor& stacked, const at::Tensor& mask) {
    at::Tensor out = new_disjoint_merge_output(stacked, mask);
    Kernels::disjoint_merge(stacked.contiguous(), mask.contiguous(), out);
    return out;
  }
};

template <typename Kernels>
void register_device_ops(torch::Library& m) {
  using Ops = DeviceOps<Kernels>;
  m.impl("merge", &Ops::merge);
  m.impl("merge_out", &Ops::merge_out);
  m.impl("merge_many", &Ops::merge_many);
  m.impl("magnitude_prune", &Ops::magnitude_prune);
  m.impl("random_prune", &Ops::random_prune);
  m.impl("majority_sign_mask", &Ops::majority_sign_mask);
  m.impl("disjoint_merge", &Ops::disjoint_merge);
  m.impl("merge_slice_out", &Ops::merge_slice_out);
  m.impl("magnitude_thresholds", &Ops::magnitude_thresholds);
  m.impl("merge_with_thresholds", &Ops::merge_with_thresholds);
}

}  // namespace lorax_merge
