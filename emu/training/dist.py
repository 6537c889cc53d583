"""Distributed training in a few visible lines, with PyTorch's own engine.

`torchrun --nproc_per_node N pretrain.py ...` starts N processes and tells each its RANK, WORLD_SIZE
and LOCAL_RANK through the environment. A plain `python pretrain.py` has none of them and runs as a
world of one, through the same code. Ranks talk over NCCL on GPUs and gloo on CPUs.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from emu import EmuError
from emu.training.fsdp import save_sharded, shard_model
from emu.training.loop import make_ema, prune_checkpoints, save_rolling, save_training_state, training_extra


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


def distribute(net, world, args):
    """(the model to train, its EMA) for pretrain.py and qtune.py: under --fsdp both sharded, every
    rank keeping 1/N of the weights, gradients, AdamW state and EMA; under torchrun otherwise DDP,
    which averages the gradients over ranks during backward so that every rank takes the same step;
    in a world of one, the network. Build the optimizer over `net` afterwards."""
    ema = make_ema(net)  # copied whole before sharding: FSDP refuses to deepcopy a sharded module
    if args.fsdp:
        model = shard_model(net, world, args.precision)
        shard_model(ema, world)
    else:
        model = DDP(net) if world.world_size > 1 else net
    return model, ema


def save_resumable(out_dir, arch, net, ema, opt, sched, step, gen, args, world, **extra):
    """The checkpoint a run resumes from at `step`, for pretrain.py and qtune.py: under --fsdp every rank
    writes its pieces into out_dir/ckpt-<step>/; otherwise rank 0 writes out_dir/ckpt-<step>.pt and
    links ckpt.pt to it (save_rolling). All but the newest --keep are deleted."""
    if args.fsdp:
        save_sharded(os.path.join(out_dir, f"ckpt-{step:09d}"), net, ema, opt,
                     training_extra(arch, net, sched, step, gen, args, **extra))
        if world.main:
            prune_checkpoints(out_dir, args.keep)
    elif world.main:
        save_rolling(out_dir, step, args.keep,
                     lambda path: save_training_state(path, arch, net, ema, opt, sched, step, gen, args, **extra))
