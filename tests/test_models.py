"""Tests of python/cem_lm: every model variant runs forward and backward, a tiny training run
learns, checkpoints resume exactly, the data split is deterministic, and parameter counts add up.

python/ is not a package on the import path, so this file puts it there itself (no conftest,
which other test files share).
"""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import pytest  # noqa: E402
import torch  # noqa: E402

from cem_lm import LanguageModel, ModelConfig, TrainConfig, parameter_counts  # noqa: E402
from cem_lm.errors import RunError  # noqa: E402
from cem_lm.data import SPLITS, eval_windows, list_source_files, load_corpus, split_of  # noqa: E402
from cem_lm.trainer import train_run  # noqa: E402
from cem_lm.train import build_parser, configs_from_args  # noqa: E402
from cem_lm.variants import VARIANTS  # noqa: E402

SMALL = ModelConfig(dim=32, layers=2, heads=4, seq_len=16)
QUICK = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2,
                    test_tokens=256, checkpoint_every=3)

EXTRA_CONFIGS = {
    "attn_t4_mlp_t4": dict(attention="cem", mlp="cem", attn_steps=4, mlp_steps=4),
    "cem_no_positions": dict(attention="cem", position="none"),
    "llama_no_positions": dict(position="none"),
    "full_cem_precond_dlr_t2": dict(attention="cem", mlp="cem_wide", precond="diag_lowrank", attn_steps=2, mlp_steps=2),
    "reuse_block": dict(attention="cem", mlp="cem", reuse="block"),
    "tied_head": dict(tie_embeddings=True),
}
ALL_CONFIGS = {v.name: v.overrides for v in VARIANTS} | EXTRA_CONFIGS


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """These models are tiny: one thread is fastest, and two threads on a busy two-core machine run
    100 times slower (each op waits for the descheduled thread). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    model = LanguageModel(replace(SMALL, **ALL_CONFIGS[name]))
    tokens = torch.randint(0, 256, (2, SMALL.seq_len + 1))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, SMALL.seq_len, 256)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_model_is_causal():
    """Changing a later byte must not change earlier logits (CEM recursion included)."""
    torch.manual_seed(0)
    model = LanguageModel(replace(SMALL, attention="cem", mlp="cem", attn_steps=2, mlp_steps=2))
    tokens = torch.randint(0, 256, (1, SMALL.seq_len))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tiny_training_run_lowers_loss(corpus, tmp_path):
    cfg = TrainConfig(steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=30, eval_batches=4,
                      test_tokens=2048, checkpoint_every=60)
    results = train_run(replace(SMALL, attention="cem", mlp="cem"), cfg, tmp_path, device="cpu", corpus=corpus,
                        show_progress=False, plot=False)
    train = results["history"]["train_bpb"]
    assert results["finished"] and results["step"] == 60
    assert sum(train[-10:]) / 10 < sum(train[:5]) / 5 - 1.0  # bits per byte, from about 8 at the start
    assert results["test_bpb"] < 7.0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "checkpoint.pt").is_file()


def test_resume_continues_identically(corpus, tmp_path):
    model_cfg = replace(SMALL, attention="cem", diag="per_head", precond="diag_lowrank", attn_steps=2)
    whole = train_run(model_cfg, QUICK, tmp_path / "whole", device="cpu", corpus=corpus, show_progress=False,
                      plot=False)
    first = train_run(model_cfg, QUICK, tmp_path / "split", device="cpu", corpus=corpus, stop_at=4,
                      show_progress=False, plot=False)
    assert not first["finished"] and first["step"] == 4 and "test_bpb" not in first
    # The resumed run takes its config from the checkpoint, whatever is passed in.
    resumed = train_run(SMALL, TrainConfig(), tmp_path / "split", device="cpu", corpus=corpus, resume=True,
                        show_progress=False, plot=False)
    assert resumed["model_config"] == whole["model_config"]
    assert resumed["history"]["train_bpb"] == whole["history"]["train_bpb"]
    assert resumed["history"]["val_bpb"] == whole["history"]["val_bpb"]
    assert resumed["test_bpb"] == whole["test_bpb"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_without_checkpoint_is_an_error(corpus, tmp_path):
    with pytest.raises(RunError, match="no checkpoint"):
        train_run(SMALL, QUICK, tmp_path, device="cpu", corpus=corpus, resume=True, show_progress=False)


def test_data_split_is_deterministic(corpus):
    again = load_corpus()
    assert again.manifest == corpus.manifest
    for split in SPLITS:
        assert torch.equal(again.tokens[split], corpus.tokens[split])
    files = {s: [f["path"] for f in corpus.manifest["splits"][s]["files"]] for s in SPLITS}
    all_files = sorted(p for s in SPLITS for p in files[s])
    assert all_files == list_source_files(Path(corpus.manifest["stdlib_root"]))
    assert not any(set(Path(p).parts) & {"test", "tests", "site-packages"} for p in all_files)
    for split in SPLITS:
        assert files[split] == sorted(files[split]) and all(split_of(p) == split for p in files[split])
        assert len(corpus.manifest["splits"][split]["sha256"]) == 64


def test_eval_windows_are_fixed_and_disjoint(corpus):
    windows = eval_windows(corpus.tokens["val"], 64, 100)
    assert windows.shape == (100, 65)
    assert torch.equal(windows, eval_windows(corpus.tokens["val"], 64, 100))
    starts = [corpus.tokens["val"].numpy().tobytes().find(w.to(torch.uint8).numpy().tobytes()) for w in windows[:3]]
    assert starts == sorted(set(starts))


def test_cem_attention_has_half_the_projection_params():
    dim, layers = 64, 3
    base = ModelConfig(dim=dim, layers=layers, heads=4)
    llama = parameter_counts(LanguageModel(base))
    cem = parameter_counts(LanguageModel(replace(base, attention="cem", diag="none")))
    assert llama["attention"] == layers * 4 * dim * dim
    # w_q and w_k only (V = K, W_O = W_Q^T), plus one step size per layer.
    assert cem["attention"] == llama["attention"] // 2 + layers
    shared = parameter_counts(LanguageModel(replace(base, attention="cem", diag="shared", attn_steps=2)))
    assert shared["attention"] == llama["attention"] // 2 + layers * (dim + 2)


def test_parameter_counts_add_up():
    cfg = ModelConfig(dim=48, layers=2, heads=3)
    for overrides in ({}, {"mlp": "cem"}, {"mlp": "cem_wide"}, {"tie_embeddings": True}):
        model = LanguageModel(replace(cfg, **overrides))
        counts = parameter_counts(model)
        assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
        assert counts["norms"] == (2 * cfg.layers + 1) * cfg.dim
    swiglu = parameter_counts(LanguageModel(cfg))["mlp"]
    assert parameter_counts(LanguageModel(replace(cfg, mlp="cem_wide")))["mlp"] == swiglu + cfg.layers  # + step sizes
    assert parameter_counts(LanguageModel(replace(cfg, tie_embeddings=True)))["head"] == 0


def test_cli_rejects_bad_choices():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--attention", "gpt"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--attn-steps", "3"])
    with pytest.raises(ValueError, match="rope"):
        configs_from_args(parser.parse_args(["--out", "x", "--attention", "cem", "--position", "rope"]))
    args = parser.parse_args(["--out", "x", "--variant", "full_cem_t2", "--steps", "7"])
    model_cfg, train_cfg = configs_from_args(args)
    assert (model_cfg.attention, model_cfg.mlp, model_cfg.attn_steps, train_cfg.steps) == ("cem", "cem", 2, 7)


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    from cem_lm.plots import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    history = {"train_step": [1], "train_bpb": [8.0], "val_step": [1], "val_bpb": [8.0]}
    assert plot_run(history, tmp_path / "a.png", "t") is False
    assert "skipping plots" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_configs_reject_values_that_cannot_train():
    for overrides, message in (({"steps": 0}, "steps must be >= 1"), ({"lr": float("nan")}, "lr must be"),
                               ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
                               ({"test_tokens": 0}, "test_tokens must be")):
        with pytest.raises(ValueError, match=message):
            replace(QUICK, **overrides)
    for overrides, message in (({"heads": 0}, "heads must be >= 1"), ({"seq_len": 0}, "seq_len must be >= 1")):
        with pytest.raises(ValueError, match=message):
            replace(SMALL, **overrides)


def test_user_errors_are_run_errors(corpus, tmp_path):
    with pytest.raises(RunError, match="longer than the"):
        train_run(replace(SMALL, seq_len=10**9), QUICK, tmp_path / "long", device="cpu", corpus=corpus,
                  show_progress=False, plot=False)
    with pytest.raises(RunError, match="not a device"):
        train_run(SMALL, QUICK, tmp_path / "dev", device="banana", corpus=corpus, show_progress=False, plot=False)
    with pytest.raises(RunError, match="--test-tokens 5 is less than one window"):  # found before training
        train_run(SMALL, replace(QUICK, test_tokens=5), tmp_path / "test", device="cpu", corpus=corpus,
                  show_progress=False, plot=False)
    assert not (tmp_path / "test" / "checkpoint.pt").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(RunError, match="not a readable checkpoint"):
        train_run(SMALL, QUICK, bad, device="cpu", corpus=corpus, resume=True, show_progress=False, plot=False)


def test_cli_does_not_overwrite_a_run_silently(corpus, tmp_path, capsys):
    from cem_lm.train import main

    out = tmp_path / "run"
    train_run(SMALL, QUICK, out, device="cpu", corpus=corpus, show_progress=False, plot=False)
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--quiet", "--no-plot"])
    assert "already holds a run" in capsys.readouterr().err


def test_grid_refuses_runs_with_another_configuration(corpus, tmp_path):
    from cem_lm.experiments import conflicting_runs, run_configs

    runs = tmp_path / "runs"
    model_cfg, train_cfg = run_configs("tiny", "llama", 0, {"steps": 2})
    train_run(replace(model_cfg, seq_len=16), train_cfg, runs / "llama" / "seed0", device="cpu", corpus=corpus,
              stop_at=1, show_progress=False, plot=False)
    assert conflicting_runs([("llama", 0)], "tiny", {"steps": 2}, runs) == ["llama/seed0"]
    train_run(model_cfg, train_cfg, runs / "llama" / "seed0", device="cpu", corpus=corpus, stop_at=1,
              show_progress=False, plot=False)
    assert conflicting_runs([("llama", 0)], "tiny", {"steps": 2}, runs) == []
    assert conflicting_runs([("llama", 0)], "tiny", {"steps": 3}, runs) == ["llama/seed0"]


def test_first_interrupt_asks_to_stop_second_aborts():
    import os

    from cem_lm.interrupt import StopOnInterrupt

    found = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    with StopOnInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is found


@pytest.mark.parametrize("handler", [signal.SIG_IGN, signal.SIG_DFL, lambda signum, frame: None],
                         ids=["ignored", "default", "custom"])
def test_interrupt_guard_restores_the_handler_it_found(handler):
    from cem_lm.interrupt import StopOnInterrupt

    saved = signal.signal(signal.SIGINT, handler)
    try:
        with StopOnInterrupt():
            assert signal.getsignal(signal.SIGINT) is not handler
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, saved)
