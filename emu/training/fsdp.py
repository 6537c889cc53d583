"""Fully sharded data parallel (FSDP): train a U-Net too big to copy whole onto every GPU.

DDP keeps on every rank the whole model, its whole gradient and AdamW's two moments: for the 2.8B
U-Net that is 4 x 2.8e9 float32 numbers, 45 GB per GPU before the first activation. FSDP keeps the
arithmetic of DDP (each step averages the gradient over the global batch and takes the same AdamW
step) but changes where the numbers live. Each of N ranks holds 1/N of every parameter (rows
split along dim 0, a DTensor with placement Shard(0)), and

  * forward: just before a block (a `Stage` of the U-Net) runs, the ranks all-gather its pieces
    into the full weights; right after, the full weights are freed. Only a block or two is whole
    at any moment;
  * backward: the block's weights are all-gathered again, its gradients are computed and then
    reduce-scattered: averaged over the ranks, each rank keeping only the piece that matches its
    own piece of the weights;
  * step: AdamW updates each rank's piece with its piece of the gradient, so its two moments are
    1/N-sized too.

The EMA is copied whole (make_ema) before either is sharded, then sharded the same way: its update
is a local lerp_ of matching pieces, with no communication, and sampling from it is a forward pass
that every rank runs. Checkpoints are sharded too (torch.distributed.checkpoint, "DCP"): every rank writes
its own pieces into one directory, and a checkpoint written by N ranks can be read back by any
number of ranks, or by one process (load_full_weights, for sampling).

PyTorch's `fully_shard` (FSDP2) does the work: it turns the parameters into DTensors in place and
adds the hooks that gather and free them. It runs on CPUs over gloo as on GPUs over NCCL, which is
how the tests check it.
"""
import contextlib
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from emu import EmuError
from emu.checkpoint import TMP_PREFIX, checkpoint_problem, load_checkpoint, save_checkpoint

EXTRA = "extra.pt"  # the plain part of a sharded checkpoint: step, args, schedule, generators, ...


# ----------------------------------------------------------------------------------------------------
# Sharding the U-Net


def shard_model(unet, world, precision="fp32"):
    """Shard `unet` (or any model with fsdp_units(): the pixel cascade, the masked transformer) over
    the ranks of `world` in place (and return it).

    Each of the model's fsdp_units() becomes a unit that is gathered whole just for its own forward
    and its own backward: for the U-Net every `Stage`, Downsample and Upsample of the down / middle /
    up paths. The root unit holds what is left (the timestep MLP, the text projections, conv_in, the
    output layers: 9M of the 2.8B parameters). Units are sharded bottom-up, the root last, as
    fully_shard requires.

    precision "bf16": the units are gathered in bfloat16 (half the traffic and half the memory of
    the whole weights) and the gradients are reduce-scattered in float32; the pieces the optimizer
    updates stay float32. train_step's autocast must stay on with it: the U-Net computes some
    float32 tensors itself (the timestep embedding), which a bfloat16 weight does not accept
    without autocast, and autocast also keeps the norms and softmax in float32.

    The EMA is sharded with the same call (precision "fp32": it is only sampled from), after
    make_ema copied the whole U-Net: FSDP refuses to deepcopy a sharded module. Build the optimizer
    after sharding, over the pieces. A world of one has nothing to shard: `unet` is returned as it is.
    """
    if world.world_size == 1:
        return unet
    mesh = init_device_mesh(world.device.type, (world.world_size,))  # 1-D: every rank holds a piece of each
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = bf16 if precision == "bf16" else MixedPrecisionPolicy()
    for block in unet.fsdp_units():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root too frees its whole weights after every forward (by default it would keep them until
    # the backward): after a forward without one (sampling), they would stay whole, and update_ema
    # and the checkpoints would meet whole tensors where they expect pieces.
    fully_shard(unet, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return unet


# ----------------------------------------------------------------------------------------------------
# Sharded checkpoints: a directory written by every rank, made visible by one rename


def _state(unet, ema, opt):
    """{model, ema, opt}: this rank's pieces, keyed by parameter name (the layout DCP saves and loads)."""
    return {"model": get_model_state_dict(unet), "ema": get_model_state_dict(ema),
            "opt": get_optimizer_state_dict(unet, opt)}


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _no_process_group_warning():
    """Silence DCP's warning that there is no process group: in a world of one, and in
    load_full_weights, there is none on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(path, unet, ema, opt, extra):
    """Write a sharded checkpoint to the directory `path` (e.g. out/ckpt-000000300); every rank calls it.

    Every rank writes its pieces of the U-Net, the EMA and AdamW's state into a temporary sibling
    (out/.tmp-ckpt-000000300), each file fsync'ed; rank 0 adds DCP's .metadata and its `extra`, a
    plain dict (step, args, schedule, every rank's generator and data position as lists, ...), as
    extra.pt.
    Only then does rank 0 rename the directory to `path`: a save killed midway leaves a .tmp-
    directory behind (removed by the next save), never a half-written `path`, and the checkpoints
    before it stay whole. A failure on any rank raises on every rank.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    tmp, old = os.path.join(parent, TMP_PREFIX + name), os.path.join(parent, TMP_PREFIX + "old-" + name)
    if _rank() == 0:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    if dist.is_initialized():
        dist.barrier()  # no rank writes into tmp before rank 0 has cleared it
    with _no_process_group_warning():
        dcp.save(_state(unet, ema, opt), storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    error = None
    if _rank() == 0:
        try:
            save_checkpoint(os.path.join(tmp, EXTRA), extra)
            _fsync_dir(tmp)
            if os.path.exists(path):  # the same step saved again: set the old one aside, then delete it
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        except Exception as e:  # the other ranks must not wait forever for a rename that will not come
            error = f"{path}: the sharded checkpoint could not be completed ({e}); the previous ones are kept"
    if dist.is_initialized():
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error:
        raise EmuError(error)


def load_sharded(path, unet, ema, opt):
    """Load a checkpoint written by save_sharded into live sharded (or plain) objects; every rank
    calls it. The ranks may be fewer or more than those that wrote it: DCP reshards as it reads.
    :return: the `extra` dict that was saved with it.
    """
    problem = sharded_checkpoint_problem(path)
    if problem:
        raise EmuError(f"{path}: {problem}")
    state = _state(unet, ema, opt)
    with _no_process_group_warning():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))  # into this rank's pieces, in place
    set_model_state_dict(unet, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(unet, opt, state["opt"])
    return load_checkpoint(os.path.join(path, EXTRA))


def sharded_checkpoint_problem(path):
    """None when `path` is a complete sharded checkpoint, else what is wrong with it: no such
    directory, no .metadata or extra.pt (the save never finished), an unreadable .metadata or
    extra.pt, or a shard file that is missing or shorter than the metadata says. Looks only at file
    sizes, not at every byte of the shards."""
    if not os.path.isdir(path):
        return "not a checkpoint directory"
    for needed in (".metadata", EXTRA):
        if not os.path.isfile(os.path.join(path, needed)):
            return f"no {needed} (the save did not finish)"
    problem = checkpoint_problem(os.path.join(path, EXTRA))
    if problem:
        return f"{EXTRA}: {problem}"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        return f"unreadable .metadata ({str(e)[:80] or type(e).__name__})"
    needed = {}  # shard file -> the bytes its pieces reach up to
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for file, size in sorted(needed.items()):
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            return f"its shard {file} is missing"
        if os.path.getsize(full) < size:
            return f"its shard {file} is truncated ({os.path.getsize(full)} of {size} bytes)"
    return None


# ----------------------------------------------------------------------------------------------------
# Whole weights, for sampling and export


def full_state_dict(module):
    """The whole, unsharded state dict of a sharded module on rank 0 (on the CPU), {} on the other
    ranks; every rank must call it. For writing a plain checkpoint that sample.py and qtune.py read."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_whole(path, net, ema, extra, world):
    """Write the whole weights {model, ema, **extra} as one plain checkpoint on rank 0 (no optimizer
    state: it is for sampling, evaluation and export, not for resuming). Sharded modules are gathered
    first, so every rank must call it; whole ones (a world of one, DDP) are written as they are."""
    sharded = isinstance(next(net.parameters()), DTensor)
    whole = {"model": full_state_dict(net), "ema": full_state_dict(ema)} if sharded else \
        {"model": net.state_dict(), "ema": ema.state_dict()}
    if world.main:
        save_checkpoint(path, {**whole, **extra})


def load_full_weights(path):
    """A sharded checkpoint's whole weights, read by one process without any process group:
    {"model": state dict, "ema": state dict, **extra} - the layout of a plain training checkpoint
    without the optimizer, so sample.py and qtune.py can read it like one."""
    problem = sharded_checkpoint_problem(path)
    if problem:
        raise EmuError(f"{path}: {problem}")
    metadata = dcp.FileSystemReader(path).read_metadata()
    state = {"model": {}, "ema": {}}
    for key, meta in metadata.state_dict_metadata.items():  # keys are flattened: "ema.down.0.res.conv1.weight"
        top, _, name = key.partition(".")
        if top in state and isinstance(meta, TensorStorageMetadata):
            state[top][name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with _no_process_group_warning():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)  # every piece into the whole tensors
    return {**load_checkpoint(os.path.join(path, EXTRA)), **state}
