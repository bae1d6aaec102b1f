"""What the tests, the benchmarks and the demo share: random inputs over the option space
(cases), tolerances against the float64 reference (tolerances), the correctness policy every
backend is held to (agreement), FLOP and memory counts (cost), and the CUDA kernels run on the
CPU (emulation)."""

from .agreement import assert_matches_reference, output_and_gradients
from .cases import AttentionCase, AttentionInputs, MLPCase, MLPInputs, OpInputs
from .cost import attention_flops, cpu_peak_bytes, llama_attention_flops
from .emulation import cuda_emulation, emulation_available
from .tolerances import (
    REFERENCE_ERROR_FACTOR,
    TOLERANCES,
    error_bound,
    low_precision_agrees,
    output_rounding_sensitivity,
    relative_error,
    rounding_sensitivity,
)

__all__ = [
    "AttentionCase",
    "AttentionInputs",
    "MLPCase",
    "MLPInputs",
    "OpInputs",
    "REFERENCE_ERROR_FACTOR",
    "TOLERANCES",
    "assert_matches_reference",
    "attention_flops",
    "cuda_emulation",
    "emulation_available",
    "cpu_peak_bytes",
    "error_bound",
    "llama_attention_flops",
    "low_precision_agrees",
    "output_rounding_sensitivity",
    "output_and_gradients",
    "relative_error",
    "rounding_sensitivity",
]
