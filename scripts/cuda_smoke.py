"""Runs cem::attention forward + backward once per kernel path on small shapes, for
compute-sanitizer (memcheck, racecheck, synccheck): every dtype, both head-dim buckets with a
ragged head dim, every diagonal mode (two panels each), ALiBi and the full preconditioner; then
cem::attention_cached for a decoded token and a 9-row chunk against the rest of the sequence.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/cuda_smoke.py

Without the caching allocator every tensor is its own allocation, so memcheck sees accesses past
the end of any one of them. With --emulated the same paths run in the emulated CUDA backend on
CPU tensors; under AddressSanitizer that is the CPU's memcheck (exactly-sized allocations):

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
        ASAN_OPTIONS=detect_leaks=0 python scripts/cuda_smoke.py --emulated

Exits non-zero on a non-finite result or a failed kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys

import torch

try:
    import cem_ops  # the installed package (a wheel, or the checkout's editable install)
except ModuleNotFoundError:  # a checkout that was built in place but not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import cem_ops  # noqa: E402
from cem_ops.testing import AttentionCase, cuda_emulation  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def decode_once(inputs, chunk: int) -> torch.Tensor:
    """The last ``chunk`` positions against a cache of the others (lengths on the device)."""
    x, w_k = inputs.x.detach(), inputs.w_k.detach()
    cached = x.shape[1] - chunk
    out, _ = cem_ops.attention_cached(
        x[:, cached:], inputs.w_q.detach(), w_k, cache_keys=torch.einsum("bnd,hed->bnhe", x, w_k),
        cache_context=x if inputs.diag is not None else None,
        cache_lengths=torch.full((x.shape[0],), cached, device=x.device), diag=inputs.diag,
        alibi_slopes=inputs.alibi_slopes, precond_diag=inputs.precond_diag, precond_lowrank=inputs.precond_lowrank,
        step_size=inputs.step_size.detach(), scale=inputs.scale)
    return out


def run_once(dtype: torch.dtype, head_dim: int, diag: str, seq: int, device: str) -> None:
    case = AttentionCase(batch=1, seq=seq, dim=40, heads=2, head_dim=head_dim, steps=2, diag=diag, precond_rank=2,
                         dtype=dtype, device=device)
    inputs = case.make(torch.Generator().manual_seed(0), requires_grad=True)
    out = torch.ops.cem.attention(*inputs.args())
    grads = torch.autograd.grad(out, inputs.differentiable(), torch.randn_like(out))
    with torch.no_grad():
        decoded = [decode_once(inputs, chunk) for chunk in (1, 9)]
    if device == "cuda":
        torch.cuda.synchronize()
    bad = [i for i, t in enumerate((out, *grads, *decoded)) if not torch.isfinite(t).all()]
    if bad:
        raise SystemExit(f"non-finite results {bad} for {dtype} Dh={head_dim} diag={diag} N={seq}")
    print(f"ok {str(dtype):15s} Dh={head_dim:3d} diag={diag:8s} N={seq}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    parser.add_argument("--head-dims", default="64,59,128,100")
    parser.add_argument("--diags", default="none,shared,per_head")
    parser.add_argument("--seq", type=int, default=70, help="query rows (70: two tiles, the second ragged)")
    parser.add_argument("--emulated", action="store_true", help="run on CPU tensors in the emulated CUDA backend")
    parser.add_argument("--plant", default="none", help="with --emulated: a planted bug (cem_ops._C_emulated.plant)")
    args = parser.parse_args()
    os.environ.setdefault("CEM_OPS_PANEL_ROWS", "64")  # two diagonal panels at N = 70
    print(cem_ops.build_info(), flush=True)
    context = cuda_emulation() if args.emulated else contextlib.nullcontext()
    with context as backend:
        if args.emulated:
            backend.plant(args.plant)
        for name, head_dim, diag in itertools.product(
            args.dtypes.split(","), [int(d) for d in args.head_dims.split(",")], args.diags.split(",")
        ):
            run_once(DTYPES[name], head_dim, diag, args.seq, "cpu" if args.emulated else "cuda")


if __name__ == "__main__":
    main()
