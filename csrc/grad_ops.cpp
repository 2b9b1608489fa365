// Schemas of the gradient ops, the device-independent parts of their bodies, and the Autograd
// kernels of the ops that have no derivative formula: merge_out refuses inputs that require grad
// (as torch's out= ops do), and the ops whose outputs are masks or indices are not
// differentiable. The derivative formulas of the other ops are registered from Python
// (lorax_merge/_autograd.py) with torch.library.register_autograd.
#include "grad_ops.h"

#include <string>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace lorax_merge {

MergeGradBatch make_grad_batch(at::TensorList grads, at::TensorList tasks,
                               at::IntArrayRef group_sizes, const at::Tensor& weights,
                               c10::string_view pruning, c10::string_view election, double density,
                               bool rescale, at::IntArrayRef seeds, int64_t index_offset,
                               const std::optional<at::Tensor>& thresholds, bool tasks_need_grad,
                               bool weights_need_grad) {
  const int64_t num_groups = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == num_groups, "lorax_merge: grads has ",
                    grads.size(), " entries but there are ", num_groups, " groups");
  check_groups(group_sizes, seeds, tasks.size());
  const int64_t total = static_cast<int64_t>(tasks.size());  // the group sizes' sum
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == static_cast<int64_t>(tasks.size()),
                    "lorax_merge: weights must hold one entry per task (", tasks.size(),
                    "), got shape ", weights.sizes());
  const bool by_magnitude =
      parse_pruning(pruning) == Pruning::kMagnitude && density < 1.0 && num_groups > 0;
  at::Tensor all_thresholds;
  if (by_magnitude) {
    TORCH_CHECK_VALUE(thresholds.has_value() && thresholds->defined(),
                      "lorax_merge: the backward of a magnitude-pruned merge needs its thresholds");
    all_thresholds = check_slice(*thresholds, index_offset, total, tasks[0]);
  } else {
    check_slice(at::Tensor(), index_offset, total, weights);
  }
  // Weights on a GPU are read by the kernels as doubles.
  const at::Tensor weights_read =
      weights.device().is_cpu() ? weights : weights.to(at::kDouble).contiguous();

  MergeGradBatch batch;
  const at::Device device = num_groups > 0 ? tasks[0].device() : weights.device();
  batch.weight_grads = at::zeros({weights_need_grad ? total : 0},
                                 weights.options().dtype(at::kDouble).device(device));
  int64_t offset = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const at::TensorList group = tasks.slice(offset, group_sizes[g]);
    const std::string name = num_groups == 1 ? "tasks" : "groups[" + std::to_string(g) + "]";
    const at::Tensor& grad = grads[g];
    check_float_dtype(grad, "grad");
    MergeGradRequest r;
    r.merge = make_request(group, weights_read.narrow(0, offset, group_sizes[g]), pruning, election,
                           density, rescale, seeds[g], 0, grad.contiguous(), name.c_str());
    r.merge.index_offset = index_offset;
    if (by_magnitude) r.merge.thresholds = all_thresholds.narrow(0, offset, group_sizes[g]);
    if (tasks_need_grad) {
      for (const at::Tensor& t : r.merge.tasks) {
        r.task_grads.push_back(at::empty(t.sizes(), t.options()));
        batch.task_grads.push_back(r.task_grads.back());
      }
    }
    if (weights_need_grad) r.weight_grads = batch.weight_grads.narrow(0, offset, group_sizes[g]);
    batch.requests.push_back(std::move(r));
    offset += group_sizes[g];
  }
  return batch;
}

at::Tensor new_disjoint_merge_grad(const at::Tensor& grad, const at::Tensor& mask,
                                   at::ScalarType dtype) {
  check_float_dtype(dtype, "dtype");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "lorax_merge: mask must be a bool tensor, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() >= 1 && mask.sizes().slice(1) == grad.sizes(),
                    "lorax_merge: mask has shape ", mask.sizes(), " but grad has shape ",
                    grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == at::promote_types(dtype, at::kFloat),
                   "lorax_merge: grad has dtype ", grad.scalar_type(), " but disjoint_merge of ",
                   dtype, " tensors returns ", at::promote_types(dtype, at::kFloat));
  TORCH_CHECK_VALUE(mask.device() == grad.device(), "lorax_merge: mask is on ", mask.device(),
                    " but grad is on ", grad.device());
  return at::empty(mask.sizes(), grad.options().dtype(dtype));
}

namespace {

// Autograd kernel of merge_out, merge_slice_out and lora_delta_out: torch's out= ops do not
// support automatic differentiation, and neither do these. Boxed, so it fits whatever C++
// signature the device kernels have.
void refuse_gradients_of_out_op(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& schema = op.schema();
    const size_t first = stack->size() - schema.arguments().size();
    bool requires_grad = false;
    for (size_t i = first; i < stack->size(); ++i) {
      const c10::IValue& arg = (*stack)[i];
      if (arg.isTensor()) {
        requires_grad = requires_grad || arg.toTensor().requires_grad();
      } else if (arg.isTensorList()) {
        for (const at::Tensor& t : arg.toTensorList()) {
          requires_grad = requires_grad || t.requires_grad();
        }
      }
    }
    TORCH_CHECK(!requires_grad, op.schema().name(),
                " writes into out= and, as torch's out= ops, does not support automatic "
                "differentiation, but one of the arguments requires grad (for gradients, merge "
                "without out=)");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.callBoxed(stack);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorax_merge, m) {
  m.def(
      "merge_backward(Tensor[] grads, Tensor[] tasks, int[] group_sizes, Tensor weights, "
      "str pruning, str election, float density, bool rescale, int[] seeds, int index_offset, "
      "Tensor? thresholds, bool tasks_need_grad, bool weights_need_grad) -> (Tensor[], Tensor)");
  m.def("disjoint_merge_backward(Tensor grad, Tensor mask, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorax_merge, Autograd, m) {
  m.impl("merge_out", torch::CppFunction::makeFromBoxedFunction<&refuse_gradients_of_out_op>());
  m.impl("merge_slice_out",
         torch::CppFunction::makeFromBoxedFunction<&refuse_gradients_of_out_op>());
  m.impl("lora_delta_out",
         torch::CppFunction::makeFromBoxedFunction<&refuse_gradients_of_out_op>());
  // Masks and selection thresholds carry no gradient.
  m.impl("majority_sign_mask", torch::CppFunction::makeFallthrough());
  m.impl("magnitude_thresholds", torch::CppFunction::makeFallthrough());
}

}  // namespace lorax_merge
