#include "ops/cuda_emulation.h"

namespace cem {
namespace {

thread_local bool emulating = false;

}  // namespace

bool cuda_emulation_enabled() { return emulating; }

bool set_cuda_emulation(bool enabled) {
  const bool previous = emulating;
  emulating = enabled;
  return previous;
}

}  // namespace cem
