"""Times cem::attention on CUDA (forward, and forward + backward) and writes a JSON record.

    python benchmarks/bench_cuda_attention.py [--quick] [--out benchmarks/results]

Each configuration prints the median and 20/80 percentiles over CUDA-event timings (after
warm-up, inputs rotated among 3 sets so the L2 cannot hold them), achieved TFLOP/s on the minimal
FLOP count, and peak memory. Where the dense reference fits, it is timed too. The JSON carries the
GPU name, clocks and driver (nvidia-ml-py), torch, CUDA and the git commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cem_ops  # noqa: E402

FULL = [
    # (batch, seq, dim, heads, head_dim, steps, diag)
    (4, 2048, 1024, 16, 64, 1, "none"),
    (4, 2048, 1024, 16, 64, 1, "shared"),
    (4, 2048, 1024, 16, 64, 2, "shared"),
    (2, 4096, 2048, 16, 128, 1, "shared"),
    (2, 4096, 2048, 16, 128, 1, "none"),
    (1, 8192, 4096, 32, 128, 1, "shared"),
    (4, 2048, 1024, 16, 64, 1, "per_head"),
]
QUICK = [(2, 1024, 512, 8, 64, 1, "none"), (2, 1024, 512, 8, 64, 1, "shared"), (1, 2048, 1024, 8, 128, 2, "shared")]


def gpu_identity() -> dict:
    info = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info.update(
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            power_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        )
    except Exception as error:  # identity is a nicety; timing does not need it
        info["nvml"] = f"unavailable: {error}"
    return info


def git_commit() -> str:
    try:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        return subprocess.check_output(["git", "-C", root, "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def make_inputs(cfg, dtype, requires_grad):
    batch, seq, dim, heads, head_dim, steps, diag = cfg
    kw = dict(device="cuda", dtype=dtype)
    t = {
        "x": torch.randn(batch, seq, dim, **kw),
        "w_q": torch.randn(heads, head_dim, dim, **kw) * dim**-0.5,
        "w_k": torch.randn(heads, head_dim, dim, **kw) * dim**-0.5,
        "diag": None if diag == "none" else torch.randn(*((dim,) if diag == "shared" else (heads, dim)), **kw) * 0.1,
        "alibi_slopes": 2.0 ** (-8.0 * torch.arange(1, heads + 1, device="cuda") / heads).to(dtype),
        "precond_diag": torch.rand(dim, **kw) + 0.5,
        "precond_lowrank": None,
        "step_size": torch.full((steps,), 0.5, **kw),
    }
    if requires_grad:
        for k in ("x", "w_q", "w_k", "diag", "precond_diag", "step_size"):
            if t[k] is not None:
                t[k].requires_grad_()
    return t


def flops(cfg, backward: bool) -> float:
    """Minimal count: causal QK^T and PV per head, the shared diagonal's two N x N x D products
    (per head: H of each), the projections."""
    batch, seq, dim, heads, head_dim, steps, diag = cfg
    attn = 2 * seq * seq * head_dim * heads
    diag_terms = {"none": 0, "shared": 2 * seq * seq * dim, "per_head": 2 * seq * seq * dim * heads}[diag]
    proj = 4 * seq * dim * heads * head_dim
    fwd = batch * (steps * (attn + diag_terms + proj) + 2 * seq * dim * heads * head_dim)
    return fwd * (3.5 if backward else 1.0)  # backward ~2.5x forward


def time_it(fn, reps: int) -> list[float]:
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench(cfg, dtype, mode, impl, reps):
    sets = [make_inputs(cfg, dtype, mode == "fwd+bwd") for _ in range(3)]
    grad = torch.randn(cfg[0], cfg[1], cfg[2], device="cuda", dtype=dtype)
    fn_impl = cem_ops.attention if impl == "cem" else None

    def run(r):
        t = sets[r % 3]
        args = dict(diag=t["diag"], alibi_slopes=t["alibi_slopes"], precond_diag=t["precond_diag"],
                    precond_lowrank=t["precond_lowrank"], step_size=t["step_size"])
        if impl == "cem":
            out = fn_impl(t["x"], t["w_q"], t["w_k"], **args)
        else:
            out = cem_ops.reference.attention(t["x"], t["w_q"], t["w_k"], t["diag"], t["alibi_slopes"],
                                              t["precond_diag"], t["precond_lowrank"], t["step_size"])
        if mode == "fwd+bwd":
            out.backward(grad)

    torch.cuda.reset_peak_memory_stats()
    ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    with ctx:
        times = time_it(run, reps)
    q = statistics.quantiles(times, n=5)
    med = statistics.median(times)
    return {
        "median_ms": med, "p20_ms": q[0], "p80_ms": q[3],
        "tflops": flops(cfg, mode == "fwd+bwd") / (med * 1e-3) / 1e12,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "gpu": gpu_identity(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "git": git_commit(), "build": {k: str(v) for k, v in cem_ops.build_info().items()}, "results": [],
    }
    print(f"{'config (B,N,D,H,Dh,T,diag)':42s} {'mode':8s} {'impl':5s} {'median ms':>10s} {'p20-p80':>15s} {'TFLOP/s':>8s} {'GB':>6s}")
    for cfg in QUICK if args.quick else FULL:
        for mode in ("fwd", "fwd+bwd"):
            impls = ["cem"]
            dense_bytes = cfg[0] * cfg[3] * cfg[1] ** 2 * 4 * (8 if mode == "fwd+bwd" else 3)
            if dense_bytes < 0.5 * torch.cuda.get_device_properties(0).total_memory:
                impls.append("ref")
            for impl in impls:
                try:
                    r = bench(cfg, dtype, mode, impl, args.reps)
                except torch.cuda.OutOfMemoryError:
                    r = {"error": "out of memory"}
                torch.cuda.empty_cache()
                record["results"].append({"config": cfg, "mode": mode, "impl": impl, "dtype": args.dtype, **r})
                if "error" in r:
                    print(f"{str(cfg):42s} {mode:8s} {impl:5s} {r['error']}")
                else:
                    print(f"{str(cfg):42s} {mode:8s} {impl:5s} {r['median_ms']:10.3f} {r['p20_ms']:7.3f}-{r['p80_ms']:<7.3f}"
                          f" {r['tflops']:8.1f} {r['peak_mem_gb']:6.2f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"bench_cuda_attention_{args.dtype}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
