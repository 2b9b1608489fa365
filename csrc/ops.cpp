// Op schemas of the lorax_merge namespace, the shared parts of their bodies, and the
// Python module that carries the build information.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "register_ops.h"

#ifndef LM_CUDA_ARCHS
#define LM_CUDA_ARCHS ""
#endif
#ifndef LM_WITH_CUDA
#define LM_WITH_CUDA 0
#endif

namespace lorax_merge {

static void check_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "lorax_merge: out_dtype must be float32, float64, float16 or bfloat16, got ",
                   dtype);
}

at::Tensor new_merge_output(at::TensorList tasks, at::ScalarType dtype) {
  // The tasks are checked in full by make_request; the shape and device come from the first.
  TORCH_CHECK_VALUE(!tasks.empty(), "lorax_merge: tasks is empty; at least one tensor is needed");
  check_out_dtype(dtype);
  return at::empty(tasks[0].sizes(), tasks[0].options().dtype(dtype));
}

at::Tensor unit_weight() { return at::ones({1}, at::TensorOptions().dtype(at::kDouble)); }

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
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "lorax_merge: majority_sign_mask must be a "
                   "bool tensor, got dtype ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == stacked.sizes(), "lorax_merge: majority_sign_mask has shape ",
                    mask.sizes(), " but tensor has shape ", stacked.sizes());
  TORCH_CHECK_VALUE(mask.device() == stacked.device(), "lorax_merge: majority_sign_mask is on ",
                    mask.device(), " but tensor is on ", stacked.device());
  // The reference divides by a float32 count: float32 results, float64 for float64 inputs.
  const at::ScalarType dtype = at::promote_types(stacked.scalar_type(), at::kFloat);
  return at::empty(stacked.sizes().slice(1), stacked.options().dtype(dtype));
}

at::Tensor new_thresholds_output(at::TensorList tasks, double density) {
  check_tasks(tasks);
  check_density(density);
  return at::empty({static_cast<int64_t>(tasks.size()), 2}, tasks[0].options().dtype(at::kLong));
}

std::vector<MergeRequest> make_group_requests(at::TensorList tasks, at::IntArrayRef group_sizes,
                                              const at::Tensor& weights, c10::string_view pruning,
                                              c10::string_view election, double density,
                                              bool rescale, at::IntArrayRef seeds,
                                              at::ScalarType out_dtype) {
  const int64_t num_groups = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(seeds.size()) == num_groups, "lorax_merge: seeds has ",
                    seeds.size(), " entries but there are ", num_groups, " groups");
  TORCH_CHECK_VALUE(weights.dim() == 1, "lorax_merge: weights must be 1-D, got shape ",
                    weights.sizes());
  int64_t total = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK_VALUE(group_sizes[g] >= 1, "lorax_merge: groups[", g,
                      "] is empty; each group needs at least one tensor");
    total += group_sizes[g];
  }
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(tasks.size()), "lorax_merge: group sizes add up to ",
                    total, " but ", tasks.size(), " tensors were given");
  TORCH_CHECK_VALUE(weights.numel() == total, "lorax_merge: weights has ", weights.numel(),
                    " entries but there are ", total, " tensors in all groups");
  if (num_groups == 0) return {};
  // Each group gets its own output: the op is functional, so its outputs must not alias.
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

TORCH_LIBRARY(lorax_merge, m) {
  m.def(
      "merge(Tensor[] tasks, Tensor weights, str pruning, str election, float density, "
      "bool rescale, int seed, ScalarType out_dtype) -> Tensor");
  m.def(
      "merge_out(Tensor[] tasks, Tensor weights, str pruning, str election, float density, "
      "bool rescale, int seed, Tensor(a!) out) -> ()");
  m.def(
      "merge_many(Tensor[] tasks, int[] group_sizes, Tensor weights, str pruning, str election, "
      "float density, bool rescale, int[] seeds, ScalarType out_dtype) -> Tensor[]");
  m.def("magnitude_prune(Tensor x, float density) -> Tensor");
  m.def("random_prune(Tensor x, float density, bool rescale, int seed, int stream) -> Tensor");
  m.def("majority_sign_mask(Tensor stacked, str method) -> Tensor");
  m.def("disjoint_merge(Tensor stacked, Tensor mask) -> Tensor");
  m.def(
      "merge_slice_out(Tensor[] tasks, Tensor weights, str pruning, str election, float density, "
      "bool rescale, int seed, int index_offset, Tensor? thresholds, Tensor(a!) out) -> ()");
  m.def("magnitude_thresholds(Tensor[] tasks, float density) -> Tensor");
  m.def(
      "lora_delta_out(Tensor lora_a, Tensor lora_b, float scale, int row_begin, Tensor(a!) out) "
      "-> ()");
}

}  // namespace lorax_merge

static PyModuleDef lorax_merge_module = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled lorax_merge ops (torch.ops.lorax_merge).", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&lorax_merge_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", LM_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", LM_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
