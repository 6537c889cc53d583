"""Distributed training in a few visible lines, with PyTorch's own engine.

`torchrun --nproc_per_node N pretrain.py ...` starts N processes and tells each its RANK, WORLD_SIZE
and LOCAL_RANK through the environment. A plain `python pretrain.py` has none of them and runs as a
world of one, through the same code. Ranks talk over NCCL on GPUs and gloo on CPUs.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from emu import EmuError


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among world_size processes and the device it trains on."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self):
        """Rank 0 alone prints, logs and writes files."""
        return self.rank == 0


def init_world(device):
    """Join the process group torchrun set up (if any); `device` is the --device flag ("cpu" or "cuda")."""
    if "RANK" not in os.environ:
        return World(0, 1, torch.device(device))
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise EmuError(f"--device cuda: local rank {local_rank} but {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return World(rank, world_size, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return World(rank, world_size, torch.device(device))


_FINAL_BARRIER = []  # the last barrier's work object, kept until the process exits (see close_world)


def close_world(world):
    """Leave the process group, without the deadlock that tearing gloo down can hit at exit.

    Gloo runs each collective on a worker thread, and the thread that drops the last reference to a
    finished operation frees it; freeing the tensors Python made for it needs the GIL. The group's
    destructor joins the worker threads, holding the GIL, wherever the group's last reference goes:
    here, or as main() returns and DDP's reducer is freed. If a worker is then still waiting for the
    GIL to free the final barrier (which holds the operations before it), neither thread moves. So
    that barrier stays referenced from Python for the life of the process: the workers only ever
    drop their share of it, which needs no GIL."""
    if world.world_size > 1:
        work = dist.barrier(async_op=True)
        work.wait()
        _FINAL_BARRIER.append(work)
        dist.destroy_process_group()


def mean_over_ranks(value, world):
    """The average of a float over all ranks (for logging one loss for the whole world)."""
    if world.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.item() / world.world_size


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable things: data positions)."""
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def replicas_agree(model, world):
    """True when every rank holds bitwise the same parameters as rank 0 (DDP's promise, checked)."""
    if world.world_size == 1:
        return True
    differs = torch.zeros(1, device=world.device)
    for p in model.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        differs += (reference != p).any().float()
    dist.all_reduce(differs)
    return differs.item() == 0
