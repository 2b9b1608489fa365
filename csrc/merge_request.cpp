#include "merge_request.h"

#include <cmath>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace lorax_merge {

Pruning parse_pruning(c10::string_view name) {
  if (name == "none") return Pruning::kNone;
  if (name == "magnitude") return Pruning::kMagnitude;
  if (name == "random") return Pruning::kRandom;
  TORCH_CHECK_VALUE(false, "lorax_merge: unknown pruning method '", std::string(name),
                    "'; expected 'magnitude' or 'random'");
}

SignElection parse_election(c10::string_view name) {
  if (name == "none") return SignElection::kNone;
  if (name == "total") return SignElection::kTotal;
  if (name == "frequency") return SignElection::kFrequency;
  TORCH_CHECK_VALUE(false, "lorax_merge: unknown majority_sign_method '", std::string(name),
                    "'; expected 'total' or 'frequency'");
}

void check_density(double density) {
  TORCH_CHECK_VALUE(density >= 0.0, "lorax_merge: density must be >= 0 (and not NaN), got ",
                    density);
}

void check_float_dtype(at::ScalarType dtype, const char* arg) {
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "lorax_merge: ", arg, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_float_dtype(const at::Tensor& t, const char* arg) {
  check_float_dtype(t.scalar_type(), arg);
}

void check_tasks(at::TensorList tasks, const char* arg) {
  TORCH_CHECK_VALUE(!tasks.empty(), "lorax_merge: ", arg,
                    " is empty; at least one tensor is needed");
  const at::Tensor& first = tasks[0];
  for (size_t i = 0; i < tasks.size(); ++i) {
    const at::Tensor& t = tasks[i];
    TORCH_CHECK_VALUE(t.defined(), "lorax_merge: ", arg, "[", i, "] is undefined");
    const std::string name = std::string(arg) + "[" + std::to_string(i) + "]";
    check_float_dtype(t, name.c_str());
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), "lorax_merge: ", name, " has dtype ",
                     t.scalar_type(), " but ", arg, "[0] has dtype ", first.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == first.sizes(), "lorax_merge: ", name, " has shape ", t.sizes(),
                      " but ", arg, "[0] has shape ", first.sizes());
    TORCH_CHECK_VALUE(t.device() == first.device(), "lorax_merge: ", name, " is on ", t.device(),
                      " but ", arg, "[0] is on ", first.device());
  }
}

void check_groups(at::IntArrayRef group_sizes, at::IntArrayRef seeds, size_t num_tasks) {
  const int64_t num_groups = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(seeds.size()) == num_groups, "lorax_merge: seeds has ",
                    seeds.size(), " entries but there are ", num_groups, " groups");
  int64_t total = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK_VALUE(group_sizes[g] >= 1, "lorax_merge: groups[", g,
                      "] is empty; each group needs at least one tensor");
    total += group_sizes[g];
  }
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(num_tasks), "lorax_merge: group sizes add up to ",
                    total, " but ", num_tasks, " tensors were given");
}

void check_weights(const at::Tensor& weights, int64_t num_tasks, const at::Tensor& first_task) {
  TORCH_CHECK_VALUE(weights.defined(), "lorax_merge: weights is undefined");
  TORCH_CHECK_VALUE(weights.dim() == 1, "lorax_merge: weights must be 1-D, got shape ",
                    weights.sizes());
  TORCH_CHECK_VALUE(weights.numel() == num_tasks, "lorax_merge: weights has ", weights.numel(),
                    " entries but there are ", num_tasks, " task tensors");
  TORCH_CHECK_TYPE(weights.scalar_type() != at::kBool && !at::isComplexType(weights.scalar_type()),
                   "lorax_merge: weights must be real numbers, got dtype ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device().is_cpu() || weights.device() == first_task.device(),
                    "lorax_merge: weights is on ", weights.device(),
                    " but the task tensors are on ", first_task.device());
}

void check_out(const at::Tensor& out, const at::Tensor& first_task, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(out.sizes() == first_task.sizes(), "lorax_merge: out has shape ", out.sizes(),
                    " but the task tensors have shape ", first_task.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "lorax_merge: out has dtype ", out.scalar_type(),
                   " but the result dtype is ", dtype);
  TORCH_CHECK_VALUE(out.device() == first_task.device(), "lorax_merge: out is on ", out.device(),
                    " but the task tensors are on ", first_task.device());
}

at::ScalarType accumulate_type(at::ScalarType task_dtype, at::ScalarType out_dtype) {
  return task_dtype == at::kDouble || out_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return ElementType::kDouble;
    case at::kHalf:
      return ElementType::kHalf;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(dtype == at::kFloat, "lorax_merge: unsupported dtype ", dtype);
      return ElementType::kFloat;
  }
}

MergeRequest make_request(at::TensorList tasks, const at::Tensor& weights, c10::string_view pruning,
                          c10::string_view election, double density, bool rescale, int64_t seed,
                          int64_t first_stream, at::Tensor out, const char* arg) {
  check_tasks(tasks, arg);
  check_weights(weights, static_cast<int64_t>(tasks.size()), tasks[0]);
  check_density(density);
  check_float_dtype(out, "out");
  check_out(out, tasks[0], out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "lorax_merge: out must be contiguous");
  MergeRequest req;
  req.pruning = parse_pruning(pruning);
  req.election = parse_election(election);
  req.density = density;
  // At density 0 every entry is dropped and none is divided: a rescale would only put 1 / 0
  // into the gradients of the dropped entries (their q * 0).
  req.rescale = rescale && density > 0.0;
  req.seed = seed;
  req.first_stream = first_stream;
  req.tasks.reserve(tasks.size());
  for (const at::Tensor& t : tasks) req.tasks.push_back(t.contiguous());
  req.weights = weights;
  req.out = std::move(out);
  return req;
}

void check_out_overlap(const MergeRequest& request) {
  // Writing out while other elements of a task are still to be read would change what the
  // merge reads (and differently on each device). Out may be a task itself: every element is
  // read before it is written.
  for (size_t i = 0; i < request.tasks.size(); ++i) {
    TORCH_CHECK_VALUE(
        at::get_overlap_status(request.out, request.tasks[i]) != at::MemOverlapStatus::Partial,
        "lorax_merge: out shares part of its memory with tasks[", i,
        "]; it must be that tensor itself or not overlap it");
  }
  // Every GPU thread reads the weights and the thresholds while others write out.
  const std::pair<const at::Tensor*, const char*> read_throughout[] = {
      {&request.weights, "weights"}, {&request.thresholds, "thresholds"}};
  for (const auto& [tensor, name] : read_throughout) {
    if (!tensor->defined()) continue;
    const at::MemOverlapStatus status = at::get_overlap_status(request.out, *tensor);
    TORCH_CHECK_VALUE(
        status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
        "lorax_merge: out shares memory with ", name,
        ", which the merge reads until its last element is written; give out its own memory");
  }
}

at::Tensor new_merge_output(at::TensorList tasks, at::ScalarType dtype) {
  // The tasks are checked in full by make_request; the shape and device come from the first.
  TORCH_CHECK_VALUE(!tasks.empty(), "lorax_merge: tasks is empty; at least one tensor is needed");
  check_float_dtype(dtype, "out_dtype");
  return at::empty(tasks[0].sizes(), tasks[0].options().dtype(dtype));
}

at::Tensor unit_weight() {
  return at::ones({1}, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor new_sign_mask_output(const at::Tensor& stacked, c10::string_view method,
                                SignElection& election) {
  check_float_dtype(stacked, "tensor");
  TORCH_CHECK_VALUE(stacked.dim() >= 1,
                    "lorax_merge: tensor must be stacked task tensors with at least one "
                    "dimension, got a 0-D tensor");
  election = parse_election(method);
  TORCH_CHECK_VALUE(election != SignElection::kNone,
                    "lorax_merge: unknown majority_sign_method 'none'; expected 'total' or "
                    "'frequency'");
  return at::empty(stacked.sizes(), stacked.options().dtype(at::kBool));
}

at::Tensor new_disjoint_merge_output(const at::Tensor& stacked, const at::Tensor& mask) {
  check_float_dtype(stacked, "tensor");
  TORCH_CHECK_VALUE(stacked.dim() >= 1,
                    "lorax_merge: tensor must be stacked task tensors with at least one "
                    "dimension, got a 0-D tensor");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool,
                   "lorax_merge: majority_sign_mask must be a "
                   "bool tensor, got dtype ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == stacked.sizes(), "lorax_merge: majority_sign_mask has shape ",
                    mask.sizes(), " but tensor has shape ", stacked.sizes());
  TORCH_CHECK_VALUE(mask.device() == stacked.device(), "lorax_merge: majority_sign_mask is on ",
                    mask.device(), " but tensor is on ", stacked.device());
  // The reference divides by a float32 count: float32 results, float64 for float64 inputs.
  const at::ScalarType dtype = at::promote_types(stacked.scalar_type(), at::kFloat);
  return at::empty(stacked.sizes().slice(1), stacked.options().dtype(dtype));
}

std::vector<MergeRequest> make_group_requests(at::TensorList tasks, at::IntArrayRef group_sizes,
                                              const at::Tensor& weights, c10::string_view pruning,
                                              c10::string_view election, double density,
                                              bool rescale, at::IntArrayRef seeds,
                                              at::ScalarType out_dtype) {
  const int64_t num_groups = static_cast<int64_t>(group_sizes.size());
  check_groups(group_sizes, seeds, tasks.size());
  TORCH_CHECK_VALUE(weights.dim() == 1, "lorax_merge: weights must be 1-D, got shape ",
                    weights.sizes());
  TORCH_CHECK_VALUE(weights.numel() == static_cast<int64_t>(tasks.size()),
                    "lorax_merge: weights has ", weights.numel(), " entries but there are ",
                    tasks.size(), " tensors in all groups");
  if (num_groups == 0) return {};
  std::vector<MergeRequest> requests;
  requests.reserve(num_groups);
  int64_t offset = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const at::TensorList group = tasks.slice(offset, group_sizes[g]);
    const std::string name = "groups[" + std::to_string(g) + "]";
    at::Tensor out = new_merge_output(group, out_dtype);
    requests.push_back(make_request(group, weights.narrow(0, offset, group_sizes[g]), pruning,
                                    election, density, rescale, seeds[g], 0, std::move(out),
                                    name.c_str()));
    offset += group_sizes[g];
  }
  return requests;
}

at::Tensor new_thresholds_output(at::TensorList tasks, double density) {
  check_tasks(tasks);
  check_density(density);
  return at::empty({static_cast<int64_t>(tasks.size()), 2}, tasks[0].options().dtype(at::kLong));
}

at::Tensor check_slice(const at::Tensor& thresholds, int64_t index_offset, int64_t num_tasks,
                       const at::Tensor& first_task) {
  TORCH_CHECK_VALUE(index_offset >= 0, "lorax_merge: index_offset must be >= 0, got ",
                    index_offset);
  if (!thresholds.defined()) return thresholds;
  TORCH_CHECK_TYPE(thresholds.scalar_type() == at::kLong,
                   "lorax_merge: thresholds must be an int64 tensor, got dtype ",
                   thresholds.scalar_type());
  TORCH_CHECK_VALUE(
      thresholds.dim() == 2 && thresholds.size(0) == num_tasks && thresholds.size(1) == 2,
      "lorax_merge: thresholds must have shape [", num_tasks,
      ", 2] (one key and cut per "
      "task), got ",
      thresholds.sizes());
  TORCH_CHECK_VALUE(thresholds.device() == first_task.device(), "lorax_merge: thresholds is on ",
                    thresholds.device(), " but the task tensors are on ", first_task.device());
  return thresholds.contiguous();
}

std::vector<double> host_weights(const at::Tensor& weights) {
  // Read in place for the usual dtypes: a batch has one small weights view per group, and
  // a temporary tensor per group would cost more than the merge of a small one.
  const int64_t n = weights.numel();
  const int64_t stride = n > 1 ? weights.stride(0) : 1;
  std::vector<double> out(static_cast<size_t>(n));
  auto read = [&](const auto* p) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i * stride]);
  };
  switch (weights.scalar_type()) {
    case at::kDouble:
      read(weights.const_data_ptr<double>());
      return out;
    case at::kFloat:
      read(weights.const_data_ptr<float>());
      return out;
    case at::kHalf:
      read(weights.const_data_ptr<at::Half>());
      return out;
    case at::kBFloat16:
      read(weights.const_data_ptr<at::BFloat16>());
      return out;
    default: {
      const at::Tensor w = weights.to(at::kDouble).contiguous();
      const double* p = w.const_data_ptr<double>();
      return std::vector<double>(p, p + n);
    }
  }
}

}  // namespace lorax_merge
