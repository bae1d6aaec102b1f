// attention_decode.cu for the host compiler, in the emulated backend (cem_ops._C_emulated).
#include "cuda/attention_decode.cu"
