"""torch.nn modules built on the cem ops, and Llama-style baselines for comparison."""

from .alibi import alibi_slopes
from .attention import CEMAttention
from .block import CEMBlock
from .cache import AttentionCache, KVCache
from .llama import LlamaAttention, LlamaBlock, SwiGLU
from .mlp import CEMMLP
from .preconditioner import Preconditioner

__all__ = [
    "AttentionCache",
    "CEMAttention",
    "CEMBlock",
    "CEMMLP",
    "KVCache",
    "LlamaAttention",
    "LlamaBlock",
    "Preconditioner",
    "SwiGLU",
    "alibi_slopes",
]
