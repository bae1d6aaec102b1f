"""One training run over several processes started by torchrun: the process group, the model
wrapped for DDP or FSDP2, each rank's rows of the global batch, and full (world-size free) state
dicts for checkpoints, so that a run resumes with any number of ranks.

Every rank draws the same global batch from the same sampler and trains on its own rows, so a
run takes the same steps as one process with the whole batch, up to float32 reduction order.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import RunError

PARALLEL_MODES = ("none", "ddp", "fsdp2")
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def torchrun_world_size() -> int | None:
    """WORLD_SIZE as torchrun sets it, or None outside torchrun."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None


@dataclass(frozen=True)
class World:
    parallel: str = "none"
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"

    def device(self, device: torch.device) -> torch.device:
        """One CUDA device per rank on each node; the CPU is shared."""
        if self.distributed and device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise RunError(f"rank {self.rank} has local rank {self.local_rank}, but torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s): use --nproc-per-node <= that")
            return torch.device("cuda", self.local_rank)
        return device

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (checked to divide evenly by check_batch)."""
        per_rank = batch.shape[0] // self.size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise RunError(f"--batch-size {batch_size} is the global batch and must divide evenly over "
                           f"{self.size} ranks")

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over the ranks (the same number on one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says so (an interrupt reaches ranks at different steps)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def from_main(self, value):
        """Rank 0's value (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def join_world(parallel: str, device: torch.device) -> World:
    """Join torchrun's process group for --parallel ddp|fsdp2 (NCCL on CUDA, gloo on the CPU)."""
    if parallel not in PARALLEL_MODES:
        raise RunError(f"--parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    size = torchrun_world_size()
    if parallel == "none":
        if size is not None and size > 1:
            raise RunError(f"started by torchrun with {size} processes: pass --parallel ddp or --parallel fsdp2")
        return World()
    if size is None:
        raise RunError(f"--parallel {parallel} runs under torchrun: "
                       f"torchrun --nproc-per-node N python/train.py --parallel {parallel} ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(parallel, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def leave_world(world: World) -> None:
    """Leave together, and only once nothing holds the process group any more: FSDP2's modules
    keep it alive through reference cycles, and a gloo group torn down during interpreter
    shutdown can abort the process."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World, precision: str) -> nn.Module:
    """DDP replicates the model and averages gradients; FSDP2 shards each block and the rest, and
    under bf16 gathers parameters in bf16 while keeping float32 master weights and reductions."""
    if world.parallel == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if world.parallel == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state keyed by parameter names, whole tensors on the CPU: the same for
    every world size and mode. A collective: every rank calls it."""
    return (get_model_state_dict(model, options=FULL_STATE),
            get_optimizer_state_dict(model, optimizer, options=FULL_STATE))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Each rank loads the whole state and keeps its own part."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=options)
