// Every cem operator schema, defined once (the strings are in schemas.h). Implementations
// register where they live: composites in ops/, CPU kernels in cpu/, CUDA kernels in cuda/, and
// the Python fallback (the reference) for backends without a compiled kernel.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(cem, m) {
  m.def(cem::schemas::kAttention);
  m.def(cem::schemas::kAttentionEnergy);
  m.def(cem::schemas::kMlp);
  m.def(cem::schemas::kMlpEnergy);
  m.def(cem::schemas::kAttentionCached);
  m.def(cem::schemas::kAttentionFwd);
  m.def(cem::schemas::kAttentionBwd);
  m.def(cem::schemas::kMlpFwd);
  m.def(cem::schemas::kMlpBwd);
}
