"""cem_lm: byte-level decoder-only language models built from cem_ops layers (CEM) or the
Llama-style baselines, with the data, training and experiment code that compares them."""

from .config import ModelConfig, TrainConfig
from .model import LanguageModel, parameter_counts

__all__ = ["LanguageModel", "ModelConfig", "TrainConfig", "parameter_counts"]
