"""Sampling text from a language model: greedy, temperature and top-k, with a cache of the
attention layers' earlier positions (each new token costs one position's work) or by recomputing
the whole sequence for every token (the reference the cached path must equal)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .model import LanguageModel


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: the argmax when greedy, else from
    softmax(logits / temperature) restricted to the top_k most likely (None: all)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        if not self.greedy and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and > 0 (or use greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def next_tokens(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, V) float logits -> (B,) int64 tokens."""
        if self.greedy:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # per row
    rows: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens of all rows per second of decoding (the prefill excluded)."""
        return self.rows * max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: LanguageModel, prompt: Tensor, new_tokens: int, sampling: Sampling = Sampling(), *,
             use_cache: bool = True, generator: torch.Generator | None = None,
             on_token: Callable[[int, Tensor], None] | None = None,
             stats: GenerationStats | None = None) -> Tensor:
    """Extend each row of ``prompt`` (B, P) int64 by ``new_tokens`` tokens; returns (B, P + new).

    With ``use_cache`` the prompt is prefilled in one chunk and then each token is one decoding
    step against the cache; without it every token reruns the model on the whole sequence.
    ``on_token(i, tokens)`` is called with each new (B,) token column.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (B, P) tokens with P >= 1, got shape {tuple(prompt.shape)}")
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    was_training = model.training
    model.eval()
    device = prompt.device
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens, stats.rows = prompt.shape[1], new_tokens, prompt.shape[0]
    tokens = prompt
    try:
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens) if use_cache and new_tokens else None
        start = time.perf_counter()
        step_input = prompt
        for i in range(new_tokens):
            logits = model(step_input, cache=cache) if cache is not None else model(tokens)
            token = sampling.next_tokens(logits[:, -1], generator)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            step_input = token[:, None]
            if i == 0:
                _synchronize(device)
                stats.prefill_seconds = time.perf_counter() - start
                start = time.perf_counter()
            if on_token is not None:
                on_token(i, token)
        _synchronize(device)
        if new_tokens > 1:
            stats.decode_seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return tokens
