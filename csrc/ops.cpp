// Op schemas of the lorax_merge namespace, and the Python module that carries the build
// information. The op bodies are in device_ops.h, registered once per device.
#include <Python.h>

#include <torch/library.h>

#ifndef LM_CUDA_ARCHS
#define LM_CUDA_ARCHS ""
#endif
#ifndef LM_WITH_CUDA
#define LM_WITH_CUDA 0
#endif

namespace lorax_merge {

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
    PyModuleDef_HEAD_INIT,
    /*m_name=*/"_C",
    /*m_doc=*/"Compiled lorax_merge ops (torch.ops.lorax_merge).",
    /*m_size=*/-1,
    /*m_methods=*/nullptr,
    /*m_slots=*/nullptr,
    /*m_traverse=*/nullptr,
    /*m_clear=*/nullptr,
    /*m_free=*/nullptr,
};

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
