// The Python extension module cem_ops._C. Importing it runs the static operator
// registrations of the other translation units; its attributes describe the build so
// that cem_ops can refuse a stale or mismatched binary with a clear message.
#include <Python.h>

#include <string>

#include "ops/cuda_emulation.h"

#ifdef CEM_OPS_WITH_CUDA
#include "cuda/kernel_registry.h"
#endif

#ifndef CEM_OPS_SOURCE_HASH
#define CEM_OPS_SOURCE_HASH "unknown"
#endif
#ifndef CEM_OPS_TORCH_VERSION
#define CEM_OPS_TORCH_VERSION "unknown"
#endif
#ifndef CEM_OPS_CUDA_ARCHS
#define CEM_OPS_CUDA_ARCHS ""
#endif

namespace {

// _set_cuda_emulation(enabled) -> previous: cem_ops.testing.cuda_emulation() flips it per thread.
PyObject* set_cuda_emulation(PyObject*, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) {
    return nullptr;
  }
  return PyBool_FromLong(cem::set_cuda_emulation(enabled != 0));
}

PyMethodDef methods[] = {
    {"_set_cuda_emulation", set_cuda_emulation, METH_O, "Route CPU attention kernel ops to cem_ops._C_emulated."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cem_ops compiled operators", -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef CEM_OPS_WITH_CUDA
  const int with_cuda = 1;
  // "bf16:64,128 fp16:64,128 fp32:64,128": the compiled attention kernels (dtype: head-dim
  // buckets). The CUDA tests read it to know which configurations run a kernel.
  const std::string cuda_attention_kernels = cem::cuda::describe_attention_kernels();
#else
  const int with_cuda = 0;
  const std::string cuda_attention_kernels;
#endif
  if (PyModule_AddStringConstant(module, "source_hash", CEM_OPS_SOURCE_HASH) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", CEM_OPS_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", CEM_OPS_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(module, "cuda_attention_kernels", cuda_attention_kernels.c_str()) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
