"""What pretraining and quality-tuning share: the batches of latents and text embeddings, the
training step, EMA, the learning-rate warm-up, caption dropout, and the training checkpoint with
everything needed to resume exactly.
"""
import collections
import contextlib
import copy
import glob
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from emu import EmuError
from emu.checkpoint import (checkpoint_problem, load_checkpoint, load_state_dict_checked, rng_state, save_checkpoint,
                            set_rng_state)
from emu.datasets.buckets import BucketBatches, BucketedFolder
from emu.datasets.folders import EpochBatches, ImageCaptionFolder, Skipped, SkipLog, collate
from emu.datasets.shards import BucketedShards, ShardDataset, collate_stream
from emu.text.encoder import Conditioning, drop_captions


def make_ema(model):
    """A frozen copy of `model` whose weights follow an exponential moving average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, parameter by parameter (one fused call over all of them:
    the 2.8B U-Net has about 1400 tensors, and under FSDP each is a sharded piece)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def make_optimizer(model, args):
    """AdamW over the model's parameters, with the fused kernel (one pass over all tensors): on a
    CPU it makes the update about twice as fast as the per-tensor loop."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)


def learning_rate_factor(step, warmup_steps, total_steps=0, cooldown_steps=0):
    """The learning rate at `step` as a share of the peak: a linear warm-up over `warmup_steps`, then
    constant, and with `cooldown_steps` a linear decay to 0 over the last that many of `total_steps`
    ("warm-up, stable, decay": a longer run can be continued from a checkpoint of the stable part)."""
    factor = min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown_steps:
        factor *= max(0.0, min(1.0, (total_steps - step) / cooldown_steps))
    return factor


def warmup_schedule(optimizer, warmup_steps, total_steps=0, cooldown_steps=0):
    """Linear warm-up from 0 to the base learning rate over `warmup_steps`, then constant, and with
    `cooldown_steps` down to 0 at `total_steps` (learning_rate_factor)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps, cooldown_steps))


def train_step(model, objective, latents, text, empty, opt, sched, gen, args, noise_offset=None):
    """One optimisation step on a batch of latents and their text embeddings.

    `objective` is what the architecture learns (emu/arch.py): GaussianDiffusion for the latent
    model; the pixel cascade's and the masked transformer's objectives have the same two calls:
    training_noise(x, noise_offset, gen) draws every sample's randomness (a dict of per-sample
    tensors), training_loss(model, x, text, **draws) is the loss. "Latents" are what the frozen
    first stage makes of the images: autoencoder latents, the pixels themselves, or VQ token ids.

    `empty` is the embedding of the empty caption, swapped in for a random tenth of the batch
    (--caption-dropout). Only the U-Net learns. `noise_offset` defaults to --noise-offset
    (progressive pretraining sets it per stage).

    With --grad-accum K the batch goes through forward and backward in K micro-batches, which holds
    1/K of the activations in memory at a time; the gradients add up to the whole batch's (the
    timesteps and noise are drawn for the whole batch first, so K changes nothing but the rounding).
    Under DDP or FSDP the ranks average the gradients once, after the last micro-batch.

    A non-finite loss makes non-finite gradients; when the gradient norm is not finite the update is
    skipped and the weights stay as they were. Under DDP the norm is taken after the gradients are
    averaged, so every rank sees the same norm and skips the same steps.
    :return: the loss as a float, or None when the step was skipped.
    """
    text = drop_captions(text, empty, args.caption_dropout, gen)
    noise_offset = args.noise_offset if noise_offset is None else noise_offset
    draws = objective.training_noise(latents, noise_offset, gen)  # {"t": timesteps, "noise": ...} for diffusion
    opt.zero_grad(set_to_none=True)
    # a batch shorter than --grad-accum (a stream's or a bucket's last) has no empty micro-batches: their mean is NaN
    micro_batches = [idx for idx in torch.arange(len(latents), device=latents.device).tensor_split(getattr(args, "grad_accum", 1))
                     if len(idx)]
    total = torch.zeros((), device=latents.device)
    for i, idx in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            # --precision bf16: the forward pass computes in bfloat16 where it is safe (matmuls, convolutions);
            # the weights, their gradients and the optimiser state stay float32 (the "master weights").
            with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = objective.training_loss(model, latents[idx], text[idx], **{k: v[idx] for k, v in draws.items()})
            loss = loss * (len(idx) / len(latents))  # the micro-batch's share of the batch mean
            loss.backward()  # always, even for a NaN: under DDP every rank must join the gradient all-reduce
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    finite = bool(torch.isfinite(norm))
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()  # the schedule follows the step count either way
    return total.item() if finite else None


@contextlib.contextmanager
def gradient_sync(model, enabled):
    """A context in which backward() averages the gradients over the ranks only if `enabled`:
    DDP's no_sync(), FSDP's set_requires_gradient_sync(); a single process has nothing to average."""
    if enabled or not hasattr(model, "no_sync") and not hasattr(model, "set_requires_gradient_sync"):
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


class LatentBatches:
    """What the U-Net trains on, batch after batch: (latents, text embedding) in EpochBatches order.

    The autoencoder and both text towers are frozen, so an image's latent and a caption's embedding
    never change. When all of them fit in `cache_mb` megabytes they are computed once, up front
    (on the toy world that saves about a quarter of every step); otherwise each batch is read and
    encoded as it comes, as a run on millions of images must. When every image is usable, both ways
    give the same batches.

    `empty` is the empty caption's embedding, which caption dropout swaps in.

    Images the dataset skips (ImageCaptionFolder(skip_bad=True)) are left out: a streamed batch is
    then smaller, and the cache holds only the good images. `skipped` maps each such file to its
    reason; the first few are printed as they are met.
    """

    def __init__(self, data, ae, text_encoder, batch_size, seed, start_step=0, cache_mb=1024, workers=0, rank=0,
                 world_size=1, repeat=False):
        self.data, self.ae, self.text_encoder, self.workers = data, ae, text_encoder, workers
        self.device = module_device(ae)
        self.skipped = SkipLog()
        probe = collate([data[i] for i in range(min(len(data), 8))])
        self.skipped.note(probe.skipped)
        if not probe[1]:
            raise EmuError(f"none of the first {min(len(data), 8)} samples could be used, e.g. {probe.skipped[0].path}: "
                           f"{probe.skipped[0].reason}")
        latent, text = self.encode(*probe)
        self.empty = self.text_encoder.encode([""]).to(self.device)
        self.cache_mb = len(data) * (_nbytes(latent) + _nbytes(text)) / len(probe[1]) / 2**20  # text before its padding is cut
        self.cache = None
        if self.cache_mb <= cache_mb:
            self.cache = self.encode_all(range(len(data)))  # the probe found a usable sample: never None
        self.sampler = EpochBatches(len(self.cache[0]) if self.cache else len(data), batch_size, seed, start_step,
                                    rank, world_size, repeat)

    @torch.no_grad()
    def encode(self, images, captions):
        images = images.to(self.device)
        return self.ae.encode(images), conditioning(self.text_encoder, captions, images).to(self.device)

    def encode_all(self, indices):
        """(latents, text embeddings without their padding) of the usable samples among `indices`, in order,
        encoded 256 at a time: a cache. The unusable ones go to `skipped`; None when none is usable."""
        chunks = []
        for start in range(0, len(indices), 256):
            batch = collate([self.data[i] for i in indices[start:start + 256]])
            self.skipped.note(batch.skipped)
            if batch[1]:
                chunks.append(self.encode(*batch))
        if not chunks:
            return None
        return torch.cat([c[0] for c in chunks]), Conditioning.cat([c[1] for c in chunks]).without_padding()

    def __iter__(self):
        if self.cache is not None:
            latents, text = self.cache
            for idx in self.sampler:
                yield latents[idx], text[idx]
        else:
            loader = torch.utils.data.DataLoader(self.data, batch_sampler=self.sampler, num_workers=self.workers,
                                                 collate_fn=collate)
            for batch in loader:
                self.skipped.note(batch.skipped)
                if not batch[1]:
                    raise EmuError(f"every sample of a batch was unusable, e.g. {batch.skipped[0].path}: "
                                   f"{batch.skipped[0].reason}; check the data")
                yield self.encode(*batch)

    def position(self):
        """Nothing to keep: the batch order follows from (seed, step) alone."""
        return None

    def describe(self):
        if self.cache is not None:
            return (f"{len(self.cache[0])} images, encoded once, up front; the cache takes {self.cache_mb:.0f} MB; "
                    + self.skipped.summary())
        return f"{len(self.data)} images, encoded batch by batch; a cache would take {self.cache_mb:.0f} MB (> --cache-mb)"


class BucketLatentBatches:
    """What the U-Net trains on with --buckets: (latents, text embedding) batch after batch from a
    BucketedFolder (emu/datasets/buckets.py), every batch one bucket's size, in BucketBatches order, so
    the model learns every aspect ratio it is asked to draw. The order follows from (seed, step) alone.

    As LatentBatches does, it encodes every image once, up front, when all of them fit in `cache_mb`
    megabytes (one tensor per bucket), and otherwise batch by batch; the unusable images are then left
    out of the cache's order. When every image is usable, both ways give the same batches.
    """

    def __init__(self, data, ae, text_encoder, batch_size, seed, start_step=0, cache_mb=1024, workers=0, rank=0,
                 world_size=1):
        self.data, self.ae, self.text_encoder, self.workers = data, ae, text_encoder, workers
        self.device = module_device(ae)
        self.skipped = SkipLog()
        self.empty = text_encoder.encode([""]).to(self.device)
        first = [data[i] for i in range(min(len(data), 8))]  # of several buckets: read one at a time
        usable = [item for item in first if not isinstance(item, Skipped)]
        if not usable:
            raise EmuError(f"none of the first {len(first)} samples could be used, e.g. {first[0].path}: {first[0].reason}")
        probe = collate(usable[:1])
        latent, text = self.encode(*probe)  # one sample's bytes; the buckets have about as many pixels
        self.cache_mb = len(data) * (_nbytes(latent) + _nbytes(text)) / 2**20
        self.cache, self.rows, bucket_of = None, [], data.bucket_of
        if self.cache_mb <= cache_mb:  # (latents, text) per bucket; each usable image's (cache entry, row) in self.rows
            self.cache, bucket_of = [], []
            for b in sorted(set(data.bucket_of)):
                cached = self.encode_all([i for i, bi in enumerate(data.bucket_of) if bi == b])
                if cached is not None:
                    self.cache.append(cached)
                    self.rows += [(len(self.cache) - 1, r) for r in range(len(cached[0]))]
                    bucket_of += [b] * len(cached[0])
        self.sampler = BucketBatches(bucket_of, batch_size, seed, start_step, rank, world_size)

    encode, encode_all = LatentBatches.encode, LatentBatches.encode_all

    def __iter__(self):
        if self.cache is not None:
            for idx in self.sampler:
                latents, text = self.cache[self.rows[idx[0]][0]]
                rows = torch.tensor([self.rows[i][1] for i in idx])
                yield latents[rows], text[rows]
            return
        loader = torch.utils.data.DataLoader(self.data, batch_sampler=self.sampler, num_workers=self.workers,
                                             collate_fn=collate)
        for batch in loader:
            self.skipped.note(batch.skipped)
            if batch[1]:  # a batch whose every image is unusable is passed over (the next one keeps the shape rule)
                yield self.encode(*batch)

    def position(self):
        """Nothing to keep: the batch order follows from (seed, step) alone."""
        return None

    def describe(self):
        counts = collections.Counter(self.data.bucket_of)
        return (f"{len(self.data)} images in aspect buckets ("
                + ", ".join(f"{self.data.buckets[b].name} {self.data.buckets[b].width}x{self.data.buckets[b].height}: {n}"
                            for b, n in sorted(counts.items())) + "), "
                + (f"encoded once, up front; the cache takes {self.cache_mb:.0f} MB" if self.cache is not None
                   else f"encoded batch by batch; a cache would take {self.cache_mb:.0f} MB (> --cache-mb)"))


class ShardBatches:
    """What the U-Net trains on when the data is tar shards (emu/datasets/shards.py): (latents, text embedding)
    batch by batch, epoch after epoch, encoded as they come (a web-scale set is never cached). With
    `buckets` (--buckets) every batch is one aspect bucket's (BucketedShards); else images are square.

    `position()` is where the streams stand: {"epoch", "consumed": {stream: where it stands}, "next":
    which stream the loader's round robin reaches next}. Where a stream stands is how many items it has
    given, or with buckets BucketedShards' {"read", "waiting"}. A checkpoint keeps it; ShardBatches built
    with it continues exactly there, so a resumed run trains on the batches an unbroken run would have.
    A batch whose every sample is unusable is counted in `skipped` and passed over.
    """

    def __init__(self, data, ae, text_encoder, batch_size, workers=0, position=None, buckets=None):
        self.data, self.ae, self.text_encoder, self.buckets = data, ae, text_encoder, buckets
        self.device = module_device(ae)
        self.skipped = SkipLog()
        self.empty = text_encoder.encode([""]).to(self.device)
        if buckets is None:
            self.loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers,
                                                      collate_fn=collate_stream)
        else:  # each stream makes its own batches, one bucket each
            self.loader = torch.utils.data.DataLoader(BucketedShards(data, buckets, batch_size), batch_size=None,
                                                      num_workers=workers, collate_fn=collate_stream)
        self.workers = max(1, workers)
        position = position or {"epoch": 0, "consumed": {}, "next": 0}
        self.epoch, self.next = position["epoch"], position["next"]
        self.consumed = {int(stream): where for stream, where in position["consumed"].items()}
        if any(isinstance(where, dict) != (buckets is not None) for where in self.consumed.values()):
            raise EmuError(f"the checkpoint's place in the tar shards was written {'with' if buckets is None else 'without'} "
                           f"--buckets; resume with the flags it was written with")

    encode = LatentBatches.encode

    def __iter__(self):
        while True:
            self.data.epoch, self.data.position, self.data.rotation = self.epoch, dict(self.consumed), self.next
            from_start, used = not self.consumed, 0
            for batch in self.loader:  # the workers get the dataset, with these settings, here
                stream, where = batch.source
                self.consumed[stream] = where
                self.next = (stream - self.data.rank * self.workers + 1) % self.workers
                self.skipped.note(batch.skipped)
                if batch[1]:
                    used += 1
                    yield self.encode(*batch)
            if from_start and not used:
                raise EmuError(f"{self.data.shards[0]}: none of the {len(self.data.shards)} shards it starts gave a "
                               f"usable sample in a whole epoch; {self.skipped.summary()}")
            self.epoch, self.consumed, self.next = self.epoch + 1, {}, 0

    def position(self):
        return {"epoch": self.epoch, "consumed": dict(self.consumed), "next": self.next}

    def describe(self):
        buckets = "" if self.buckets is None else (
            " in aspect buckets (" + ", ".join(f"{b.name} {b.width}x{b.height}" for b in self.buckets) + ")")
        return f"{len(self.data.shards)} tar shards{buckets}, read and encoded batch by batch; epoch {self.epoch}"


def conditioning(text_encoder, captions, images):
    """The batch's conditioning: its captions' embeddings, and for a text encoder that also reads the
    images (Kandinsky's decoder: emu.variants.kandinsky.ImageTextEncoder) their CLIP image embeddings too."""
    if getattr(text_encoder, "reads_images", False):
        return text_encoder.encode(captions, images=images)
    return text_encoder.encode(captions)


def module_device(module):
    """The device of a module's parameters, or of its buffers if it has none (the pixel model's
    first stage, emu.variants.pixel.PixelSpace, has only a buffer)."""
    return next(iter([*module.parameters(), *module.buffers()])).device


def _nbytes(x):
    tensors = [getattr(x, f.name) for f in fields(x)] if isinstance(x, Conditioning) else [x]
    return sum(t.numel() * t.element_size() for t in tensors)


def shard_paths(path):
    """The tar shards at `path` (a .tar file, or a folder's .tar files), or [] if it holds none."""
    path = Path(path)
    return [path] if path.suffix == ".tar" and path.is_file() else sorted(path.glob("*.tar")) if path.is_dir() else []


def check_data_path(path):
    """The tar shards at `path`, or [] for a folder of image + caption pairs; EmuError if it is neither.
    Cheap: a script calls it first, so a wrong --data fails before any model is loaded."""
    shards = shard_paths(path)
    if not shards and not Path(path).is_dir():
        raise EmuError(f"{path}: data folder not found (run python data/make_toy.py first)")
    return shards


def open_training_data(path, image_size, args, world, caption_field=None, exclude=()):
    """The training set at `path`: a folder of image + caption pairs (ImageCaptionFolder, unusable
    samples skipped), or tar shards (ShardDataset, this rank's share of them): a .tar file or a
    folder holding .tar files. `exclude` names held-out shard samples to leave out ("shard.tar:key")."""
    shards = check_data_path(path)
    if shards:
        return ShardDataset(shards, image_size, caption_field, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                            rank=world.rank, world_size=world.world_size, min_size=args.min_size,
                            max_aspect=args.max_aspect, exclude=exclude)
    return ImageCaptionFolder(str(path), image_size, caption_field=caption_field, skip_bad=True)  # a broken file is counted


def training_batches(data, ae, text_encoder, args, bs, step, position, world, repeat=False, buckets=None):
    """This rank's share of each global batch of `bs`: LatentBatches for a folder (starting at `step`;
    with `repeat`, a folder smaller than a batch fills it with repeats), ShardBatches for shards
    (continuing at `position`, this rank's from a checkpoint). With `buckets` (emu.datasets.buckets.make_buckets),
    the images keep their aspect ratios: BucketLatentBatches for a folder, ShardBatches' bucketed streams for shards."""
    if bs % world.world_size:
        raise EmuError(f"batch size {bs} does not split over {world.world_size} ranks")
    if isinstance(data, ShardDataset):
        return ShardBatches(data, ae, text_encoder, bs // world.world_size, args.workers, position, buckets)
    if buckets is not None:
        return BucketLatentBatches(BucketedFolder(data, buckets), ae, text_encoder, bs, args.seed, step, args.cache_mb,
                                   args.workers, world.rank, world.world_size)
    return LatentBatches(data, ae, text_encoder, bs, args.seed, step, args.cache_mb, args.workers,
                         world.rank, world.world_size, repeat)


# ----------------------------------------------------------------------------------------------------
# Progressive resolution


@dataclass(frozen=True)
class ResolutionStage:
    """One stage of progressive-resolution pretraining: `steps` steps at `image_size` pixels, with
    batch size `bs` and noise offset `noise_offset`."""
    image_size: int
    steps: int
    bs: int
    noise_offset: float


def parse_stages(args):
    """The stages of --stages, e.g. "256:100000:2048,512:50000:1024,1024:20000:256:0.02".

    Each stage is SIZE:STEPS[:BS[:NOISE_OFFSET]]. The batch size defaults to --bs; the noise offset to
    0 in every stage but the last, which takes --noise-offset: the paper uses a noise offset of 0.02 in
    the final stage of pretraining only (emu_paper.txt, section 3.2). Without --stages there is one
    stage: --image-size, --steps, --bs, --noise-offset.
    """
    if not args.stages:
        return [ResolutionStage(args.image_size, args.steps, args.bs, args.noise_offset)]
    pieces = args.stages.split(",")
    stages = []
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        parts = piece.strip().split(":")
        try:
            if not 2 <= len(parts) <= 4:
                raise ValueError
            size, steps = int(parts[0]), int(parts[1])
            bs = int(parts[2]) if len(parts) > 2 and parts[2] else args.bs
            offset = float(parts[3]) if len(parts) > 3 else args.noise_offset if final else 0.0
        except ValueError:
            raise EmuError(f"--stages: {piece.strip()!r} is not SIZE:STEPS[:BS[:NOISE_OFFSET]]") from None
        if size <= 0 or steps <= 0 or bs <= 0:
            raise EmuError(f"--stages: {piece.strip()!r} needs a positive size, step count and batch size")
        stages.append(ResolutionStage(size, steps, bs, offset))
    return stages


def stage_at(stages, step):
    """(index, first step) of the stage that trains step `step` + 1; len(stages) once all are done."""
    start = 0
    for i, stage in enumerate(stages):
        if step < start + stage.steps:
            return i, start
        start += stage.steps
    return len(stages), start


def early_stopping(stop, step, loss):
    """The early-stopping state after a held-out check at `step` with `loss`: {"best": lowest loss so far,
    "best_step": where, "bad": checks in a row since then without a lower loss}. A run stops once "bad"
    reaches its patience."""
    if loss < stop["best"]:
        return {"best": loss, "best_step": step, "bad": 0}
    return {**stop, "bad": stop["bad"] + 1}


def count_bad_step(loss, bad):
    """The counts {"in_a_row", "total"} of skipped steps after a train_step that returned `loss`."""
    if loss is not None:
        return {**bad, "in_a_row": 0}
    return {"in_a_row": bad["in_a_row"] + 1, "total": bad["total"] + 1}


def too_many_bad_steps(bad, args, path):
    """The EmuError that stops a run after more than --max-bad-steps skipped steps in a row."""
    return EmuError(f"{bad['in_a_row']} steps in a row had a non-finite loss or gradient (more than --max-bad-steps "
                    f"{args.max_bad_steps}); saved the last good weights to {path}; lower --lr or check the data")


def training_extra(arch, model, sched, step, gen, args, **extra):
    """Everything a training checkpoint holds besides the weights and AdamW's state (plain values):
    with them, the architecture (`arch`, emu.arch's for --arch) and the model's configuration, to
    rebuild it from."""
    return {"sched": sched.state_dict(), "step": step, "args": vars(args), "rng": rng_state(), "gen": gen.get_state(),
            "arch": arch.name, "model_config": arch.config(model), **extra}


def save_training_state(path, arch, unet, ema, opt, sched, step, gen, args, **extra):
    """Atomically write {model, ema, opt, sched, step, args, rng, gen, ...} to `path`."""
    save_checkpoint(path, {"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                           **training_extra(arch, unet, sched, step, gen, args, **extra)})


def resume_training_state(path, unet, ema, opt, sched, gen):
    """Load a checkpoint written by save_training_state (a file), or by save_sharded (a directory,
    under --fsdp: every rank calls this and reads its own pieces), into live objects; return its
    plain part (step etc.)."""
    if os.path.isdir(path):
        from emu.training.fsdp import load_sharded  # torch.distributed.checkpoint: loaded only for a sharded checkpoint
        ckpt = load_sharded(path, unet, ema, opt)
    else:
        ckpt = load_checkpoint(path)
        load_state_dict_checked(unet, ckpt["model"], path)
        load_state_dict_checked(ema, ckpt["ema"], path)
        opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    gen.set_state(ckpt["gen"])
    set_rng_state(ckpt["rng"])
    return ckpt


def rank_entry(ckpt, key, world, path, default=None):
    """This rank's item of a per-rank list a checkpoint holds (data positions, generators). A single
    value (a checkpoint written by one process before these were lists) is a list of one."""
    entries = ckpt.get(key)
    if entries is None:
        return default
    entries = entries if isinstance(entries, list) else [entries]
    if len(entries) != world.world_size:
        raise EmuError(f"{path}: written by {len(entries)} rank(s), resumed by {world.world_size}; "
                       f"resume with the same number of processes")
    return entries[world.rank]


def save_rolling(out_dir, step, keep, save):
    """Write the checkpoint of `step` with save(path) as out_dir/ckpt-<step>.pt, make out_dir/ckpt.pt
    the newest (a hard link, swapped in atomically), and delete all but the newest `keep`."""
    path = os.path.join(out_dir, f"ckpt-{step:09d}.pt")
    save(path)
    latest, tmp = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, ".tmp-link-ckpt.pt")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    prune_checkpoints(out_dir, keep)


def prune_checkpoints(out_dir, keep):
    """Delete all but the newest `keep` checkpoints: ckpt-<step>.pt files and (--fsdp) ckpt-<step>/ directories."""
    for old in sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*")))[:-max(1, keep)]:
        if os.path.isdir(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


def resume_path(resume, out_dir):
    """The checkpoint to resume from: an explicit path; or, for 'auto', the newest intact one in
    out_dir (ckpt-<step>.pt files and ckpt-<step>/ directories newest first, else ckpt.pt). A corrupt
    one is reported and passed over, so a crash that damaged the newest falls back to the one before."""
    if resume != "auto":
        return resume or None
    candidates = sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*")), reverse=True)
    if not candidates and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        candidates = [os.path.join(out_dir, "ckpt.pt")]
    for path in candidates:
        if os.path.isdir(path):
            from emu.training.fsdp import sharded_checkpoint_problem  # loaded only for a sharded checkpoint
            problem = sharded_checkpoint_problem(path)
        else:
            problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"warning: {path}: {problem}; trying the checkpoint before it")
    if candidates:
        raise EmuError(f"{out_dir}: none of its {len(candidates)} checkpoints is intact")
    return None


def add_training_flags(p):
    """Add the flags shared by the scripts that train a diffusion U-Net (pretrain.py, qtune.py)."""
    p.add_argument("--bs", type=int, default=16, help="batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="split each rank's batch into this many micro-batches (less activation memory, the same step)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: recompute each U-Net block in the backward pass instead of keeping its activations")
    p.add_argument("--ema-decay", type=float, default=0.995, help="decay of the EMA weights used for sampling")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of training on the empty caption (for CFG)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast the forward pass, float32 master weights (for GPUs; slower on most CPUs)")
    p.add_argument("--keep", type=int, default=3, help="how many of the newest checkpoints (ckpt-<step>.pt) to keep")
    p.add_argument("--max-bad-steps", type=int, default=20,
                   help="stop after this many steps in a row skipped for a non-finite loss or gradient")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the weights, gradients, AdamW state and EMA over the ranks (emu/training/fsdp.py); "
                        "checkpoints become ckpt-<step>/ directories, and a plain ckpt.pt is written at the end")
    p.add_argument("--buckets", action="store_true",
                   help="train on the images at their own aspect ratios (a folder or tar shards): each goes to the nearest "
                        "of 9:16, 2:3, 1:1, 3:2, 16:9 at about the training resolution's pixel count, each batch from one "
                        "bucket (emu/datasets/buckets.py; the latent models)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, noise and timesteps")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--text-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype the frozen text towers run in (T5-XXL: 9.5 GB in bfloat16, 19 GB in float32)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="tar shards: samples in each stream's shuffle buffer")
    p.add_argument("--min-size", type=int, default=0, help="tar shards: skip images with a shorter side below this (pixels)")
    p.add_argument("--max-aspect", type=float, default=0.0, help="tar shards: skip images whose long side is over this times the short one (0: any)")
    p.add_argument("--cache-mb", type=float, default=1024,
                   help="encode all images and captions once when that takes at most this many MB (0: never)")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
