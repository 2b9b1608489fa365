#include "merge_request.h"

#include <cmath>
#include <string>

#include <ATen/ATen.h>

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

void check_float_dtype(const at::Tensor& t, const char* arg) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "lorax_merge: ", arg,
                   " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_tasks(at::TensorList tasks, const char* arg) {
  TORCH_CHECK_VALUE(!tasks.empty(), "lorax_merge: ", arg, " is empty; at least one tensor is needed");
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
  req.rescale = rescale;
  req.seed = seed;
  req.first_stream = first_stream;
  req.tasks.reserve(tasks.size());
  for (const at::Tensor& t : tasks) req.tasks.push_back(t.contiguous());
  req.weights = weights;
  req.out = std::move(out);
  return req;
}

at::Tensor check_slice(const at::Tensor& thresholds, int64_t index_offset, int64_t num_tasks,
                       const at::Tensor& first_task) {
  TORCH_CHECK_VALUE(index_offset >= 0, "lorax_merge: index_offset must be >= 0, got ", index_offset);
  if (!thresholds.defined()) return thresholds;
  TORCH_CHECK_TYPE(thresholds.scalar_type() == at::kLong,
                   "lorax_merge: thresholds must be an int64 tensor, got dtype ", thresholds.scalar_type());
  TORCH_CHECK_VALUE(thresholds.dim() == 2 && thresholds.size(0) == num_tasks && thresholds.size(1) == 2,
                    "lorax_merge: thresholds must have shape [", num_tasks, ", 2] (one key and cut per "
                    "task), got ", thresholds.sizes());
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
