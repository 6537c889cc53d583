"""Putting the parts together: autoencoder + text towers + U-Net + diffusion = text to image.

`build_unet` sizes a U-Net for a given autoencoder and text encoder; `TextToImage` loads a
training checkpoint (which records where its autoencoder and text towers live) and turns prompts
and seeds into images with classifier-free guidance.
"""
import dataclasses
import os

import torch

from emu import EmuError
from emu.autoencoder import load_autoencoder
from emu.checkpoint import load_checkpoint, load_state_dict_checked
from emu.data import make_grid, save_png, to_uint8
from emu.diffusion import GaussianDiffusion, classifier_free_guidance
from emu.text import TEXT_DTYPES, TextEncoder
from emu.text_cache import load_text_cache
from emu.unet import PRESETS, UNet, UNetConfig


def load_frozen_parts(ae_dir, clip_dir, t5_dir, device, text_dtype="bfloat16", text_cache=None):
    """The frozen autoencoder and text encoder the U-Net is trained against.

    The towers run in `text_dtype` ("bfloat16" or "float32"; embeddings come out float32 either way).
    With `text_cache` (a directory written by data/embed_captions.py) the towers are not loaded: the
    cache, checked to come from the towers in clip_dir and t5_dir in that dtype, supplies every embedding.
    """
    ae = load_autoencoder(ae_dir, device=device)
    dtype = TEXT_DTYPES[text_dtype]
    if text_cache:
        return ae, load_text_cache(text_cache, clip_dir, t5_dir, dtype)
    return ae, TextEncoder.load(clip_dir, t5_dir, dtype=dtype, device=device)


def build_unet(preset, ae, text_encoder):
    """A U-Net from a preset, with its in/out width set by the autoencoder's latent channels and
    its conditioning widths set by the text towers."""
    cfg = dataclasses.replace(PRESETS[preset], in_channels=ae.cfg.latent_channels, clip_dim=text_encoder.clip_dim,
                              t5_dim=text_encoder.t5_dim, pooled_dim=text_encoder.pooled_dim)
    return UNet(cfg)


def read_training_checkpoint(path):
    """What a training checkpoint holds: a .pt file, or the whole weights (and the plain part) of a
    sharded checkpoint directory that pretrain.py --fsdp writes (ckpt-<step>/)."""
    if os.path.isdir(path):
        from emu.fsdp import load_full_weights  # torch.distributed.checkpoint: loaded only when needed
        return load_full_weights(path)
    return load_checkpoint(path)


def unet_from_checkpoint(ckpt, path, weights="ema"):
    """Rebuild the U-Net recorded in a training checkpoint and load its `weights` ('ema' or 'model')."""
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["unet_config"].items()})
    unet = UNet(cfg)
    load_state_dict_checked(unet, ckpt[weights], path)
    return unet.eval().requires_grad_(False)


def diffusion_from_args(args):
    """The GaussianDiffusion described by a script's flags (or a checkpoint's saved args dict)."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k)
    return GaussianDiffusion(get("schedule"), get("timesteps"), get("prediction"))


class TextToImage:
    """A trained model, ready to sample."""

    def __init__(self, unet, ae, text_encoder, diffusion, image_size, name=""):
        self.unet, self.ae, self.text_encoder, self.diffusion = unet, ae, text_encoder, diffusion
        self.image_size, self.name = image_size, name

    @classmethod
    def from_checkpoint(cls, path, device="cpu", weights="ema"):
        ckpt = read_training_checkpoint(path)
        for key in ("unet_config", weights, "args"):
            if key not in ckpt:
                raise EmuError(f"{path}: not a diffusion training checkpoint (no '{key}' entry)")
        args = ckpt["args"]
        # Checkpoints from before --text-dtype ran their towers in float32.
        ae, text_encoder = load_frozen_parts(args["ae"], args["clip"], args["t5"], device, args.get("text_dtype", "float32"))
        unet = unet_from_checkpoint(ckpt, path, weights).to(device)
        return cls(unet, ae, text_encoder, diffusion_from_args(args), args["image_size"], name=str(path))

    @property
    def device(self):
        return next(self.unet.parameters()).device

    def initial_noise(self, seeds):
        """One latent noise tensor per seed, so the same seed gives the same start in any model."""
        side = self.image_size // self.ae.downsample_factor
        shape = (self.unet.cfg.in_channels, side, side)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def generate(self, prompts, seeds, cfg_scale=5.0, steps=25, sampler="ddim", eta=0.0, batch_size=64):
        """Images for `prompts` (one per prompt, seeded by `seeds`) as (B, 3, H, W) in [-1, 1]."""
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[i:i + batch_size], seeds[i:i + batch_size]
            text = self.text_encoder.encode(list(chunk)).to(self.device)
            uncond = self.text_encoder.encode([""] * len(chunk)).to(self.device)
            noise = self.initial_noise(chunk_seeds).to(self.device)
            gen = torch.Generator(self.device).manual_seed(int(chunk_seeds[0]))
            model_fn = lambda x, t: classifier_free_guidance(self.unet, x, t, text, uncond, cfg_scale)
            latents = self.diffusion.sample(model_fn, noise, steps=steps, sampler=sampler, eta=eta, generator=gen)
            out.append(self.ae.decode(latents).clamp(-1, 1).cpu())
        return torch.cat(out)


def sample_grid(path, unet, ae, text_encoder, diffusion, image_size, prompts, steps=25, cfg_scale=5.0, write=True):
    """Sample one image per prompt (seeds 0, 1, ...: the same starting noise every time, so the grids
    of successive checkpoints show what training changed), write them as one PNG grid at `path` if
    `write`, and return them as (N, H, W, 3) uint8. `unet` is in eval mode (training keeps its EMA so)."""
    images = to_uint8(TextToImage(unet, ae, text_encoder, diffusion, image_size).generate(
        prompts, list(range(len(prompts))), cfg_scale, steps))
    if write:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_png(path, make_grid(images, ncol=min(8, len(images))), {"prompts": " | ".join(prompts)})
    return images
