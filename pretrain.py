"""Pretrain the text-to-image model (Emu's latent diffusion U-Net) on a large, mediocre "haystack".

This is Emu's knowledge-learning stage (emu_paper.txt, section 3.2): the model learns what things
look like and how captions map to them, from a big noisy web-like set. The autoencoder and both
text towers are frozen; only the U-Net trains.

    python data/make_toy.py && python train_ae.py   # once
    python pretrain.py                               # toy defaults: a few minutes on a CPU
    torchrun --nproc_per_node 8 pretrain.py ...      # one process per GPU; --bs is the global batch

The same script pretrains the other two architectures quality-tuning is shown on (section 4.2):

    python pretrain.py --arch pixel --out runs/pixel/pretrain                     # Imagen-like, on pixels
    python train_ae.py --arch muse && python pretrain.py --arch muse --out runs/muse/pretrain  # Muse-like

and Kandinsky's decoder (emu/variants/kandinsky.py), on MoVQ latents, conditioned on CLIP image embeddings,
with an image prior for its sample grids; a "-inpaint" preset trains the inpainting decoder:

    python train_ae.py --arch kandinsky && python train_prior.py
    python pretrain.py --arch kandinsky --out runs/kandinsky/decoder
    python pretrain.py --arch kandinsky --preset toy-inpaint --out runs/kandinsky/inpaint
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from emu import EmuError
from emu.arch import ARCHS, resolve_arch_flags, training_buckets
from emu.checkpoint import append_metrics
from emu.datasets.folders import SkipLog, read_prompts
from emu.training.dist import (close_world, distribute, gather_objects, init_world, mean_over_ranks, replicas_agree,
                               save_resumable)
from emu.training.fsdp import save_whole
from emu.pipeline import load_frozen_parts, sample_grid
from emu.evaluation.accuracy import accuracy_record
from emu.evaluation.faithfulness import load_classifier
from emu.evaluation.plot import plot_metrics
from emu.variants.inpaint import INPAINT_WHOLE
from emu.training.loop import (add_training_flags, check_data_path, count_bad_step, make_optimizer, open_training_data,
                               parse_stages, rank_entry, resume_path, resume_training_state, stage_at,
                               too_many_bad_steps, train_step, training_batches, training_extra, update_ema,
                               warmup_schedule)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/toy/haystack",
                   help="the haystack: a folder of key.png + key.txt pairs, or of .tar shards (key.jpg, key.txt, key.json)")
    p.add_argument("--out", default="runs/pretrain", help="output directory for checkpoints")
    p.add_argument("--arch", default="ldm", choices=sorted(ARCHS),
                   help="ldm: latent diffusion (Emu); pixel: Imagen-like pixel diffusion with an upsampler; "
                        "muse: Muse-like masked transformer over VQ tokens; kandinsky: Kandinsky's decoder (emu/arch.py)")
    p.add_argument("--ae", default=None, help="the frozen first stage from train_ae.py: the autoencoder (default runs/ae), "
                                              "for --arch muse the VQ tokenizer (default runs/vq), for --arch kandinsky "
                                              "MoVQ (default runs/movq); none for --arch pixel")
    p.add_argument("--prior", default=None,
                   help="--arch kandinsky: the image prior (train_prior.py) its sample grids, and later sample.py, use "
                        "(default runs/prior/prior.pt)")
    p.add_argument("--clip", default="runs/towers/clip", help="CLIP text tower directory, Hugging Face layout")
    p.add_argument("--t5", default="runs/towers/t5", help="T5 encoder directory, Hugging Face layout")
    p.add_argument("--xlmr", default=None,
                   help="--arch kandinsky: Kandinsky 2.1's multilingual tower (XLM-R with M-CLIP's head; the toy one is "
                        "runs/towers/xlmr), read by the decoder in place of the CLIP and T5 tokens; the prior still reads CLIP")
    p.add_argument("--whole-masks", type=float, default=INPAINT_WHOLE,
                   help="an inpainting preset (-inpaint): the share of its training masks that are the whole image, "
                        "where it draws from the text alone; the rest are holes and borders (default: a half)")
    p.add_argument("--image-size", type=int, default=32, help="training resolution in pixels (without --stages)")
    p.add_argument("--preset", default="toy", help="model size: toy, or the real one (ldm: emu; pixel: imagen; muse: muse; "
                                                   "kandinsky: kandinsky, and toy-inpaint, kandinsky-inpaint)")
    p.add_argument("--steps", type=int, default=1600, help="training steps (without --stages)")
    p.add_argument("--stages", default=None,
                   help="progressive resolution, e.g. 256:100000:2048,512:50000:1024,1024:20000:256 (SIZE:STEPS[:BS[:NOISE_OFFSET]]"
                        " per stage; BS defaults to --bs, the noise offset to 0 but --noise-offset in the final stage)")
    p.add_argument("--schedule", default=None, choices=["linear", "scaled_linear", "cosine"],
                   help="noise schedule (default: ldm scaled_linear; pixel: the preset's, cosine)")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T")
    p.add_argument("--prediction", default=None, choices=["eps", "v"],
                   help="what the U-Net predicts (default: ldm v for the toy preset, else eps; pixel: the preset's, v for toy)")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="weight each timestep's loss by min(SNR, gamma) as a clean-sample error (Hang et al. 2023); 0: "
                        "unweighted (default: ldm 5 for the toy preset, else 0)")
    p.add_argument("--cooldown", type=int, default=None,
                   help="the last N of all steps decay the learning rate linearly to 0 (default: an eighth of them; "
                        "0: constant to the end)")
    p.add_argument("--noise-offset", type=float, default=0.02,
                   help="noise offset of the final stage; the paper uses 0.02 in the final pretraining stage (section 3.2)")
    p.add_argument("--save-every", type=int, default=500, help="write a checkpoint every N steps")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for OUT/ckpt.pt")
    p.add_argument("--sample-every", type=int, default=500, help="write a grid of EMA samples every N steps (0: never)")
    p.add_argument("--sample-prompts", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts", "toy.tsv"),
                   help="prompts for the sample grids (.tsv or one per line; default: the toy world's)")
    p.add_argument("--sample-n", type=int, default=8, help="how many of those prompts the grids show")
    p.add_argument("--accuracy", default=None, metavar="CLASSIFIER",
                   help="toy world: the judges' attribute classifier (runs/judges/attributes.pt); each sample grid's prompt "
                        "accuracy then goes to metrics.jsonl (emu/evaluation/accuracy.py)")
    p.add_argument("--text-cache", default=None,
                   help="caption embeddings from data/embed_captions.py, made with --clip/--t5: the towers are not loaded")
    add_training_flags(p)
    # The toy world's: 1400 steps of 64 take about four minutes on two CPU cores. A batch of 64 trains
    # 1.75x the images per second of a batch of 16 there. On the toy autoencoder trained 900 steps, 1e-3
    # drew the prompts' colour and count far more often than 2e-3 (91% and 74% of the toy prompts against
    # 77% and 42%; README, "What made the toy model follow its prompts"). The paper gives neither number
    # for pretraining. The toy model is still learning shape in its last steps: an EMA of decay 0.995 lags
    # it (shape 48% against 52% at 0.98), and cooling the rate down over the last eighth of the steps
    # settles the weights it ends with (62%; over a quarter 58.5%, a half 54%; README, "What made the toy
    # model follow its prompts"). A run of 100k steps wants an EMA of 0.9999 (--ema-decay).
    p.set_defaults(bs=64, lr=1e-3, warmup=50, ema_decay=0.98)
    return p.parse_args(argv)


def main(args):
    world = init_world(args.device)  # under torchrun: this process's rank and device; else a world of one
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    device = world.device
    log = tqdm.write if world.main else (lambda *a, **k: None)  # rank 0 alone prints and writes
    os.makedirs(args.out, exist_ok=True)
    stages = parse_stages(args)  # progressive resolution: [(image size, steps, batch size, noise offset), ...]
    args.steps, args.image_size = sum(s.steps for s in stages), stages[-1].image_size  # recorded in checkpoints
    args.cooldown = args.steps // 8 if args.cooldown is None else args.cooldown
    if not 0 <= args.cooldown <= args.steps:
        raise EmuError(f"--cooldown {args.cooldown}: must lie in 0 .. {args.steps}, the steps of the whole run")
    if not 0.0 <= args.whole_masks <= 1.0:
        raise EmuError(f"--whole-masks {args.whole_masks}: a share, must lie in 0 .. 1")

    check_data_path(args.data)  # opened stage by stage below; a wrong path fails now
    arch = resolve_arch_flags(args)  # the defaults of --ae, --schedule, --prediction that depend on --arch

    # frozen parts and the model
    ae, text_encoder = load_frozen_parts(args.ae, args.clip, args.t5, device, args.text_dtype, args.text_cache, arch.name,
                                         args.prior if args.sample_every else None, args.xlmr)
    net = arch.build(args.preset, ae, text_encoder).to(device)
    net.grad_checkpoint = args.grad_checkpoint
    model, ema = distribute(net, world, args)
    objective = arch.objective(net, args)  # what train_step optimises: a diffusion loss, or masked tokens
    opt = make_optimizer(net, args)
    sched = warmup_schedule(opt, args.warmup, args.steps, args.cooldown)  # warm-up, stable, and the cooldown
    gen = torch.Generator(device).manual_seed(args.seed + world.rank)  # noise and timesteps differ per rank
    log(f"{arch.name} model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters; {world.world_size} rank(s)")
    prompts = sample_prompts(args, text_encoder)
    classifier = load_classifier(args.accuracy) if args.accuracy and prompts else None  # a wrong file fails now

    ckpt_file = os.path.join(args.out, "ckpt.pt")
    ckpt_path = resume_path(args.resume, args.out)
    step, skipped, position, bad = resume(ckpt_path, stages, world, net, ema, opt, sched, gen)
    if ckpt_path:
        log(f"resumed from {ckpt_path} at step {step}")
    metrics_log = os.path.join(args.out, "metrics.jsonl")  # append-only: survives a crash, keeps every run
    if world.main:
        append_metrics(metrics_log, {"event": "resume" if ckpt_path else "start", "step": step, "time": time.time()})

    def save():
        # every rank's data position and noise generator, so that each continues where it stopped
        positions, gens = gather_objects(batches.position(), world), gather_objects(gen.get_state(), world)
        extra = dict(skipped=dict(batches.skipped), data_position=positions, gens=gens, stage=index, bad_steps=bad)
        save_resumable(args.out, arch, net, ema, opt, sched, step, gen, args, world, **extra)

    # train, stage after stage: each at its own resolution, batch size and noise offset
    net.train()
    for index in range(stage_at(stages, step)[0], len(stages)):
        stage = stages[index]
        stage_start, stage_end = sum(s.steps for s in stages[:index]), sum(s.steps for s in stages[:index + 1])
        data = open_training_data(args.data, stage.image_size, args, world)  # image + caption folder, or tar shards
        buckets = training_buckets(arch, net, ae, stage.image_size) if args.buckets else None  # aspect ratios kept
        batches = training_batches(data, ae, text_encoder, args, stage.bs, step - stage_start, position, world,
                                   buckets=buckets)
        batches.skipped.update(skipped)  # files skipped before (a resume, an earlier stage) still count
        position = None  # a later stage starts its data afresh
        log(f"stage {index + 1}/{len(stages)}: {stage.image_size} px, batch {stage.bs}, steps {stage_start}-{stage_end}, "
            f"noise offset {stage.noise_offset}; data: {batches.describe()}")
        # a bar on rank 0's terminal; none when the output goes to a file or a pipe (disable=None), where the log lines suffice
        progress = tqdm(total=stage_end, initial=step, unit="step", desc=f"stage {index + 1}",
                        disable=None if world.main else True, dynamic_ncols=True)
        t0, losses, logged = time.time(), [], step
        for latents, text in batches:
            if step >= stage_end:
                break
            loss = train_step(model, objective, latents, text, batches.empty, opt, sched, gen, args, stage.noise_offset)
            step += 1
            progress.update()
            bad = count_bad_step(loss, bad)  # a non-finite loss or gradient: the update was skipped
            if loss is not None:
                losses.append(loss)
                update_ema(ema, net, args.ema_decay)
            if bad["in_a_row"] > args.max_bad_steps:
                save()
                progress.close()
                raise too_many_bad_steps(bad, args, os.path.join(args.out, f"ckpt-{step:09d}") if args.fsdp else ckpt_file)
            if step % args.log_every == 0 or step == stage_end:
                loss = mean_over_ranks(sum(losses) / len(losses) if losses else float("nan"), world)
                seconds = (time.time() - t0) / (step - logged)
                progress.set_postfix(loss=f"{loss:.4f}")
                log(f"step {step}/{args.steps}  loss {loss:.4f}  {seconds:.3f}s/step"
                    + (f"  ({bad['total']} steps skipped for a non-finite loss)" if bad["total"] else ""))
                if world.main:
                    write_metrics(metrics_log, {"step": step, "loss": loss, "sec_per_step": seconds, "stage": index + 1,
                                                "image_size": stage.image_size, "skipped": len(batches.skipped),
                                                "bad_steps": bad["total"]})
                t0, losses, logged = time.time(), [], step
            if step % args.save_every == 0 or step == stage_end:
                save()
            if prompts and (step % args.sample_every == 0 or step == args.steps):  # every rank runs the (sharded) model
                images = sample_grid(os.path.join(args.out, "samples", f"step-{step:09d}.png"), arch, ema, ae,
                                     text_encoder, objective, stage.image_size, prompts, write=world.main)
                if classifier is not None and world.main:
                    accuracy = accuracy_record(classifier, images, prompts)
                    log(f"step {step}: prompt accuracy of the sample grid " + ", ".join(
                        f"{k} {v:.2f}" for k, v in accuracy.items() if v is not None))
                    append_metrics(metrics_log, {"step": step, "prompt_accuracy": accuracy})
        progress.close()
        skipped = dict(batches.skipped)
    finish(ckpt_file, arch, world, net, ema, sched, step, gen, args, skipped)
    log(f"saved {ckpt_file}; data: {SkipLog.summary(skipped)}; {bad['total']} steps skipped for a non-finite loss"
        + ("; the replicas' weights agree" if world.world_size > 1 and not args.fsdp else ""))
    close_world(world)


def finish(ckpt_file, arch, world, net, ema, sched, step, gen, args, skipped):
    """The end of training. Under --fsdp, a plain ckpt.pt too, for sample.py and qtune.py: the whole
    weights, gathered on rank 0. Under DDP, the check that every rank holds the same weights."""
    if args.fsdp:
        save_whole(ckpt_file, net, ema, training_extra(arch, net, sched, step, gen, args, skipped=skipped), world)
    elif not replicas_agree(net, world):
        raise EmuError(f"rank {world.rank}: the replicas' weights differ after training")


def write_metrics(metrics_log, record):
    """Append a logged step to metrics.jsonl and redraw the loss curve beside it (loss.png)."""
    append_metrics(metrics_log, record)
    plot_metrics(metrics_log, os.path.join(os.path.dirname(metrics_log), "loss.png"), "step", "loss", "pretraining loss",
                 log_y=True)


def sample_prompts(args, text_encoder):
    """The prompts of the sample grids (none with --sample-every 0), checked against the text encoder
    now: a text cache without them fails at the start, not hours later."""
    prompts = [p for p, _ in read_prompts(args.sample_prompts)][:args.sample_n] if args.sample_every else []
    if prompts:
        try:
            text_encoder.encode(prompts)
        except EmuError as e:
            raise EmuError(f"--sample-prompts: {e} (--prompts {args.sample_prompts}), or pass --sample-every 0") from None
    return prompts


def resume(ckpt_path, stages, world, net, ema, opt, sched, gen):
    """Load the checkpoint at `ckpt_path` (None: a fresh start) into the live objects; return where
    training stands: (step, skipped files, this rank's data position in the current stage, bad steps)."""
    step, skipped, position, bad = 0, {}, None, {"in_a_row": 0, "total": 0}
    if ckpt_path:
        ckpt = resume_training_state(ckpt_path, net, ema, opt, sched, gen)
        step, skipped, bad = ckpt["step"], ckpt.get("skipped", {}), ckpt.get("bad_steps", bad)
        if ckpt.get("stage", 0) == stage_at(stages, step)[0]:  # the data position of a stage still under way
            position = rank_entry(ckpt, "data_position", world, ckpt_path)
        gen.set_state(rank_entry(ckpt, "gens", world, ckpt_path, default=ckpt["gen"]))
    return step, skipped, position, bad


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
