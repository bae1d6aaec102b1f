"""The main job on a fresh machine: show what was built, check the ops against the float64
reference on the device at hand, and print a small throughput table.

    bash scripts/demo.sh          (installs, builds, then runs this)
    python benchmarks/demo.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import cem_ops  # noqa: E402
from cem_ops import machine  # noqa: E402
from cem_ops import reference  # noqa: E402
from cem_ops.testing import AttentionCase, MLPCase, TOLERANCES, relative_error  # noqa: E402


def check(device: str) -> bool:
    """Forward and gradient error against the float64 reference for a spread of options."""
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [torch.bfloat16])
    cases = [
        AttentionCase(batch=2, seq=67, dim=48, heads=3, head_dim=16, steps=1, diag="none", alibi=False),
        AttentionCase(batch=2, seq=130, dim=64, heads=4, head_dim=16, steps=2, diag="shared"),
        AttentionCase(batch=1, seq=33, dim=32, heads=2, head_dim=16, steps=3, diag="per_head", precond_rank=0),
    ]
    generator = torch.Generator().manual_seed(0)
    ok = True
    print(f"{'op':<10} {'case':<44} {'dtype':<9} {'fwd err':>9} {'grad err':>9}  verdict")
    for dtype in dtypes:
        for case in cases + [MLPCase(seq=45, dim=40, hidden=96, steps=2)]:
            case = case.with_(dtype=dtype, device=device)
            inputs = case.make(generator, requires_grad=True)
            ref_inputs = inputs.to(torch.float64, requires_grad=True)
            is_mlp = isinstance(case, MLPCase)
            op, ref = (torch.ops.cem.mlp, reference.mlp) if is_mlp else (torch.ops.cem.attention, reference.attention)
            out, want = op(*inputs.args()), ref(*ref_inputs.args())
            grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(device)
            got = torch.autograd.grad(out, inputs.differentiable(), grad_out.to(dtype))
            expected = torch.autograd.grad(want, ref_inputs.differentiable(), grad_out)
            fwd_err = relative_error(out, want)
            grad_err = max(relative_error(g, e) for g, e in zip(got, expected))
            passed = fwd_err < TOLERANCES[dtype] and grad_err < 10 * TOLERANCES[dtype]
            ok &= passed
            name = "mlp" if is_mlp else "attention"
            label = (f"N{case.seq} D{case.dim} T{case.steps} {case.activation}" if is_mlp else
                     f"N{case.seq} D{case.dim} H{case.heads} T{case.steps} diag={case.diag}")
            print(f"{name:<10} {label:<44} {str(dtype)[6:]:<9} {fwd_err:9.1e} {grad_err:9.1e}  {'ok' if passed else 'FAIL'}")
    return ok


def throughput(device: str) -> None:
    if device == "cuda":
        configs = [harness.Config(4, n, 1024, 8, 128, 2, "shared", True, torch.bfloat16, "cuda") for n in (1024, 4096)]
        impls = ("reference", "llama", "ours")
    else:
        configs = [harness.Config(1, n, 256, 4, 64, 2, "shared", True, torch.float32, "cpu") for n in (256, 1024)]
        impls = ("reference", "ours")
    print(f"\n{'mode':<17} {'config':<58} {'impl':<10} {'median ms':>10} {'TFLOP/s':>9}")
    for config in configs:
        for mode in harness.MODES:
            for impl in impls:
                run = harness.make_call(impl, config, mode, torch.Generator().manual_seed(0))
                run()
                times = []
                for _ in range(5 if device == "cuda" else 3):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                median = statistics.median(times)
                tflops = config.flops(impl, mode) / median / 1e12
                print(f"{mode:<17} {config.label:<58} {impl:<10} {median * 1e3:10.2f} {tflops:9.4f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="cem_ops demo: build info, correctness, throughput")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    info = cem_ops.build_info()
    print(f"cem_ops {cem_ops.__version__} on torch {info['torch_version']}, CUDA kernels built: {info['with_cuda']}")
    for op, backends in info["kernels"].items():
        print(f"  {op:<14} {backends}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else machine.cpu_model()
    print(f"\nChecking the ops against the float64 reference on {args.device} ({device_name}):")
    ok = check(args.device)
    print(f"\nThroughput on {args.device} (useful FLOPs as in benchmarks/harness.py):")
    throughput(args.device)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
