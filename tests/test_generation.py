"""Sampling from the language models of python/cem_lm: cached generation equals recomputing the
whole sequence for every token, token for token, for every attention kind; generate.py works
from a trained checkpoint.

python/ is not a package on the import path, so this file puts it there itself.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import pytest  # noqa: E402
import torch  # noqa: E402

from cem_lm import LanguageModel, ModelConfig, TrainConfig  # noqa: E402
from cem_lm.data import load_corpus  # noqa: E402
from cem_lm.generate import main as generate_main  # noqa: E402
from cem_lm.sampling import GenerationStats, Sampling, generate  # noqa: E402
from cem_lm.trainer import train_run  # noqa: E402
from cem_ops.testing import cuda_emulation, emulation_available  # noqa: E402

SMALL = ModelConfig(dim=32, layers=2, heads=4, seq_len=16)
KINDS = {
    "llama": dict(),
    "llama_alibi": dict(position="alibi"),
    "cem_none": dict(attention="cem", mlp="cem", diag="none"),
    "cem_shared_t2": dict(attention="cem", mlp="cem", diag="shared", attn_steps=2, mlp_steps=2),
    "cem_per_head_precond": dict(attention="cem", diag="per_head", precond="diag_lowrank", attn_steps=4),
    "cem_reuse_attention": dict(attention="cem", reuse="attention"),
    "cem_reuse_block": dict(attention="cem", mlp="cem", reuse="block", reuse_times=3),
}


def trained_like(cfg: ModelConfig, rng: torch.Generator) -> LanguageModel:
    """Random weights away from init (the diagonals start at zero), so every term matters."""
    model = LanguageModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=rng))
            if p.dim() == 1 and p.shape[0] <= 4:  # step sizes
                p.abs_().clamp_(0.2, 1.0)
    return model.double()


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_greedy_equals_recomputation(kind, rng):
    model = trained_like(replace(SMALL, **KINDS[kind]), rng)
    prompt = torch.randint(0, 256, (3, 5), generator=rng)
    cached = generate(model, prompt, 24, Sampling(greedy=True))
    recomputed = generate(model, prompt, 24, Sampling(greedy=True), use_cache=False)
    assert cached.shape == (3, 29)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :5], prompt)


@pytest.mark.emulation
def test_cached_greedy_equals_recomputation_on_the_cuda_path(rng):
    if not emulation_available():
        pytest.skip("cem_ops was built without the emulated CUDA backend (needs the CUDA headers)")
    model = trained_like(replace(SMALL, **KINDS["cem_shared_t2"]), rng).float()
    prompt = torch.randint(0, 256, (2, 6), generator=rng)
    with cuda_emulation():
        cached = generate(model, prompt, 12, Sampling(greedy=True))
        recomputed = generate(model, prompt, 12, Sampling(greedy=True), use_cache=False)
    assert torch.equal(cached, recomputed)


def test_sampling_is_seeded_and_top_k_one_is_greedy(rng):
    model = trained_like(replace(SMALL, **KINDS["cem_shared_t2"]), rng)
    prompt = torch.randint(0, 256, (2, 4), generator=rng)
    draw = Sampling(temperature=0.7, top_k=10)
    first = generate(model, prompt, 10, draw, generator=torch.Generator().manual_seed(1))
    again = generate(model, prompt, 10, draw, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    top1 = generate(model, prompt, 10, Sampling(top_k=1), generator=torch.Generator().manual_seed(2))
    assert torch.equal(top1, generate(model, prompt, 10, Sampling(greedy=True)))
    stats = GenerationStats()
    generate(model, prompt, 10, draw, stats=stats)
    assert stats.rows == 2 and stats.new_tokens == 10 and stats.tokens_per_second > 0


def test_sampling_rejects_bad_settings():
    for temperature in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            Sampling(temperature=temperature)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        Sampling(top_k=0)


def test_generate_cli_from_a_trained_checkpoint(tmp_path, capsys):
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=8, eval_batches=2,
                      test_tokens=256, checkpoint_every=8)
    model_cfg = replace(SMALL, attention="cem", mlp="cem", attn_steps=2)
    train_run(model_cfg, cfg, tmp_path, device="cpu", corpus=load_corpus(), show_progress=False, plot=False)
    args = [str(tmp_path), "--prompt", "def ", "--new-tokens", "20", "--samples", "2", "--temperature", "0.8",
            "--top-k", "20", "--seed", "3"]
    assert generate_main(args) == 0
    out, err = capsys.readouterr()
    samples = [line for line in out.splitlines() if line.startswith("def ")]
    assert len(samples) == 2 and "--- sample 2" in out
    assert "tokens/s" in err and "cached" in err
    assert generate_main(args + ["--no-cache", "--quiet"]) == 0
    assert capsys.readouterr().out == out  # the same seed: the same text, cached or not


def test_generate_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        generate_main([str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert "no checkpoint at" in capsys.readouterr().err
    for bad in (["--device", "bogus"], ["--greedy", "--top-k", "3"], ["--seed", "-1"], ["--new-tokens", "-1"]):
        with pytest.raises(SystemExit) as stop:
            generate_main([str(tmp_path)] + bad)
        assert stop.value.code == 2
