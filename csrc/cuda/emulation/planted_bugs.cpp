#include "cuda/emulation/planted_bugs.h"

#include <atomic>

namespace cem::cuda {
namespace {

std::atomic<PlantedBug> current{PlantedBug::kNone};

}  // namespace

void set_planted_bug(PlantedBug bug) { current = bug; }
PlantedBug planted_bug() { return current; }

void plant_bugs(CemAttnParams& p) {
  switch (current.load()) {
    case PlantedBug::kNone: break;
    case PlantedBug::kExtraKeyRow: p.seq += 1; break;
    case PlantedBug::kForceVectorLoads: p.vec_loads = true; break;
  }
}

}  // namespace cem::cuda
