"""Single process, or `torchrun` with DDP / FSDP2: rank bookkeeping and model wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_OWN_GROUP = False  # whether init_distributed created the process group (then shutdown_distributed ends it)


def init_distributed() -> Dist:
    global _OWN_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _OWN_GROUP = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(d: Dist, clean: bool = True) -> None:
    """End the process group init_distributed created (one the caller made is left to the caller).

    Left to interpreter exit, gloo's worker threads are torn down in no particular order and a rank can die with
    "terminate called without an active exception" (SIGABRT) after training finished. clean: every rank got here
    normally, so they wait for each other first; after an error a rank leaves without waiting (others may be gone).
    """
    global _OWN_GROUP
    if d.world == 1 or not _OWN_GROUP or not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    _OWN_GROUP = False


def mean_across_ranks(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def any_rank(flag: bool, d: Dist, device) -> bool:
    """True on every rank when `flag` is true on any (so all ranks stop at the same step)."""
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, fsdp: bool, d: Dist, device):
    """The module the training step calls: the model itself, or its DDP / FSDP2 wrapper."""
    if d.world == 1:
        return model
    if fsdp:
        # FSDP2: shard each block of both experts, then the root (parameters become DTensors).
        from torch.distributed.fsdp import fully_shard

        experts = [model.video] + ([model.action] if model.action is not None else [])  # a video prior has one
        for block in [b for expert in experts for b in expert.blocks]:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
