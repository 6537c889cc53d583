"""Quality-tune a pretrained model on a few photogenic "needles" picked from the haystack.

Emu's second stage (emu_paper.txt, sections 3.3-3.4): the pretrained model can already draw
appealing images but is not steered towards them. Fine-tuning on a small set of exceptional
images, with accurate captions, restricts its outputs to that high-quality subset.

  1. curate: score every haystack image with an automatic aesthetic filter and keep the top few
     (the paper's full funnel adds human stages; here the automatic stage stands in for all of it);
  2. fine-tune: small batch (64), noise offset, a hard cap on iterations (15K in the paper), and
     early stopping on a held-out part of the curated set, because a small set overfits fast.

    python qtune.py                      # toy defaults, after pretrain.py
    python qtune.py --iters 15000 --bs 64 --data /path/to/curated-or-haystack ...
    python qtune.py --base /weights/stable-diffusion-v1-5 --data /data/curated --curate-top 0 --caption-field ""
    torchrun --nproc_per_node 8 qtune.py --fsdp ...   # one process per GPU; --bs is the global batch
"""
import argparse
import json
import os
import random
import time

import torch

from emu import EmuError
from emu.arch import ARCHS, get_arch, image_multiple, training_buckets
from emu.checkpoint import append_metrics
from emu.datasets.folders import ImageCaptionFolder, to_uint8
from emu.training.dist import (close_world, distribute, gather_objects, init_world, mean_over_ranks, replicas_agree,
                               save_resumable)
from emu.training.fsdp import save_whole
from emu.variants.stable_diffusion import export_stable_diffusion
from emu.evaluation.accuracy import accuracy_record
from emu.evaluation.faithfulness import load_classifier
from emu.evaluation.judges import appeal_score
from emu.pipeline import load_base, load_frozen_parts, model_from_checkpoint, read_training_checkpoint, sample_grid
from emu.evaluation.plot import plot_metrics
from emu.datasets.shards import ShardDataset, first_samples
from emu.training.loop import (add_training_flags, conditioning, count_bad_step, early_stopping, make_optimizer,
                               open_training_data, rank_entry, resume_path, resume_training_state, shard_paths,
                               too_many_bad_steps, train_step, training_batches, training_extra, update_ema,
                               warmup_schedule)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default="runs/pretrain/ckpt.pt",
                   help="pretraining checkpoint to start from (a .pt file, or a ckpt-<step>/ directory of pretrain.py --fsdp)")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="quality-tune a published Stable Diffusion folder instead of --pretrained (diffusers layout: unet/, "
                        "vae/, text_encoder/, tokenizer/, scheduler/); its U-Net is tuned, its VAE, text encoder and noise "
                        "schedule are used as published, and sample.py --ckpt reads them from there again")
    p.add_argument("--image-size", type=int, default=None,
                   help="with --base: the training resolution (default: the base's own, its U-Net's sample_size latents)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="with --base: at the end, write best.pt's EMA U-Net with the base's other parts as a Stable "
                        "Diffusion folder in the diffusers layout (emu.variants.stable_diffusion.export_stable_diffusion)")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="the pretrained model's architecture (default: the one its checkpoint records; a different one is refused)")
    p.add_argument("--data", default="runs/toy/haystack",
                   help="folder of key.png + key.txt (+ key.json) to curate from; with --curate-top 0, the curated images "
                        "themselves: such a folder or tar shards")
    p.add_argument("--out", default="runs/qtune", help="output directory")
    p.add_argument("--curate-top", type=int, default=200,
                   help="how many images the aesthetic filter keeps (the paper keeps 2000); 0: --data is already curated")
    p.add_argument("--caption-field", default="true_caption",
                   help="metadata field with the curated images' accurate captions ('' to use key.txt)")
    p.add_argument("--holdout", type=int, default=24, help="curated images held out for early stopping")
    p.add_argument("--heldout-data", default=None,
                   help="a folder of image + caption pairs to check early stopping on instead: every image of --data is "
                        "then trained on and --holdout is not used (experiments comparing training sets keep one check set)")
    p.add_argument("--iters", type=int, default=200, help="hard cap on fine-tuning iterations (paper: at most 15K)")
    p.add_argument("--noise-offset", type=float, default=0.1,
                   help="noise offset while quality-tuning; the paper's text drops the number, its published value is 0.1")
    p.add_argument("--eval-every", type=int, default=25, help="held-out check every N iterations")
    p.add_argument("--patience", type=int, default=4, help="stop after this many held-out checks without improvement")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for OUT/ckpt.pt")
    p.add_argument("--text-cache", default=None, help="caption embeddings from data/embed_captions.py, made with "
                   "the pretrained model's towers: the towers are not loaded")
    p.add_argument("--accuracy", default=None, metavar="CLASSIFIER",
                   help="toy world: the judges' attribute classifier (runs/judges/attributes.pt); each check then also logs "
                        "the prompt accuracy of its samples of the held-out captions (emu/evaluation/accuracy.py)")
    add_training_flags(p)
    # paper: batch size 64. It gives no learning rate; in 150 iterations on the toy world, appeal wins
    # over the pretrained model were 67% at 1e-4, 78% at 2e-4 and 81% at 4e-4. The toy cap of 200: on
    # toy.sh's pretrained model the held-out loss still fell at 150 and was lowest at 200 (of 300);
    # appeal wins over 4 seeds 76.5% against 73.5% at 150.
    p.set_defaults(bs=64, lr=4e-4, warmup=20, ema_decay=0.98)
    return p.parse_args(argv)


def curate(data_dir, image_size, top, caption_field):
    """Score every usable image with the automatic aesthetic filter; return the keys of the best `top`."""
    haystack = ImageCaptionFolder(data_dir, image_size, skip_bad=True)  # a broken file is left out, not fatal
    scores = torch.cat([torch.as_tensor(appeal_score(to_uint8(haystack.load_all(i, i + 512))))
                        for i in range(0, len(haystack), 512)])
    usable = [i for i in range(len(haystack)) if i not in haystack.skipped]  # the images scores[] is about
    if top > len(usable):
        raise EmuError(f"{data_dir}: --curate-top {top} but only {len(usable)} usable images")
    ranked = scores.argsort(descending=True)[:top].tolist()
    best = [usable[j] for j in ranked]
    keys = [haystack.keys[i] for i in best]
    report = {"kept": top, "of": len(usable), "threshold": float(scores[ranked[-1]]),
              "skipped": {item.path: item.reason for item in haystack.skipped.values()},
              "images": [{"key": haystack.keys[i], "score": float(scores[j])} for i, j in zip(best, ranked)]}
    needles = [m.get("needle") for m in haystack.meta]
    if all(n is not None for i, n in enumerate(needles) if i in usable):  # toy world only: true needles found
        found = sum(needles[i] for i in best)
        report["needle_precision"], report["needle_recall"] = found / top, found / max(1, sum(needles[i] for i in usable))
    return keys, report


@torch.no_grad()
def needles(args, world):
    """(training set, held-out images, held-out captions) for quality-tuning; under torchrun every
    rank curates alike, holds the same check set, and reads its own share of tar shards.

    With --curate-top N the automatic filter picks the N best images of the haystack folder --data
    (curated.json says which and why). With --curate-top 0, --data is already curated: a folder of
    image + caption pairs, or tar shards (key.jpg, key.txt, key.json). Either way --holdout of the
    needles check early stopping and are never trained on, unless --heldout-data gives the check set.
    """
    field = args.caption_field or None
    holdout = 0 if args.heldout_data else args.holdout  # a separate check set: nothing of --data is held out
    if args.curate_top:
        keys, report = curate(args.data, args.image_size, args.curate_top, field)
        if world.main:  # rank 0 alone writes and prints
            with open(os.path.join(args.out, "curated.json"), "w") as f:
                json.dump(report, f, indent=1)
            print(f"curated {len(keys)} of {report['of']} images (aesthetic score >= {report['threshold']:.3f})"
                  + (f"; {100 * report['needle_precision']:.0f}% are true needles" if "needle_precision" in report else ""))
        heldout = keys[:holdout]  # the best few: a check set that looks like what the model should make
    elif shard_paths(args.data):
        if args.heldout_data:
            return (open_training_data(args.data, args.image_size, args, world, field),
                    *check_set(args.heldout_data, None, args.image_size, field))
        # the first --holdout usable samples of the shards
        images, captions, heldout = first_samples(shard_paths(args.data), holdout, args.image_size, field)
        return open_training_data(args.data, args.image_size, args, world, field, exclude=heldout), images, captions
    else:  # a seeded random --holdout of the folder's images
        keys = open_training_data(args.data, args.image_size, args, world).keys
        heldout = random.Random(args.seed).sample(keys, min(holdout, len(keys)))
    train = ImageCaptionFolder(args.data, args.image_size, keys=[k for k in keys if k not in set(heldout)],
                               caption_field=field, skip_bad=True)
    if args.heldout_data:
        return (train, *check_set(args.heldout_data, None, args.image_size, field))
    return (train, *check_set(args.data, heldout, args.image_size, field))


def check_set(folder, keys, image_size, field):
    """The usable images of `keys` in `folder` (all of its images when keys is None), and their captions."""
    check = ImageCaptionFolder(folder, image_size, keys=keys, caption_field=field, skip_bad=True)
    images = check.load_all()  # the usable ones: line their captions up with them
    captions = [c for i, c in enumerate(check.captions) if i not in check.skipped]
    if len(images) == 0:
        raise EmuError(f"{folder}: none of the {len(check.keys)} held-out images is usable (--caption-field {field!r}?)")
    return images, captions


def heldout_loss(net, ae, text_encoder, objective, images, captions):
    """The objective's loss on held-out images with fixed draws (timesteps and noise, or masks), so
    that checks are comparable."""
    images = images.to(next(net.parameters()).device)
    return objective.check_loss(net, ae.encode(images), conditioning(text_encoder, captions, images))


def main(args):
    world = init_world(args.device)  # under torchrun: this process's rank and device; else a world of one
    torch.manual_seed(args.seed)
    device = world.device
    log = print if world.main else (lambda *a, **k: None)  # rank 0 alone prints and writes
    os.makedirs(args.out, exist_ok=True)
    if args.heldout_data and not os.path.isdir(args.heldout_data):  # before any model is loaded
        raise EmuError(f"--heldout-data {args.heldout_data}: folder not found")
    if args.heldout_data and shard_paths(args.heldout_data):
        raise EmuError(f"--heldout-data {args.heldout_data}: must be a folder of image + caption pairs, not tar shards")

    classifier = load_classifier(args.accuracy) if args.accuracy else None  # a wrong file fails before training

    if args.export and (not args.base or os.path.exists(args.export)):
        raise EmuError(f"--export {args.export}: " + ("already exists" if args.base else "writes a tuned --base folder; give --base"))
    if args.base:  # a published Stable Diffusion folder: its U-Net is the pretrained model
        if args.arch not in (None, "ldm") or args.text_cache:
            raise EmuError(f"--base {args.base} is a latent diffusion model read with its own text encoder: "
                           f"{'--arch ' + args.arch if args.arch not in (None, 'ldm') else '--text-cache'} does not apply")
        arch = get_arch("ldm")
        net, ae, text_encoder, objective, native = load_base(args.base, device)
        args.arch, args.image_size = arch.name, args.image_size or native
        multiple = image_multiple(net, ae)
        if args.image_size % multiple:
            raise EmuError(f"--image-size {args.image_size}: {args.base}'s U-Net needs a multiple of {multiple} pixels")
        for key in ("ae", "clip", "t5", "prior", "xlmr"):
            setattr(args, key, None)  # sample.py reads every frozen part from the base folder
    else:  # the pretrained model and the frozen parts it was trained with
        if args.image_size:
            raise EmuError("--image-size is for --base; a pretraining checkpoint tunes at the resolution it was trained at")
        pre = read_training_checkpoint(args.pretrained)
        arch, net = model_from_checkpoint(pre, args.pretrained, weights="ema")
        if args.arch not in (None, arch.name):
            raise EmuError(f"--arch {args.arch}: {args.pretrained} holds a model of --arch {arch.name}")
        args.arch = arch.name
        pre_args = pre["args"]
        for key in ("ae", "clip", "t5", "image_size", "schedule", "timesteps", "prediction", "preset"):
            setattr(args, key, pre_args[key])  # sampling needs the same parts the model was trained with
        args.min_snr_gamma = pre_args.get("min_snr_gamma")  # the same loss; None in runs from before the flag
        args.prior = pre_args.get("prior")  # Kandinsky's decoder: the image prior its sample grids use
        args.xlmr = pre_args.get("xlmr")  # ... and its multilingual tower, if it reads one
        ae, text_encoder = load_frozen_parts(args.ae, args.clip, args.t5, device, args.text_dtype, args.text_cache,
                                             arch.name, args.prior, args.xlmr)
    net = net.to(device).requires_grad_(True)
    net.grad_checkpoint = args.grad_checkpoint
    if not args.base:  # what train_step optimises: a diffusion loss, or masked tokens (the base's: its schedule's)
        objective = arch.objective(net, args)

    # the needles: curated here from the haystack, or already curated; a held-out part checks early stopping
    train_data, check_images, check_captions = needles(args, world)

    model, ema = distribute(net, world, args)  # DDP or FSDP under torchrun; the network itself in one process
    opt = make_optimizer(net, args)
    sched = warmup_schedule(opt, args.warmup)
    gen = torch.Generator(device).manual_seed(args.seed + world.rank)  # noise and timesteps differ per rank

    def check():  # every rank runs the check (the EMA is sharded under FSDP); they agree on its value
        return mean_over_ranks(heldout_loss(ema, ae, text_encoder, objective, check_images, check_captions), world)

    step, stop = 0, {"best": check(), "best_step": 0, "bad": 0}
    bad, position = {"in_a_row": 0, "total": 0}, None
    ckpt_path = resume_path(args.resume, args.out)
    if ckpt_path:
        ckpt = resume_training_state(ckpt_path, net, ema, opt, sched, gen)
        step, stop, bad = ckpt["step"], ckpt["early_stop"], ckpt.get("bad_steps", bad)
        position = rank_entry(ckpt, "data_position", world, ckpt_path)  # where this rank's shards stand
        gen.set_state(rank_entry(ckpt, "gens", world, ckpt_path, default=ckpt["gen"]))
        log(f"resumed from {ckpt_path} at iteration {step}")
    log(f"{arch.name} model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters; {world.world_size} rank(s)"
        + (", sharded" if args.fsdp else ""))
    log(f"held-out loss before quality-tuning: {stop['best']:.4f}")
    # the paper's batch of 64 even for a set of 100 images: a set smaller than a batch fills it with repeats
    buckets = training_buckets(arch, net, ae, args.image_size) if args.buckets else None  # aspect ratios kept
    batches = training_batches(train_data, ae, text_encoder, args, args.bs, step, position, world, repeat=True,
                               buckets=buckets)
    log(f"training data: {batches.describe()}")
    if not isinstance(train_data, ShardDataset) and len(train_data) < args.bs:
        log(f"{len(train_data)} training images for batch size {args.bs}: each batch repeats them")

    def save_best():  # the weights sample.py, eval_pairs.py and --export read: whole, without AdamW's state
        save_whole(os.path.join(args.out, "best.pt"), net, ema,
                   training_extra(arch, net, sched, step, gen, args, early_stop=stop), world)

    def save():  # the checkpoint to resume from, with every rank's data position and noise generator
        positions, gens = gather_objects(batches.position(), world), gather_objects(gen.get_state(), world)
        extra = dict(early_stop=stop, bad_steps=bad, data_position=positions, gens=gens)
        save_resumable(args.out, arch, net, ema, opt, sched, step, gen, args, world, **extra)

    metrics_log = os.path.join(args.out, "metrics.jsonl")  # append-only: survives a crash, keeps every run
    if world.main:
        append_metrics(metrics_log, {"event": "resume" if ckpt_path else "start", "iter": step, "time": time.time()})
    if not ckpt_path:  # the check before any tuning: where the held-out curve and early stopping start
        save_best()
        if world.main:
            append_metrics(metrics_log, {"iter": 0, "heldout": stop["best"], "best": stop["best"]})

    # fine-tune with early stopping
    net.train()
    t0 = time.time()
    for latents, text in batches:
        if step >= args.iters or stop["bad"] >= args.patience:
            break
        loss = train_step(model, objective, latents, text, batches.empty, opt, sched, gen, args)
        step += 1
        bad = count_bad_step(loss, bad)  # a non-finite loss or gradient: the update was skipped
        if loss is not None:
            update_ema(ema, net, args.ema_decay)
        if bad["in_a_row"] > args.max_bad_steps:
            save()
            raise too_many_bad_steps(bad, args, os.path.join(args.out, f"ckpt-{step:09d}" if args.fsdp else "ckpt.pt"))
        if step % args.eval_every == 0 or step == args.iters:
            seconds = (time.time() - t0) / args.eval_every
            loss = None if loss is None else mean_over_ranks(loss, world)  # None: the step was skipped on every rank
            heldout = check()
            # the EMA model's images of the held-out captions: a grid for a human, and the automatic filter's score
            samples = sample_grid(os.path.join(args.out, "samples", f"iter-{step:06d}.png"), arch, ema, ae, text_encoder,
                                  objective, args.image_size, check_captions, write=world.main)
            stop = early_stopping(stop, step, heldout)
            improved = stop["bad"] == 0
            if world.main:
                appeal = float(appeal_score(samples).mean())
                accuracy = accuracy_record(classifier, samples, check_captions) if classifier is not None else None
                print(f"iter {step}/{args.iters}  loss {float('nan') if loss is None else loss:.4f}  held-out {heldout:.4f}"
                      f"{'  *best' if improved else ''}  appeal {appeal:.3f}"
                      + (f"  prompt accuracy {accuracy['all']:.2f}" if accuracy and accuracy["all"] is not None else "")
                      + f"  {seconds:.3f}s/iter")
                append_metrics(metrics_log, {"iter": step, "loss": loss, "heldout": heldout, "best": stop["best"],
                                             "appeal": appeal, "sec_per_iter": seconds,
                                             **({"prompt_accuracy": accuracy} if accuracy else {})})
                plot_metrics(metrics_log, os.path.join(args.out, "loss.png"), "iter", ["loss", "heldout"],
                             "quality-tuning: training and held-out loss", log_y=True)
            if improved:
                save_best()
            save()
            t0 = time.time()
    reason = "early stop" if stop["bad"] >= args.patience else "iteration cap"
    log(f"{reason} at iteration {step}; best held-out loss {stop['best']:.4f} at iteration {stop['best_step']}"
        f" -> {os.path.join(args.out, 'best.pt')}; training data: {batches.skipped.summary()}")
    if args.fsdp:  # a plain ckpt.pt too, as pretrain.py writes: the whole weights of the last iteration
        save_whole(os.path.join(args.out, "ckpt.pt"), net, ema, training_extra(arch, net, sched, step, gen, args), world)
    elif not replicas_agree(net, world):
        raise EmuError(f"rank {world.rank}: the replicas' weights differ after quality-tuning")
    elif world.world_size > 1:
        log("the replicas' weights agree")
    if args.export and world.main:  # the best EMA weights, as a folder any diffusers-layout tool reads
        _, best = model_from_checkpoint(read_training_checkpoint(os.path.join(args.out, "best.pt")), "best.pt", weights="ema")
        log(f"exported the tuned U-Net with {args.base}'s other parts to {export_stable_diffusion(best, args.base, args.export)}")
    close_world(world)


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
