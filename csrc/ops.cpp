// Op schemas of the lorax_merge namespace, and the Python module that carries the build
// information and the CPU capability level. The op bodies are in device_ops.h, registered
// once per device.
#include <Python.h>

#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/capability.h"

#ifndef LM_CUDA_ARCHS
#define LM_CUDA_ARCHS ""
#endif
#ifndef LM_WITH_CUDA
#define LM_WITH_CUDA 0
#endif
#ifndef LM_CPU_ARCH
#define LM_CPU_ARCH ""
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
  m.def(
      "merge_with_thresholds(Tensor[] tasks, Tensor weights, str pruning, str election, "
      "float density, bool rescale, int seed, int index_offset, Tensor? thresholds, "
      "ScalarType out_dtype) -> Tensor");
}

}  // namespace lorax_merge

namespace {

using lorax_merge::cpu::capability_name;
using lorax_merge::cpu::CpuCapability;

PyObject* names_of(const std::vector<CpuCapability>& levels) {
  PyObject* names = PyList_New(0);
  for (CpuCapability level : levels) {
    PyObject* name = PyUnicode_FromString(capability_name(level));
    if (name == nullptr || PyList_Append(names, name) < 0) {
      Py_XDECREF(name);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return names;
}

// The level in use, chosen on the first call (LORAX_MERGE_CPU_CAPABILITY is read then).
PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(capability_name(lorax_merge::cpu::active_capability()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* supported_cpu_capabilities(PyObject*, PyObject*) {
  return names_of(lorax_merge::cpu::supported_capabilities());
}

PyObject* set_cpu_capability(PyObject*, PyObject* name) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) return nullptr;
  try {
    lorax_merge::cpu::set_active_capability(text);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU capability level in use: 'default', 'avx2' or 'avx512'."},
    {"supported_cpu_capabilities", supported_cpu_capabilities, METH_NOARGS,
     "The compiled CPU capability levels this CPU can run, lowest first."},
    {"_set_cpu_capability", set_cpu_capability, METH_O,
     "Switch the CPU kernels to another supported capability level (tests, benchmarks)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

static PyModuleDef lorax_merge_module = {
    PyModuleDef_HEAD_INIT,
    /*m_name=*/"_C",
    /*m_doc=*/"Compiled lorax_merge ops (torch.ops.lorax_merge).",
    /*m_size=*/-1,
    /*m_methods=*/module_methods,
    /*m_slots=*/nullptr,
    /*m_traverse=*/nullptr,
    /*m_clear=*/nullptr,
    /*m_free=*/nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&lorax_merge_module);
  if (module == nullptr) return nullptr;
  PyObject* compiled = names_of(lorax_merge::cpu::compiled_capabilities());
  // Choose the CPU level now, so that a bad LORAX_MERGE_CPU_CAPABILITY fails the import.
  PyObject* active = cpu_capability(nullptr, nullptr);
  const bool ok = compiled != nullptr && active != nullptr &&
                  PyModule_AddIntConstant(module, "WITH_CUDA", LM_WITH_CUDA) == 0 &&
                  PyModule_AddStringConstant(module, "CUDA_ARCHS", LM_CUDA_ARCHS) == 0 &&
                  PyModule_AddStringConstant(module, "CPU_ARCH", LM_CPU_ARCH) == 0 &&
                  PyModule_AddObject(module, "CPU_CAPABILITIES", compiled) == 0;
  Py_XDECREF(active);
  if (!ok) {  // CPU_CAPABILITIES was not added (it is last), so `compiled` is still ours
    Py_XDECREF(compiled);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
