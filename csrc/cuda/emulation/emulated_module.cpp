// The Python extension module cem_ops._C_emulated: the CUDA attention glue and kernels built for
// the CPU against the emulation layer. Importing it registers cem_emulated::attention_fwd and
// attention_bwd (the CPU attention ops redirect to them while cem_ops.testing.cuda_emulation()
// is on); its functions configure the emulator and the checker tests' fault injection.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cuda/emulation/planted_bugs.h"
#include "cuda/emulation/runtime.h"
#include "cuda/kernel_registry.h"
#include "schemas.h"

#ifndef CEM_OPS_SOURCE_HASH
#define CEM_OPS_SOURCE_HASH "unknown"
#endif
#ifndef CEM_OPS_TORCH_VERSION
#define CEM_OPS_TORCH_VERSION "unknown"
#endif
#ifndef CEM_EMULATION_CXX
#define CEM_EMULATION_CXX ""
#define CEM_EMULATION_KERNEL_FLAGS ""
#define CEM_EMULATION_CUDA_INCLUDE ""
#endif

TORCH_LIBRARY(cem_emulated, m) {
  m.def(cem::schemas::kAttentionFwd);
  m.def(cem::schemas::kAttentionBwd);
  m.def(cem::schemas::kAttentionCached);
}

namespace {

PyObject* fail(const std::string& message) {
  PyErr_SetString(PyExc_ValueError, message.c_str());
  return nullptr;
}

template <class Choice>
struct Named {
  const char* name;
  Choice value;
};

// The choice named `text`, or a ValueError listing the names and false.
template <class Choice, size_t N>
bool parse_choice(const char* what, const std::string& text, const Named<Choice> (&choices)[N], Choice* out) {
  std::string names;
  for (const auto& choice : choices) {
    if (text == choice.name) {
      *out = choice.value;
      return true;
    }
    names += (names.empty() ? "'" : ", '") + std::string(choice.name) + "'";
  }
  fail(std::string(what) + " must be one of " + names + ", got '" + text + "'");
  return false;
}

// configure(block_order: str, seed: int, check_hazards: bool, workers: int)
PyObject* configure(PyObject*, PyObject* args) {
  const char* order = nullptr;
  unsigned long long seed = 0;
  int hazards = 1, workers = 1;
  if (!PyArg_ParseTuple(args, "sKpi", &order, &seed, &hazards, &workers)) {
    return nullptr;
  }
  if (workers < 1 || workers > 16) {
    return fail("workers must be between 1 and 16, got " + std::to_string(workers));
  }
  cem::emu::Config config;
  static const Named<cem::emu::BlockOrder> orders[] = {{"sequential", cem::emu::BlockOrder::kSequential},
                                                       {"reversed", cem::emu::BlockOrder::kReversed},
                                                       {"shuffled", cem::emu::BlockOrder::kShuffled}};
  if (!parse_choice("block_order", order, orders, &config.block_order)) {
    return nullptr;
  }
  config.seed = seed;
  config.check_hazards = hazards != 0;
  config.workers = workers;
  cem::emu::set_config(config);
  Py_RETURN_NONE;
}

// set_fault(kind: str, file_suffix: str, line: int): drop or diverge one synchronisation site.
PyObject* set_fault(PyObject*, PyObject* args) {
  const char* kind = nullptr;
  const char* file = nullptr;
  int line = 0;
  if (!PyArg_ParseTuple(args, "ssi", &kind, &file, &line)) {
    return nullptr;
  }
  cem::emu::FaultPlan plan;
  static const Named<cem::emu::Fault> faults[] = {{"none", cem::emu::Fault::kNone},
                                                  {"drop_barrier", cem::emu::Fault::kDropBarrier},
                                                  {"drop_syncwarp", cem::emu::Fault::kDropSyncwarp},
                                                  {"divergent_barrier", cem::emu::Fault::kDivergentBarrier}};
  if (!parse_choice("fault", kind, faults, &plan.fault)) {
    return nullptr;
  }
  plan.file_suffix = file;
  plan.line = line;
  cem::emu::set_fault(plan);
  Py_RETURN_NONE;
}

// plant(name: str): a bug in the attention kernels' launch parameters (planted_bugs.h).
PyObject* plant(PyObject*, PyObject* arg) {
  const char* text = PyUnicode_AsUTF8(arg);
  if (text == nullptr) {
    return nullptr;
  }
  static const Named<cem::cuda::PlantedBug> bugs[] = {{"none", cem::cuda::PlantedBug::kNone},
                                                      {"extra_key_row", cem::cuda::PlantedBug::kExtraKeyRow},
                                                      {"force_vector_loads", cem::cuda::PlantedBug::kForceVectorLoads}};
  cem::cuda::PlantedBug bug;
  if (!parse_choice("planted bug", text, bugs, &bug)) {
    return nullptr;
  }
  cem::cuda::set_planted_bug(bug);
  Py_RETURN_NONE;
}

// sync_sites() -> [(kernel, kind, file, line)]: every barrier and __syncwarp reached so far.
PyObject* sync_sites(PyObject*, PyObject*) {
  const auto sites = cem::emu::observed_sync_sites();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(sites.size()));
  if (list == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < sites.size(); ++i) {
    const auto& s = sites[i];
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i),
                    Py_BuildValue("(sssi)", s.kernel.c_str(), s.kind.c_str(), s.file.c_str(), s.line));
  }
  return list;
}

// stats() -> dict of counters since reset_stats().
PyObject* stats(PyObject*, PyObject*) {
  const auto s = cem::emu::stats();
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "launches", s.launches, "blocks", s.blocks, "threads", s.threads,
                       "context_switches", s.context_switches, "checked_accesses", s.checked_accesses);
}

PyObject* reset_stats(PyObject*, PyObject*) {
  cem::emu::reset_stats();
  Py_RETURN_NONE;
}

// settings() -> (block_order, seed, check_hazards, workers): the calling host thread's.
PyObject* settings(PyObject*, PyObject*) {
  static const char* const orders[] = {"sequential", "reversed", "shuffled"};
  const auto c = cem::emu::config();
  return Py_BuildValue("(sKOi)", orders[static_cast<int>(c.block_order)], static_cast<unsigned long long>(c.seed),
                       c.check_hazards ? Py_True : Py_False, c.workers);
}

PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(block_order, seed, check_hazards, workers): this host thread's"},
    {"settings", settings, METH_NOARGS, "settings() -> (block_order, seed, check_hazards, workers): this host thread's"},
    {"set_fault", set_fault, METH_VARARGS, "set_fault(kind, file_suffix, line)"},
    {"plant", plant, METH_O, "plant(name)"},
    {"sync_sites", sync_sites, METH_NOARGS, "sync_sites() -> [(kernel, kind, file, line)]"},
    {"stats", stats, METH_NOARGS, "stats() -> dict"},
    {"reset_stats", reset_stats, METH_NOARGS, "reset_stats()"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C_emulated(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emulated",
                                   "cem_ops' CUDA attention kernels and glue, emulated on the CPU", -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  const auto& device = cem::emu::device_properties();
  if (PyModule_AddStringConstant(module, "source_hash", CEM_OPS_SOURCE_HASH) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", CEM_OPS_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "device", device.name) < 0 ||
      PyModule_AddStringConstant(module, "cxx_compiler", CEM_EMULATION_CXX) < 0 ||
      PyModule_AddStringConstant(module, "kernel_flags", CEM_EMULATION_KERNEL_FLAGS) < 0 ||
      PyModule_AddStringConstant(module, "cuda_include_dir", CEM_EMULATION_CUDA_INCLUDE) < 0 ||
      PyModule_AddStringConstant(module, "cuda_attention_kernels", cem::cuda::describe_attention_kernels().c_str()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
