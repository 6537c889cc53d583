"""Train the autoencoder that maps images to the latents the diffusion U-Net works in.

Emu's autoencoder (emu_paper.txt, section 3.1) has 16 latent channels, a fixed Fourier feature
transform on its input and an adversarial loss. Changing the flags gives the other rows of Table 1:

    python data/make_toy.py                                  # once: the toy haystack
    python train_ae.py                                       # toy Fourier-AE-16: about a minute on a CPU
    python train_ae.py --latent-channels 4 --no-fourier --out runs/ae4    # AE-4
    python train_ae.py --arch muse                           # the Muse-like model's VQ tokenizer -> runs/vq
    python train_ae.py --arch kandinsky                      # Kandinsky's MoVQ -> runs/movq

The last --holdout images of the data folder are never trained on; PSNR and SSIM are measured on
them, and so is the latent scale factor that gives the diffusion model unit-variance latents (the
autoencoder's and MoVQ's; the Muse-like model reads token ids, not latents).
Writes OUT/ckpt.pt (to resume), OUT/config.json + OUT/model.safetensors (the trained autoencoder,
what the other scripts load) and OUT/metrics.json.
"""
import argparse
import dataclasses
import json
import os
import time

import torch

from emu import EmuError
from emu.models.autoencoder import PRESETS, AELoss, Autoencoder, PatchDiscriminator, init_patch_paths_from_pca
from emu.models.first_stage import save_autoencoder
from emu.checkpoint import (append_metrics, load_checkpoint, load_state_dict_checked, rng_state, save_checkpoint,
                            set_rng_state)
from emu.datasets.folders import EpochBatches, ImageCaptionFolder, SkipLog, collate
from emu.evaluation.metrics import psnr, ssim
from emu.models.vq import VQ_PRESETS, VQTokenizer, codebook_usage, vq_training_losses
from emu.models.perceptual import PerceptualLoss
from emu.training.loop import learning_rate_factor, resume_path


OUT_DIRS = {"ldm": "runs/ae", "muse": "runs/vq", "kandinsky": "runs/movq"}  # where --arch's first stage goes by default
# (--arch, --preset) trained without the adversarial loss unless --adversarial: on the toy haystack it cost
# reconstruction. The toy autoencoder, held-out PSNR without / with it from step 400: 28.9 / 28.4 dB at
# 600 steps, 29.4 / 29.3 dB at 1200 steps, where the toy prompts' real images passed through it kept their
# shape for the attribute classifier 50% / 47% of the time; 900 steps without it and with the cooldown:
# 30.9 dB, 49%. The toy MoVQ: from step 400 to 600 with it, held-out PSNR fell from 26.2 to 24.9 dB and the
# share of codes a batch uses from 55% to 29%; 900 steps without it (cooldown 200): 28.2 dB, every code in
# use. (README, "What made the toy model follow its prompts".)
TOY_WITHOUT_ADVERSARIAL = {("ldm", "toy"), ("ldm", "toy-f8"), ("kandinsky", "toy-movq")}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/toy/haystack", help="folder of key.png + key.txt pairs")
    p.add_argument("--arch", default="ldm", choices=sorted(OUT_DIRS),
                   help="ldm: the latent diffusion model's autoencoder; muse: the Muse-like model's VQ tokenizer (emu/variants/muse.py), "
                        "trained with the same losses plus the quantizer's; kandinsky: MoVQ, a VQ tokenizer whose code "
                        "modulates the decoder's norms (emu/variants/kandinsky.py)")
    p.add_argument("--out", default=None, help="output directory (checkpoint, trained model, metrics); default runs/ae, "
                                               "runs/vq for --arch muse, runs/movq for --arch kandinsky")
    p.add_argument("--image-size", type=int, default=32, help="training resolution in pixels")
    p.add_argument("--holdout", type=int, default=256, help="the last N images are held out for evaluation")
    # model
    p.add_argument("--preset", default=None, help="size: toy (kandinsky: toy-movq), or the real one (ldm: toy, toy-f8 (8x down), emu: "
                                                  "emu/models/autoencoder.py; muse: muse; kandinsky: movq: emu/models/vq.py)")
    p.add_argument("--latent-channels", type=int, default=None, help="latent channels, e.g. 4, 8 or 16 (default: the preset's)")
    p.add_argument("--fourier", action=argparse.BooleanOptionalAction, default=None,
                   help="lift RGB with Fourier features before the encoder (default: the preset's, on)")
    # losses
    p.add_argument("--fourier-scale", type=float, default=None,
                   help="standard deviation of the Fourier features' random frequencies (default: the preset's, 1.0)")
    p.add_argument("--kl-weight", type=float, default=None, help="weight of the KL term per latent element (default: the preset's)")
    p.add_argument("--adversarial", action=argparse.BooleanOptionalAction, default=None,
                   help="train against a PatchGAN discriminator from --disc-start on (default: on, but off for the toy "
                        "autoencoder and the toy MoVQ, where it cost reconstruction: see TOY_WITHOUT_ADVERSARIAL)")
    p.add_argument("--disc-start", type=int, default=400, help="step at which the adversarial loss and the discriminator start")
    p.add_argument("--disc-weight", type=float, default=None,
                   help="scale of the adaptive adversarial weight (default: the preset's; 0.5, the toy presets 0.1)")
    p.add_argument("--perceptual-weights", default=None,
                   help="local safetensors file of LPIPS/VGG16 weights (layout in emu/models/perceptual.py); no perceptual loss without it")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="weight of the perceptual loss")
    # optimisation
    p.add_argument("--pca-start", action="store_true",
                   help="start the autoencoder's linear patch paths at the PCA code of the training images' patches "
                        "(emu.models.autoencoder.init_patch_paths_from_pca): a sharper autoencoder in the same steps")
    p.add_argument("--steps", type=int, default=900, help="training steps")
    p.add_argument("--bs", type=int, default=16, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (both networks)")
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--cooldown", type=int, default=None,
                   help="the last N of --steps decay the learning rate linearly to 0 (default: a third of --steps; "
                        "0: constant to the end)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and posterior samples")
    # bookkeeping
    p.add_argument("--log-every", type=int, default=50, help="print the losses every N steps")
    p.add_argument("--eval-every", type=int, default=200, help="measure held-out PSNR / SSIM every N steps")
    p.add_argument("--save-every", type=int, default=500, help="write OUT/ckpt.pt every N steps")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' for OUT/ckpt.pt if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    return p


def learning_rate(step, args):
    """Linear warm-up to --lr over --warmup steps, constant, and with --cooldown a linear decay to 0 over
    the last --cooldown steps (main() has replaced the default None by its value)."""
    return args.lr * learning_rate_factor(step, args.warmup, args.steps, args.cooldown)


@torch.no_grad()
def reconstruct(ae, images, device, bs=64):
    """decode(encode(x)) of (N, 3, H, W) images, in batches, clamped to [-1, 1], on the CPU."""
    was_training = ae.training
    ae.eval()
    out = [ae.decode(ae.encode(images[i:i + bs].to(device))).clamp(-1, 1).cpu() for i in range(0, len(images), bs)]
    ae.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def latent_std(ae, images, device, bs=64):
    """Standard deviation of the (unscaled) latents of `images`: the posterior means, or MoVQ's
    encoder output before the codebook. 1 / scale_factor (latent_scale)."""
    latents = (lambda x: ae.posterior(x)[0]) if isinstance(ae, Autoencoder) else ae.encode_latents
    means = [latents(images[i:i + bs].to(device)).cpu() for i in range(0, len(images), bs)]
    return torch.cat(means).std().item()


def main(args):
    vq = args.arch != "ldm"  # a VQ tokenizer: Muse's, or MoVQ
    presets = {"ldm": PRESETS, "muse": {k: v for k, v in VQ_PRESETS.items() if not v.spatial_norm},
               "kandinsky": {k: v for k, v in VQ_PRESETS.items() if v.spatial_norm}}[args.arch]
    args.preset = args.preset or ("toy-movq" if args.arch == "kandinsky" else "toy")
    if args.preset not in presets:
        raise EmuError(f"--preset {args.preset}: --arch {args.arch} has presets {', '.join(sorted(presets))}")
    overrides = {"latent_channels": args.latent_channels, "fourier": args.fourier, "fourier_scale": args.fourier_scale,
                 "kl_weight": args.kl_weight}
    if args.pca_start and (vq or not PRESETS[args.preset].shortcuts):
        raise EmuError(f"--pca-start needs an autoencoder with shortcut paths (the toy presets), not --arch {args.arch} "
                       f"--preset {args.preset}")
    if vq and any(v is not None for v in overrides.values()):
        raise EmuError("--latent-channels, --fourier, --fourier-scale and --kl-weight are the autoencoder's; the VQ tokenizer "
                       "has none of them")
    args.out = args.out or OUT_DIRS[args.arch]
    if args.adversarial is None:
        args.adversarial = (args.arch, args.preset) not in TOY_WITHOUT_ADVERSARIAL
    if args.cooldown is None:
        args.cooldown = args.steps // 3
    disc_start = args.disc_start if args.adversarial else float("inf")  # never, without the adversarial loss
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)

    # data: the last --holdout images are only ever evaluated on
    if not os.path.isdir(args.data):
        raise EmuError(f"{args.data}: data folder not found (run python data/make_toy.py first)")
    data = ImageCaptionFolder(args.data, args.image_size, skip_bad=True)  # a broken file is left out, not fatal
    n_train = len(data) - args.holdout
    if n_train < args.bs or args.holdout < 1:
        raise EmuError(f"{args.data}: {len(data)} images is too few for --holdout {args.holdout} and --bs {args.bs}")
    train_set = torch.utils.data.Subset(data, range(n_train))
    heldout = data.load_all(n_train)  # (holdout - unusable ones, 3, H, W)
    bad = [item for i, item in sorted(data.skipped.items()) if i >= n_train]
    if len(heldout) == 0:
        raise EmuError(f"none of the {args.holdout} held-out samples could be used, e.g. {bad[0].path}: {bad[0].reason}")
    if bad:
        held_out_skips = SkipLog(show=0)
        held_out_skips.note(bad)
        print(f"held-out set of {args.holdout}: {held_out_skips.summary()}, e.g. {bad[0].path}")

    # models, losses, optimisers
    if vq:  # the same Encoder and Decoder around a codebook; no KL term
        cfg = VQ_PRESETS[args.preset]
        ae, kl_weight = VQTokenizer(cfg).to(device), 0.0
    else:
        cfg = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
        ae, kl_weight = Autoencoder(cfg).to(device), cfg.kl_weight
    if args.image_size % ae.downsample_factor:
        raise EmuError(f"--image-size {args.image_size} is not a multiple of the downsampling factor {ae.downsample_factor}")
    disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(device)
    perceptual = PerceptualLoss.from_file(args.perceptual_weights).to(device) if args.perceptual_weights else None
    if args.disc_weight is None:
        args.disc_weight = getattr(cfg, "disc_weight", 0.5)  # the VQ presets keep Stable Diffusion's 0.5
    loss_fn = AELoss(disc, kl_weight, args.disc_weight, disc_start, perceptual, args.perceptual_weight)
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, betas=(0.5, 0.9))  # GAN-friendly betas, as in VQGAN
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    side = args.image_size // ae.downsample_factor
    print(f"{'VQ tokenizer' if vq else 'autoencoder'}: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M "
          f"parameters, " + (f"tokens ({side}, {side}) from {cfg.codebook_size} codes" if vq else
                             f"latents ({cfg.latent_channels}, {side}, {side}), fourier {'on' if cfg.fourier else 'off'}")
          + f"; data: {n_train} train + {args.holdout} held-out images")

    step = 0
    ckpt_path = resume_path(args.resume, args.out)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        load_state_dict_checked(ae, ckpt["model"], ckpt_path)
        load_state_dict_checked(disc, ckpt["disc"], ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    elif args.pca_start:  # a fresh autoencoder starts as the PCA code of the training patches
        pca_db = init_patch_paths_from_pca(ae, data.load_all(0, min(n_train, 1024)).to(device))
        print(f"started from the PCA code of {ae.downsample_factor}x{ae.downsample_factor} patches: {pca_db:.2f} dB "
              f"on {min(n_train, 1024)} training images")
    # The batch order depends only on (seed, step), so a resumed run reads what an unbroken run would.
    # The loader gets its own generator: by default it draws a seed from the global RNG when it
    # starts, which would put a resumed run's posterior noise out of step with an unbroken run's.
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=EpochBatches(n_train, args.bs, args.seed, start_step=step),
                                         num_workers=args.workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))

    # train
    ae.train()
    t0, logs = time.time(), []
    skipped = SkipLog()  # unusable training samples, counted by reason
    metrics_log = os.path.join(args.out, "metrics.jsonl")  # append-only: survives a crash, keeps every run
    append_metrics(metrics_log, {"event": "resume" if ckpt_path else "start", "step": step, "time": time.time()})
    for batch in loader:
        if step >= args.steps:
            break
        skipped.note(batch.skipped)
        images = batch[0]
        if len(images) == 0:  # every sample unusable: a step without an update keeps resume in step
            step += 1
            continue
        lr = learning_rate(step, args)
        for group in opt.param_groups + opt_disc.param_groups:
            group["lr"] = lr
        x = images.to(device)  # (B, 3, H, W)
        # autoencoder step (the generator loss also leaves gradients in the discriminator; they are
        # cleared before the discriminator's own step)
        if vq:  # plus the quantizer's commitment loss; the codebook follows an EMA
            loss, recon, log = vq_training_losses(ae, loss_fn, x, step)
        else:
            recon, mean, logvar = ae(x)
            loss, log = loss_fn.generator_loss(x, recon, mean, logvar, ae.decoder.conv_out.weight, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        # discriminator step, from --disc-start on
        disc_loss = loss_fn.discriminator_loss(x, recon, step)
        if step >= disc_start:
            opt_disc.zero_grad(set_to_none=True)
            disc_loss.backward()
            opt_disc.step()
        logs.append({**log, "disc": disc_loss.item()})
        step += 1

        if logs and (step % args.log_every == 0 or step == args.steps):
            avg = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}
            print(f"step {step}/{args.steps}  rec {avg['rec']:.4f}  kl {avg['kl']:.2f}  gen {avg['gen']:.3f}  "
                  f"adv_weight {avg['adv_weight']:.3f}  disc {avg['disc']:.3f}  "
                  + (f"codes used {avg['usage']:.2f}  " if "usage" in avg else "") + f"{(time.time() - t0) / len(logs):.3f}s/step")
            append_metrics(metrics_log, {"step": step, **avg, "sec_per_step": (time.time() - t0) / len(logs)})
            t0, logs = time.time(), []
        if step % args.eval_every == 0 and step < args.steps:
            recon_held = reconstruct(ae, heldout, device)
            held = {"psnr": psnr(recon_held, heldout).mean().item(), "ssim": ssim(recon_held, heldout).mean().item()}
            print(f"step {step}: held-out PSNR {held['psnr']:.2f} dB  SSIM {held['ssim']:.4f}")
            append_metrics(metrics_log, {"step": step, "heldout_psnr": held["psnr"], "heldout_ssim": held["ssim"]})
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
                "model": ae.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                "opt_disc": opt_disc.state_dict(), "step": step, "args": vars(args), "rng": rng_state()})

    # evaluate, set the latent scale, save
    recon_held = reconstruct(ae, heldout, device)
    metrics = {"psnr": psnr(recon_held, heldout).mean().item(), "ssim": ssim(recon_held, heldout).mean().item(), "steps": step}
    if vq:  # the share of the codebook the held-out images use
        with torch.no_grad():
            metrics["codebook_usage"], metrics["perplexity"] = codebook_usage(ae.eval().encode(heldout.to(device)), cfg.codebook_size)
        if args.arch == "kandinsky":  # MoVQ's continuous latents, before the codebook, are what the decoder U-Net sees
            ae.cfg = dataclasses.replace(ae.cfg, latent_scale=1.0 / latent_std(ae, heldout, device))
            metrics["latent_scale"] = ae.cfg.latent_scale
    else:
        metrics.update(latent_channels=cfg.latent_channels, fourier=cfg.fourier)
        ae.scale_factor.fill_(1.0 / latent_std(ae, heldout, device))
        metrics["scale_factor"] = ae.scale_factor.item()
    save_autoencoder(ae, args.out)
    append_metrics(metrics_log, {"step": step, "heldout_psnr": metrics["psnr"], "heldout_ssim": metrics["ssim"], "final": True})
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    print(f"held-out PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  "
          + (f"codebook usage {metrics['codebook_usage']:.2f}" if vq else f"scale_factor {metrics['scale_factor']:.4f}")
          + (f"  latent_scale {metrics['latent_scale']:.4f}" if "latent_scale" in metrics else ""))
    print(f"saved the {'VQ tokenizer' if vq else 'autoencoder'} to {args.out}; training data: {skipped.summary()}")


if __name__ == "__main__":
    args = build_parser().parse_args()
    try:
        main(args)
    except EmuError as e:
        raise SystemExit(f"error: {e}")
