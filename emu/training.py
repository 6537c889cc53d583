"""What pretraining and quality-tuning share: the training step, EMA, the learning-rate warm-up,
caption dropout, and the training checkpoint with everything needed to resume exactly.
"""
import copy
import os

import torch

from emu.checkpoint import load_checkpoint, load_state_dict_checked, rng_state, save_checkpoint, set_rng_state


def drop_captions(captions, p, generator):
    """Replace each caption by "" with probability p: the model also learns the unconditional
    prediction that classifier-free guidance needs."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def make_ema(model):
    """A frozen copy of `model` whose weights follow an exponential moving average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def warmup_schedule(optimizer, warmup_steps):
    """Linear warm-up from 0 to the base learning rate over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def train_step(unet, ae, text_encoder, diffusion, batch, opt, sched, gen, args):
    """One optimisation step of latent diffusion on a batch of (images, captions).

    The autoencoder and the text towers are frozen: images become latents and captions become
    embeddings without gradients; only the U-Net learns.
    :return: the loss as a float.
    """
    images, captions = batch
    device = next(unet.parameters()).device
    with torch.no_grad():
        latents = ae.encode(images.to(device))  # (B, C, H/f, W/f)
        text = text_encoder.encode(drop_captions(captions, args.caption_dropout, gen)).to(device)
    loss = diffusion.training_loss(unet, latents, text, noise_offset=args.noise_offset, generator=gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def save_training_state(path, unet, ema, opt, sched, step, gen, args, **extra):
    """Atomically write {model, ema, opt, sched, step, args, rng, gen, ...} to `path`."""
    save_checkpoint(path, {
        "model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
        "sched": sched.state_dict(), "step": step, "args": vars(args), "rng": rng_state(),
        "gen": gen.get_state(), "unet_config": _config_dict(unet.cfg), **extra,
    })


def resume_training_state(path, unet, ema, opt, sched, gen):
    """Load a checkpoint written by save_training_state into live objects; return it (step etc.)."""
    ckpt = load_checkpoint(path)
    load_state_dict_checked(unet, ckpt["model"], path)
    load_state_dict_checked(ema, ckpt["ema"], path)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    gen.set_state(ckpt["gen"])
    set_rng_state(ckpt["rng"])
    return ckpt


def resume_path(resume, out_dir):
    """The checkpoint to resume from: an explicit path, or `out_dir/ckpt.pt` for 'auto' (if it exists)."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out_dir, "ckpt.pt")
        return path if os.path.exists(path) else None
    return resume


def add_training_flags(p):
    """Add the flags shared by the scripts that train a diffusion U-Net (pretrain.py, qtune.py)."""
    p.add_argument("--bs", type=int, default=32, help="batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--ema-decay", type=float, default=0.995, help="decay of the EMA weights used for sampling")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of training on the empty caption (for CFG)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, noise and timesteps")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


def _config_dict(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
