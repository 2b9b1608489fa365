// Host-side description of one merge, validated once and handed to a device's kernels.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include "common/element_type.h"
#include "common/merge_rule.h"

namespace lorax_merge {

struct MergeRequest {
  std::vector<at::Tensor> tasks;  // contiguous, one dtype, one shape, one device
  at::Tensor weights;             // 1-D, one entry per task; on the CPU or the tasks' device
  Pruning pruning = Pruning::kNone;
  SignElection election = SignElection::kNone;
  double density = 1.0;
  bool rescale = false;
  int64_t seed = 0;
  int64_t first_stream = 0;  // task i draws from random stream first_stream + i
  at::Tensor out;            // contiguous, the tasks' shape, written in full
  // A slice of larger tensors: element j of the tasks is flat index index_offset + j of
  // theirs (DARE draws and tie cuts use that index), and `thresholds`, when defined, holds
  // their magnitude thresholds (int64 [num_tasks, 2]: key, cut; on the tasks' device)
  // instead of thresholds selected from the slice.
  int64_t index_offset = 0;
  at::Tensor thresholds;

  int64_t numel() const { return out.numel(); }
  int64_t num_tasks() const { return static_cast<int64_t>(tasks.size()); }
  // Pruning happens only below density 1.
  bool prunes() const { return pruning != Pruning::kNone && density < 1.0; }
  bool prunes_by_magnitude() const { return prunes() && pruning == Pruning::kMagnitude; }
  bool prunes_randomly() const { return prunes() && pruning == Pruning::kRandom; }
};

Pruning parse_pruning(c10::string_view name);
SignElection parse_election(c10::string_view name);

// Checks shared by every op; each failure raises ValueError/TypeError naming the argument.
void check_density(double density);
void check_float_dtype(at::ScalarType dtype, const char* arg);
void check_float_dtype(const at::Tensor& t, const char* arg);
void check_tasks(at::TensorList tasks, const char* arg = "tasks");
void check_weights(const at::Tensor& weights, int64_t num_tasks, const at::Tensor& first_task);
void check_out(const at::Tensor& out, const at::Tensor& first_task, at::ScalarType dtype);
// A batch of groups: one seed per group, no empty group, group sizes adding up to num_tasks.
void check_groups(at::IntArrayRef group_sizes, at::IntArrayRef seeds, size_t num_tasks);

// float64 when the tasks or the result are float64, else float32.
at::ScalarType accumulate_type(at::ScalarType task_dtype, at::ScalarType out_dtype);

// A checked floating-point dtype as the kernels' ElementType.
ElementType element_type(at::ScalarType dtype);

// A destination given by the caller: it may be one of the tasks, but not overlap one in part,
// and shares no memory with the weights or the given thresholds.
void check_out_overlap(const MergeRequest& request);

// Build a request over contiguous views of the tasks (non-contiguous tasks are copied).
// `arg` names the tasks in error messages ("tasks", or "groups[g]" in a batch).
MergeRequest make_request(at::TensorList tasks, const at::Tensor& weights, c10::string_view pruning,
                          c10::string_view election, double density, bool rescale, int64_t seed,
                          int64_t first_stream, at::Tensor out, const char* arg = "tasks");

// One request per group of a batch: `tasks` is every group's tensors, concatenated, and
// `weights` their weights; each group gets its own output (the op is functional, so its
// outputs must not alias).
std::vector<MergeRequest> make_group_requests(at::TensorList tasks, at::IntArrayRef group_sizes,
                                              const at::Tensor& weights, c10::string_view pruning,
                                              c10::string_view election, double density,
                                              bool rescale, at::IntArrayRef seeds,
                                              at::ScalarType out_dtype);

// Outputs, allocated after their arguments are checked.
// A merge's: contiguous, the first task's shape and device.
at::Tensor new_merge_output(at::TensorList tasks, at::ScalarType dtype);
// majority_sign_mask's: bool, the stacked tensor's shape; also parses `method`.
at::Tensor new_sign_mask_output(const at::Tensor& stacked, c10::string_view method,
                                SignElection& election);
// disjoint_merge's: the stacked tensor's shape without its first dimension.
at::Tensor new_disjoint_merge_output(const at::Tensor& stacked, const at::Tensor& mask);

// The weight of a one-task merge (pruning alone): 1, as a 1-D double tensor.
at::Tensor unit_weight();
// magnitude_thresholds' output, after checking the tasks and the density: int64 [N, 2] on the
// tasks' device.
at::Tensor new_thresholds_output(at::TensorList tasks, double density);

// Checks a precomputed thresholds tensor (int64 [num_tasks, 2] on the tasks' device) and
// the flat-index offset of a slice; returns the thresholds, contiguous.
at::Tensor check_slice(const at::Tensor& thresholds, int64_t index_offset, int64_t num_tasks,
                       const at::Tensor& first_task);

// Host copy of the weights as doubles (the weights tensor must be on the CPU).
std::vector<double> host_weights(const at::Tensor& weights);

}  // namespace lorax_merge
