"""python/train.py under torchrun on 2 CPU ranks (gloo): DDP and FSDP2 take the same steps as one
process with the whole batch, and a 2-rank checkpoint resumes on 1 rank as the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "python" / "train.py"
# A tiny CEM model; 4 rows per step, 2 per rank.
RUN = ["--steps", "4", "--batch-size", "4", "--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32",
       "--attention", "cem", "--attn-steps", "2", "--diag", "shared", "--mlp", "cem", "--eval-every", "2",
       "--eval-batches", "1", "--test-tokens", "2048", "--checkpoint-every", "1", "--seed", "7",
       "--device", "cpu", "--threads", "1", "--no-plot", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(out: Path, *extra: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    result = subprocess.run([*launcher, str(TRAIN), "--out", str(out), *RUN, *extra],
                            capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def outcome(out: Path) -> tuple[dict, dict]:
    results = json.loads((out / "results.json").read_text())
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    return results, state["model"]


def assert_same_run(got: Path, expected: Path) -> None:
    (results, params), (ref_results, ref_params) = outcome(got), outcome(expected)
    assert results["step"] == ref_results["step"] and results["finished"]
    losses, ref_losses = torch.tensor(results["history"]["train_bpb"]), torch.tensor(ref_results["history"]["train_bpb"])
    assert losses.shape == ref_losses.shape
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    assert results["test_bpb"] == pytest.approx(ref_results["test_bpb"], rel=1e-5)
    assert sorted(params) == sorted(ref_params)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    train(out)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_take_the_single_process_steps(parallel, single_process_run, tmp_path):
    result = train(tmp_path / "run", "--parallel", parallel, ranks=2)
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["finished"]  # printed once: by rank 0
    assert result.stdout.count('"finished"') == 1
    results, _ = outcome(tmp_path / "run")
    assert (results["parallel"], results["world_size"]) == (parallel, 2)
    assert_same_run(tmp_path / "run", single_process_run)


def test_a_two_rank_checkpoint_resumes_on_one_rank(single_process_run, tmp_path):
    out = tmp_path / "run"
    train(out, "--parallel", "fsdp2", "--stop-at", "2", ranks=2)
    stopped, _ = outcome(out)
    assert stopped["step"] == 2 and not stopped["finished"]
    train(out, "--resume")
    assert_same_run(out, single_process_run)


def test_parallel_needs_torchrun(tmp_path):
    result = train(tmp_path / "run", "--parallel", "ddp", check=False)
    assert result.returncode == 2
    assert "--parallel ddp runs under torchrun" in result.stderr


def test_an_unwritable_run_directory_stops_every_rank_with_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = train(tmp_path / "file" / "run", "--parallel", "fsdp2", ranks=2, check=False)
    assert result.returncode != 0
    assert result.stderr.count("cannot write to") == 2  # each rank says it, neither reaches training
    assert "Connection closed" not in result.stderr and "all_gather" not in result.stderr


def test_global_batch_must_divide_over_the_ranks(tmp_path):
    result = train(tmp_path / "run", "--parallel", "ddp", "--batch-size", "3", ranks=2, check=False)
    assert result.returncode != 0
    assert "--batch-size 3 is the global batch and must divide evenly over 2 ranks" in result.stderr
