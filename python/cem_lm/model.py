"""The byte-level decoder-only language model and its parameter count per component."""

from __future__ import annotations

from torch import Tensor, nn

from .config import VOCAB_SIZE, ModelConfig
from .layers import Block


class LanguageModel(nn.Module):
    """Embedding, L pre-norm blocks, final RMSNorm, linear head over the 256 byte values.

    The head is untied from the embedding by default (``tie_embeddings``); at vocabulary 256 it is
    a small share of the parameters either way.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, VOCAB_SIZE, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, cache: list | None = None) -> Tensor:
        """(B, N) int64 byte values -> (B, N, 256) next-byte logits. With a cache from
        new_cache(), tokens are the next chunk of each row and the logits equal those positions'
        logits over the whole sequence (inference only)."""
        r = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            r = block(r, None if cache is None else cache[i])
        return self.head(self.norm(r))

    def new_cache(self, batch_size: int, capacity: int) -> list:
        """Every attention layer's cache of ``capacity`` positions (one per pass under reuse)."""
        return [block.new_caches(batch_size, capacity) for block in self.blocks]


def parameter_counts(model: LanguageModel) -> dict[str, int]:
    """Trainable parameters per component: embedding, attention, mlp, norms, head, total.

    Attention and MLP include their diagonals, preconditioners and step sizes; a tied head counts
    as 0 (its weight is the embedding's); each shared tensor is counted once.
    """
    owner: dict[int, str] = {}

    def claim(module: nn.Module, component: str):
        for p in module.parameters():
            owner.setdefault(id(p), component)

    claim(model.embed, "embedding")
    for module in model.modules():
        if isinstance(module, nn.RMSNorm):
            claim(module, "norms")
    for block in model.blocks:
        claim(block.attention.layer, "attention")
        claim(block.mlp.layer, "mlp")
    claim(model.head, "head")

    counts = dict.fromkeys(("embedding", "attention", "mlp", "norms", "head"), 0)
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            counts[owner[id(p)]] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
