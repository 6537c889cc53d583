"""FSDP on two CPU processes over gloo: the same training as DDP, sharded checkpoints that resume
bitwise, and a broken save that is detected while the checkpoint before it still loads."""
import argparse
import copy
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from emu import EmuError
from emu.diffusion import GaussianDiffusion
from emu.training.dist import World, gather_objects
from emu.training.fsdp import (full_state_dict, load_full_weights, load_sharded, save_sharded, shard_model,
                               sharded_checkpoint_problem)
from emu.text.encoder import TextEmbedding
from emu.training.loop import make_ema, make_optimizer, train_step, update_ema, warmup_schedule
from emu.models.unet import UNet, UNetConfig
from launch import on_two_ranks

# tiny, with every kind of unit (Stage, Downsample, Upsample, a transformer in the middle): DTensor's
# first steps cost time per parameter tensor, so attention stays out of the levels
CFG = UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2), attention_levels=(), head_dim=16,
                 context_dim=32, clip_dim=16, t5_dim=16, pooled_dim=16)
ARGS = argparse.Namespace(lr=1e-2, weight_decay=0.01, grad_clip=1.0, caption_dropout=0.25, noise_offset=0.02,
                          precision="fp32", ema_decay=0.9)
GLOBAL_BS = 4


def batch(step, rank):
    """This rank's half of global batch `step`: (latents, text), the same on every run."""
    gen = torch.Generator().manual_seed(1000 + step)
    latents = torch.randn(GLOBAL_BS, CFG.in_channels, 8, 8, generator=gen)
    text = TextEmbedding(clip=torch.randn(GLOBAL_BS, 5, CFG.clip_dim, generator=gen),
                         clip_mask=torch.ones(GLOBAL_BS, 5, dtype=torch.bool),
                         t5=torch.randn(GLOBAL_BS, 7, CFG.t5_dim, generator=gen),
                         t5_mask=torch.ones(GLOBAL_BS, 7, dtype=torch.bool),
                         pooled=torch.randn(GLOBAL_BS, CFG.pooled_dim, generator=gen))
    half = slice(rank * GLOBAL_BS // 2, (rank + 1) * GLOBAL_BS // 2)
    return latents[half], text[half]


EMPTY = TextEmbedding(clip=torch.zeros(1, 5, CFG.clip_dim), clip_mask=torch.ones(1, 5, dtype=torch.bool),
                      t5=torch.zeros(1, 7, CFG.t5_dim), t5_mask=torch.ones(1, 7, dtype=torch.bool),
                      pooled=torch.zeros(1, CFG.pooled_dim))


class Run:
    """What pretrain.py builds: the U-Net and its EMA (sharded under FSDP, whole under DDP), AdamW,
    the warm-up and this rank's generator."""

    def __init__(self, world, seed=0, precision="fp32", ddp=False):
        torch.manual_seed(seed)
        self.world, self.args = world, argparse.Namespace(**{**vars(ARGS), "precision": precision})
        self.unet = UNet(CFG)
        self.ema = make_ema(self.unet)
        if ddp:
            self.model = DDP(self.unet)
        else:
            shard_model(self.ema, world)  # copied whole, then sharded like the U-Net
            self.model = shard_model(self.unet, world, precision)
        self.opt = make_optimizer(self.unet, self.args)  # after sharding: over this rank's pieces
        self.sched = warmup_schedule(self.opt, 3)
        self.gen = torch.Generator().manual_seed(10 + world.rank)
        self.diffusion = GaussianDiffusion(num_timesteps=100)
        self.step = 0

    def train(self, steps):
        """`steps` training steps as pretrain.py takes them; the losses."""
        losses = []
        for _ in range(steps):
            latents, text = batch(self.step, self.world.rank)
            losses.append(train_step(self.model, self.diffusion, latents, text, EMPTY, self.opt, self.sched, self.gen,
                                     self.args))
            update_ema(self.ema, self.unet, self.args.ema_decay)
            self.step += 1
        return losses

    def extra(self):
        """The plain part of a checkpoint, as pretrain.py gathers it: every rank's generator."""
        gens = gather_objects(self.gen.get_state(), self.world)
        return {"step": self.step, "sched": self.sched.state_dict(), "gens": gens}

    def local_state(self):
        """This rank's pieces of the weights, the EMA and AdamW's state, copied."""
        local = lambda t: (t.to_local() if isinstance(t, DTensor) else t).clone()
        out = {f"model.{k}": local(v) for k, v in self.unet.state_dict().items()}
        out.update({f"ema.{k}": local(v) for k, v in self.ema.state_dict().items()})
        for i, p in enumerate(self.unet.parameters()):
            out.update({f"opt.{i}.{k}": local(v) for k, v in self.opt.state[p].items()})
        return out


@pytest.fixture
def one_thread():
    """One thread for the in-process test: two spinning threads on a busy two-core machine are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------------------------------


def _fsdp_matches_ddp(world, precision):
    """The same per-rank halves of each batch and the same per-rank generators, once under DDP and
    once under FSDP."""
    fsdp, ddp = Run(world, precision=precision), Run(world, precision=precision, ddp=True)
    p = next(fsdp.unet.parameters())
    assert isinstance(p, DTensor) and p.to_local().shape[0] == p.shape[0] // 2  # each rank holds half of each
    start = copy.deepcopy(ddp.unet.state_dict())
    ddp_losses, fsdp_losses = ddp.train(3), fsdp.train(3)
    # the gradient norm train_step clips by is over all the shards, the same on every rank...
    norms = []
    for run in (ddp, fsdp):
        latents, text = batch(99, world.rank)
        gen = torch.Generator().manual_seed(world.rank)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = run.diffusion.training_loss(run.model, latents, text, generator=gen)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(run.unet.parameters(), ARGS.grad_clip))
    assert isinstance(norms[1], DTensor)
    torch.testing.assert_close(norms[1].full_tensor(), norms[0], rtol=1e-4 if precision == "fp32" else 2e-2, atol=0)
    # ... so a NaN in one rank's piece makes every rank skip the step, as under DDP
    if world.rank == 1:
        p.grad.to_local()[0] = float("nan")
    assert not torch.isfinite(torch.nn.utils.clip_grad_norm_(fsdp.unet.parameters(), ARGS.grad_clip))
    # sampling from the sharded EMA (a forward without a backward, on every rank) gives what the whole
    # EMA gives, and leaves it sharded for the next update
    latents, text = batch(0, world.rank)
    with torch.no_grad():
        outs = [run.ema(latents, torch.tensor([10, 90]), text) for run in (ddp, fsdp)]
    assert all(isinstance(p, DTensor) for p in [*fsdp.ema.parameters(), *fsdp.unet.parameters()])
    if precision == "fp32":
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    whole = {"model": full_state_dict(fsdp.unet), "ema": full_state_dict(fsdp.ema)}  # gathered on rank 0 alone
    if not world.main:
        assert whole == {"model": {}, "ema": {}}
        return
    reference = {"model": ddp.unet.state_dict(), "ema": ddp.ema.state_dict()}
    assert all(v.dtype == torch.float32 for v in whole["model"].values())  # bf16 computes, float32 is kept
    if precision == "fp32":
        torch.testing.assert_close(fsdp_losses, ddp_losses, rtol=1e-6, atol=0)
        for key in reference:
            assert_same(whole[key], reference[key], exact=False)
    else:  # the weights are rounded to bfloat16 in the same places; only the norms' weights differ
        torch.testing.assert_close(fsdp_losses, ddp_losses, rtol=1e-3, atol=0)
        difference = sum((whole["model"][k] - v).abs().sum() for k, v in reference["model"].items())
        update = sum((start[k] - v).abs().sum() for k, v in reference["model"].items())
        assert difference < 0.1 * update, (difference, update)


@pytest.mark.slow
def test_fsdp_trains_exactly_like_ddp():
    """3 steps on per-rank halves of the batch: the weights and the EMA agree with DDP's within 1e-5
    (fused AdamW on the shards, the gradient norm clipped over all shards), and so do samples from
    the sharded EMA."""
    on_two_ranks(_fsdp_matches_ddp, "fp32")


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_trains_like_ddp_with_autocast():
    """Gathered in bfloat16, reduced in float32, under train_step's autocast: the losses agree with
    DDP + autocast within 1e-3 and the weights move alike (AdamW turns tiny gradient differences
    into lr-sized steps, so they cannot agree to 1e-5)."""
    on_two_ranks(_fsdp_matches_ddp, "bf16")


# ----------------------------------------------------------------------------------------------------


def _resume(world, folder):
    straight = Run(world)
    straight.train(4)
    split = Run(world)
    split.train(2)
    path = os.path.join(folder, "ckpt-000000002")
    save_sharded(path, split.unet, split.ema, split.opt, split.extra())
    whole = {"model": full_state_dict(split.unet), "ema": full_state_dict(split.ema)}
    if world.main:
        torch.save(whole, os.path.join(folder, "whole-at-2.pt"))
    resumed = Run(world, seed=1)  # other initial weights: everything must come from the checkpoint
    extra = load_sharded(path, resumed.unet, resumed.ema, resumed.opt)
    resumed.step = extra["step"]
    resumed.gen.set_state(extra["gens"][world.rank])
    resumed.sched.load_state_dict(extra["sched"])
    resumed.train(2)
    assert_same(resumed.local_state(), straight.local_state())
    assert resumed.opt.param_groups[0]["lr"] == straight.opt.param_groups[0]["lr"]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bitwise(tmp_path, one_thread):
    """2 steps, save, load into fresh (differently initialised) sharded objects, 2 more steps ==
    4 steps in one go, bitwise: weights, EMA, AdamW's moments and step counts. And one process
    reads the two ranks' shards back whole: as a plain state dict for sampling, and into a world of
    one that could train on."""
    on_two_ranks(_resume, str(tmp_path))
    path = tmp_path / "ckpt-000000002"
    whole = torch.load(tmp_path / "whole-at-2.pt", weights_only=True)
    full = load_full_weights(path)
    assert full["step"] == 2 and len(full["gens"]) == 2 and "opt" not in full
    assert_same(full["model"], whole["model"])
    assert_same(full["ema"], whole["ema"])
    alone = Run(World(0, 1, torch.device("cpu")), seed=1)
    assert load_sharded(path, alone.unet, alone.ema, alone.opt)["step"] == 2
    assert_same(alone.unet.state_dict(), whole["model"])
    assert_same(alone.ema.state_dict(), whole["ema"])
    assert len(alone.opt.state) == len(list(alone.unet.parameters()))


# ----------------------------------------------------------------------------------------------------


def _broken_saves(world, folder):
    run = Run(world)
    run.train(1)
    good = os.path.join(folder, "ckpt-000000001")
    save_sharded(good, run.unet, run.ema, run.opt, run.extra())
    saved = run.local_state()
    if world.main:  # the save of step 2, killed before its rename, left its temporary directory
        shutil.copytree(good, os.path.join(folder, ".tmp-ckpt-000000002"))
        os.remove(os.path.join(folder, ".tmp-ckpt-000000002", ".metadata"))
        for step in (3, 4, 5):  # and three ways a checkpoint directory can be broken
            shutil.copytree(good, os.path.join(folder, f"ckpt-00000000{step}"))
        os.remove(os.path.join(folder, "ckpt-000000003", ".metadata"))
        os.remove(os.path.join(folder, "ckpt-000000004", "extra.pt"))
        shard = os.path.join(folder, "ckpt-000000005", "__1_0.distcp")  # rank 1's pieces
        os.truncate(shard, os.path.getsize(shard) // 2)
    dist.barrier()
    problems = [sharded_checkpoint_problem(os.path.join(folder, f"ckpt-00000000{step}")) for step in (1, 2, 3, 4, 5)]
    assert problems[0] is None and "not a checkpoint directory" in problems[1]
    assert "no .metadata" in problems[2] and "no extra.pt" in problems[3]
    assert "__1_0.distcp is truncated" in problems[4]
    with pytest.raises(EmuError, match="truncated"):
        load_sharded(os.path.join(folder, "ckpt-000000005"), run.unet, run.ema, run.opt)
    fresh = Run(world, seed=1)
    assert load_sharded(good, fresh.unet, fresh.ema, fresh.opt)["step"] == 1
    assert_same(fresh.local_state(), saved)


@pytest.mark.slow
def test_a_broken_sharded_save_is_detected_and_the_previous_one_still_loads(tmp_path):
    """A save killed before its rename leaves only a .tmp- directory; a checkpoint without its
    .metadata or extra.pt, or with a truncated shard, is named as broken and refused; the one
    before still loads, bitwise."""
    on_two_ranks(_broken_saves, str(tmp_path))


def test_a_world_of_one_saves_and_loads_unsharded(tmp_path, one_thread):
    """Without torchrun nothing is sharded; the same functions save and load, with no process group.
    A temporary directory a killed save left is cleared, and saving the same step again replaces it."""
    world = World(0, 1, torch.device("cpu"))
    run = Run(world)
    assert type(next(run.unet.parameters())) is torch.nn.Parameter
    run.train(1)
    os.makedirs(tmp_path / ".tmp-ckpt-000000001")
    (tmp_path / ".tmp-ckpt-000000001" / "__0_0.distcp").write_bytes(b"half a shard")
    for _ in range(2):
        save_sharded(tmp_path / "ckpt-000000001", run.unet, run.ema, run.opt, run.extra())
        assert os.listdir(tmp_path) == ["ckpt-000000001"]
    fresh = Run(world, seed=1)
    assert load_sharded(tmp_path / "ckpt-000000001", fresh.unet, fresh.ema, fresh.opt)["step"] == 1
    assert_same(fresh.local_state(), run.local_state())
    assert_same(full_state_dict(run.unet), run.unet.state_dict())
