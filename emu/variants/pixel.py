"""Pixel diffusion, Imagen-style: a text-to-image U-Net on small images and a diffusion upsampler.

Emu's quality-tuning also works on a pixel diffusion model like Imagen (emu_paper.txt, section 4.2,
Figure 10), and Emu upsamples the curated images that are smaller than the target size with a pixel
diffusion upsampler inspired by Imagen's (section 3.3). Both are emu.models.unet.UNet, configured:

  * the base model denoises 3-channel pixels and is conditioned on T5 tokens alone (t5_only);
    it trains with GaussianDiffusion.training_loss(model, images, text), like the latent model;
  * the upsampler also takes the low-resolution image, upsampled to the target size and concatenated
    to its input on the channels (cond_channels=3), and the level of noise augmentation that image
    went through (aug_embedding).

Noise conditioning augmentation (Saharia et al. 2022): in training, the low-resolution image is
corrupted by the forward diffusion process to a random timestep t_aug and the model is told t_aug,
so it learns to cope with the artefacts of a base model's samples; in sampling, a fixed small level
is used. Both models sample with classifier-free guidance and dynamic thresholding.
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.checkpoint import config_from_dict
from emu.diffusion import GaussianDiffusion, classifier_free_guidance
from emu.models.unet import UNet, UNetConfig


@dataclass
class PixelConfig:
    unet: UNetConfig
    image_size: int            # side of the images the model makes, in pixels
    low_res_size: int = 0      # side of the low-resolution input (upsamplers; 0 for the base model)
    schedule: str = "cosine"   # noise schedule, for denoising and for the noise augmentation
    timesteps: int = 1000
    prediction: str = "eps"


# Where the numbers come from: the Emu paper's text gives none of them. Imagen (Saharia et al. 2022)
# gives the parameter counts, the upsampler's layout, the cosine schedule and noise prediction, as
# recalled from that paper. Our transformer stages pair self- with cross-attention and add a
# feed-forward, where Imagen's layers differ in detail.

# The toy models make toy-world images (emu/datasets/toyworld.py renders them at 32x32): a 16x16 base model
# (1.8M parameters) and a 16 -> 32 upsampler (1.5M). A training step at batch 16 takes about 0.3 s and
# 0.7 s on one CPU core, so each learns in minutes. They predict v: trained for 300 steps to predict
# eps, the upsampler had learnt the noise but not yet to use its low-res image (its samples were no
# closer to their own images than to others); predicting v, its samples followed the low-res images.
TOY_PIXELS = dict(in_channels=3, t5_only=True, head_dim=32, context_dim=64, t5_dim=64)
BASE_PRESETS = {
    "toy": PixelConfig(UNetConfig(**TOY_PIXELS, model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2)),
                       image_size=16, prediction="v"),
    # Imagen reports a 2B-parameter 64x64 base model conditioned on T5-XXL (4096 wide) but not its
    # widths (nor does the Emu paper). These are a guess in the style of improved DDPM (width 448,
    # multipliers 1, 2, 3, 4, three ResBlocks a level, attention at 32, 16 and 8 pixels): 2.3B parameters.
    "imagen": PixelConfig(UNetConfig(in_channels=3, t5_only=True, model_channels=448, channel_mult=(1, 2, 3, 4),
                                     num_res_blocks=3, attention_levels=(1, 2, 3), head_dim=64, context_dim=1024,
                                     t5_dim=4096), image_size=64),
}
UPSAMPLER_PRESETS = {
    "toy": PixelConfig(UNetConfig(**TOY_PIXELS, cond_channels=3, aug_embedding=True, model_channels=32,
                                  channel_mult=(1, 2, 2), attention_levels=(2,)), image_size=32, low_res_size=16,
                       prediction="v"),
    # Imagen's 64 -> 256 "Efficient U-Net" (600M parameters), as recalled from its appendix: width 128,
    # multipliers 1, 2, 4, 8 with 2, 4, 8, 8 ResBlocks a level, text cross-attention only at the lowest
    # resolution. Our U-Net has one ResBlock count for all levels: 4 gives 600M parameters.
    "imagen": PixelConfig(UNetConfig(in_channels=3, t5_only=True, cond_channels=3, aug_embedding=True,
                                     model_channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=4,
                                     attention_levels=(3,), head_dim=64, context_dim=1024, t5_dim=4096),
                          image_size=256, low_res_size=64),
}


def build_model(cfg, t5_dim=None):
    """The U-Net and GaussianDiffusion of a PixelConfig; `t5_dim` sets the text width (the T5 tower's)."""
    unet_cfg = cfg.unet if t5_dim is None else replace(cfg.unet, t5_dim=t5_dim)
    return UNet(unet_cfg), GaussianDiffusion(cfg.schedule, cfg.timesteps, cfg.prediction)


# -----------------------------------------------------------------------------
# the low-resolution conditioning

def resize(images, size):
    """Resize images with antialiased bicubic interpolation, clamped back to [-1, 1] (bicubic overshoots).

    :param images: (N, C, h, w) in [-1, 1].
    :param size: an int (square) or (H, W).
    :return: (N, C, H, W)
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def noise_augment(diffusion, images, t_aug, generator=None, noise=None):
    """Corrupt `images` by the forward process to timesteps t_aug: sqrt(ab) x + sqrt(1 - ab) eps.

    :param images: (N, C, H, W) conditioning images.
    :param t_aug: an int or (N,) integer timesteps (0 barely changes them; T - 1 leaves almost only noise).
    :param noise: eps, (N, C, H, W); drawn from `generator` when not given.
    :return: (N, C, H, W)
    """
    t_aug = torch.as_tensor(t_aug, device=images.device).expand(len(images))
    if noise is None:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return diffusion.q_sample(images, t_aug, noise)


def aug_timestep(diffusion, aug_level):
    """The integer timestep of an augmentation level in [0, 1] (Imagen's aug_level is continuous time)."""
    return round(aug_level * (diffusion.num_timesteps - 1))


def upsampler_condition(diffusion, low_res, size, t_aug, generator=None, noise=None):
    """What the upsampler sees of the low-resolution image: upsampled to `size`, then noise-augmented.

    The noise is added at the target size, so it is i.i.d. per pixel the model sees, as in q_sample.
    :param low_res: (N, 3, h, w) in [-1, 1].
    :param t_aug: (N,) augmentation timesteps.
    :param noise: the augmentation's noise, (N, 3, H, W); drawn from `generator` when not given.
    :return: (N, 3, H, W)
    """
    return noise_augment(diffusion, resize(low_res, size), t_aug, generator, noise)


# -----------------------------------------------------------------------------
# training and sampling

def upsampler_training_loss(model, diffusion, high_res, low_res, text, generator=None):
    """The denoising loss of the upsampler on a batch, with noise conditioning augmentation.

    Each image's low-resolution version is corrupted to a uniformly random t_aug in [0, T) that the
    model is told; the high-resolution image is then noised and denoised as in
    GaussianDiffusion.training_loss.
    :param high_res: (B, 3, H, W) target images in [-1, 1].
    :param low_res: (B, 3, h, w) their low-resolution versions (e.g. resize(high_res, h)).
    :param text: the batch's TextEmbedding (captions already dropped for classifier-free guidance).
    :return: the scalar loss.
    """
    t_aug = torch.randint(0, diffusion.num_timesteps, (len(high_res),), generator=generator, device=high_res.device)
    cond = upsampler_condition(diffusion, low_res, high_res.shape[-2:], t_aug, generator)
    conditioned = lambda x, t, text: model(x, t, text, cond=cond, t_aug=t_aug)
    return diffusion.training_loss(conditioned, high_res, text, generator=generator)


def size_multiple(model):
    """What an image side must be a multiple of for the U-Net: each level after the first halves it."""
    return 2 ** (len(model.cfg.channel_mult) - 1)


def check_size(model, size):
    """Raise if the U-Net cannot work on images of `size` (H, W): each level halves them."""
    factor = size_multiple(model)
    if size[0] % factor or size[1] % factor:
        raise ValueError(f"image size {size[0]}x{size[1]} must be divisible by {factor} for this U-Net")


def guided_sample(model, diffusion, noise, text, uncond, steps, cfg_scale, percentile, sampler, eta, generator,
                  model_kwargs=None):
    """Run the sampler from `noise` with classifier-free guidance and dynamic thresholding.

    :param noise: (B, 3, H, W) starting noise.
    :param percentile: of dynamic thresholding (diffusion.dynamic_threshold); None turns it off.
    :param model_kwargs: the model's other inputs (the upsampler's cond and t_aug), B rows each.
    :return: (B, 3, H, W) in [-1, 1].
    """
    model_fn = lambda x, t: classifier_free_guidance(model, x, t, text, uncond, cfg_scale, model_kwargs)
    x = diffusion.sample(model_fn, noise, steps=steps, sampler=sampler, eta=eta, generator=generator,
                         threshold_percentile=percentile)
    return x.clamp(-1, 1)


@torch.no_grad()
def base_generate(model, diffusion, text, uncond, image_size, steps=50, cfg_scale=5.0, percentile=0.995,
                  sampler="ddim", eta=0.0, generator=None):
    """Text to image with the base model.

    :param text: the prompts' TextEmbedding (B rows); uncond: the empty prompt's (B rows).
    :param generator: a torch.Generator on the model's device, for the noise.
    :return: (B, 3, image_size, image_size) in [-1, 1].
    """
    device = next(model.parameters()).device
    check_size(model, (image_size, image_size))
    noise = torch.randn(len(text), model.cfg.in_channels, image_size, image_size, generator=generator, device=device)
    return guided_sample(model, diffusion, noise, text, uncond, steps, cfg_scale, percentile, sampler, eta, generator)


@torch.no_grad()
def upsample(model, diffusion, low_res, size, text, uncond=None, steps=50, cfg_scale=1.0, aug_level=0.1,
             generator=None, percentile=0.995, sampler="ddim", eta=0.0, noise=None):
    """Upsample any batch of images with the upsampler: a base model's samples, or curated images
    smaller than the target size. The U-Net is convolutional, so neither size needs to be the one it
    was trained at, only divisible by 2 for each of its levels after the first.

    :param low_res: (N, 3, h, w) in [-1, 1].
    :param size: the output size, an int or (H, W).
    :param text: the images' TextEmbedding (N rows); without captions, the empty caption's.
    :param uncond: the empty caption's TextEmbedding (N rows); only needed when cfg_scale != 1.
    :param aug_level: the fixed noise-augmentation level in [0, 1] of the low-resolution input (a small
        one: Imagen sweeps it; 0.1 is a guess).
    :param generator: a torch.Generator on the model's device, for the augmentation and the noise.
    :param noise: (N, 3, H, W) starting noise; drawn from `generator` when not given.
    :return: (N, 3, H, W) in [-1, 1].
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    check_size(model, size)
    device = next(model.parameters()).device
    low_res = low_res.to(device)
    t_aug = torch.full((len(low_res),), aug_timestep(diffusion, aug_level), device=device)
    cond = upsampler_condition(diffusion, low_res, size, t_aug, generator)  # (N, 3, H, W)
    if noise is None:
        noise = torch.randn(len(low_res), model.cfg.in_channels, *size, generator=generator, device=device)
    return guided_sample(model, diffusion, noise, text, uncond, steps, cfg_scale, percentile, sampler, eta, generator,
                         model_kwargs={"cond": cond, "t_aug": t_aug})


# -----------------------------------------------------------------------------
# the cascade as one trained model (--arch pixel)

class PixelSpace(nn.Module):
    """The pixel model's "first stage": none. Images are what it denoises, so encode and decode
    return them as they are; the scripts treat it like the latent model's autoencoder."""
    downsample_factor = 1

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # says which device the model is on

    def encode(self, images):
        return images

    def decode(self, images):
        return images


class PixelCascade(nn.Module):
    """The base model and the upsampler, trained and quality-tuned together as one module.

    The two are independent networks with independent losses; summing the losses and stepping one
    AdamW over both trains each as if alone (AdamW scales every parameter's step by its own moments),
    and keeps one checkpoint, one EMA and one resume path for the pair. Imagen trains them
    separately; the gradient-norm clipping is the one thing they share here.

    forward() runs both, so that under DDP one forward pass covers every parameter.
    """

    def __init__(self, base_cfg, upsampler_cfg):
        super().__init__()
        self.cfg = {"base": base_cfg, "upsampler": upsampler_cfg}
        self.base = UNet(base_cfg.unet)
        self.upsampler = UNet(upsampler_cfg.unet)

    @property
    def factor(self):
        """How many times larger the upsampler's images are than the base model's."""
        up = self.cfg["upsampler"]
        return up.image_size // up.low_res_size

    @property
    def grad_checkpoint(self):
        return self.base.grad_checkpoint

    @grad_checkpoint.setter
    def grad_checkpoint(self, on):  # --grad-checkpoint: both U-Nets recompute their blocks in the backward pass
        self.base.grad_checkpoint = self.upsampler.grad_checkpoint = on

    def forward(self, x_low, t_low, x_high, t_high, text, cond, t_aug):
        """(base model output at x_low, upsampler output at x_high given its condition `cond`)."""
        return self.base(x_low, t_low, text), self.upsampler(x_high, t_high, text, cond=cond, t_aug=t_aug)

    def fsdp_units(self):
        """What FSDP gathers one at a time (emu/training/fsdp.py): each U-Net's units, then each U-Net."""
        return [*self.base.fsdp_units(), self.base, *self.upsampler.fsdp_units(), self.upsampler]


def build_cascade(preset, t5_dim):
    """The PixelCascade of a preset name ("toy", "imagen"), its text width set to the T5 tower's."""
    base, up = BASE_PRESETS[preset], UPSAMPLER_PRESETS[preset]
    return PixelCascade(replace(base, unet=replace(base.unet, t5_dim=t5_dim)),
                        replace(up, unet=replace(up.unet, t5_dim=t5_dim)))


def cascade_config_dict(model):
    """The cascade's configuration as plain values (a checkpoint's model_config)."""
    return {name: asdict(cfg) for name, cfg in model.cfg.items()}


def cascade_from_config(d):
    """A PixelCascade rebuilt from cascade_config_dict's output."""
    def pixel_config(fields):
        return PixelConfig(**{**fields, "unet": config_from_dict(UNetConfig, fields["unet"])})
    return PixelCascade(pixel_config(d["base"]), pixel_config(d["upsampler"]))


class CascadeDiffusion:
    """What the cascade learns, with the two calls train_step uses (emu/training/loop.py): the base
    model's denoising loss on the images downsized by the cascade's factor, plus the upsampler's on
    the images themselves given their downsized, noise-augmented versions."""

    def __init__(self, diffusion, factor):
        self.diffusion, self.factor = diffusion, factor

    def low_res(self, images):
        return resize(images, images.shape[-1] // self.factor)

    def training_noise(self, images, noise_offset=0.0, generator=None):
        """Every image's draws: base and upsampler timesteps and noise, the augmentation level and noise."""
        base = self.diffusion.training_noise(self.low_res(images), noise_offset, generator)
        up = self.diffusion.training_noise(images, noise_offset, generator)
        t_aug = torch.randint(0, self.diffusion.num_timesteps, (len(images),), generator=generator, device=images.device)
        aug_noise = torch.randn(images.shape, generator=generator, device=images.device)
        return {"t_low": base["t"], "noise_low": base["noise"], "t": up["t"], "noise": up["noise"],
                "t_aug": t_aug, "aug_noise": aug_noise}

    def training_loss(self, model, images, text, t_low, noise_low, t, noise, t_aug, aug_noise):
        """The sum of the two mean squared errors (`model` is a PixelCascade, or DDP around one)."""
        low, d = self.low_res(images), self.diffusion
        cond = upsampler_condition(d, low, images.shape[-2:], t_aug, noise=aug_noise)
        out_low, out_high = model(d.q_sample(low, t_low, noise_low), t_low, d.q_sample(images, t, noise), t, text,
                                  cond, t_aug)
        return (F.mse_loss(out_low.float(), d.target(low, t_low, noise_low).float())
                + F.mse_loss(out_high.float(), d.target(images, t, noise).float()))

    @torch.no_grad()
    def check_loss(self, model, images, text, seed=1234, aug_level=0.1):
        """Both losses at fixed timesteps and seeded noise (GaussianDiffusion.check_loss), the
        upsampler's low-resolution input augmented at the sampling level `aug_level`."""
        low = self.low_res(images)
        gen = torch.Generator(images.device).manual_seed(seed)
        t_aug = torch.full((len(images),), aug_timestep(self.diffusion, aug_level), device=images.device)
        cond = upsampler_condition(self.diffusion, low, images.shape[-2:], t_aug, gen)
        upsampler = lambda x, t, text: model.upsampler(x, t, text, cond=cond, t_aug=t_aug)
        return self.diffusion.check_loss(model.base, low, text, seed) + self.diffusion.check_loss(upsampler, images, text, seed)


@torch.no_grad()
def cascade_generate(model, diffusion, text, uncond, seeds, image_size, steps=25, cfg_scale=5.0, sampler="ddim",
                     eta=0.0, percentile=0.995, aug_level=0.1):
    """Text to image with the whole cascade: the base model at image_size / factor, then the upsampler.

    Each image's starting noise (at both sizes) comes from its own seed, so the same seed starts the
    same way in any model of the same sizes, whatever else is in the batch.
    :return: (B, 3, image_size, image_size) in [-1, 1].
    """
    device = next(model.parameters()).device
    low_size = image_size // model.factor
    per_seed = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise_low = torch.stack([torch.randn(3, low_size, low_size, generator=g) for g in per_seed]).to(device)
    noise = torch.stack([torch.randn(3, image_size, image_size, generator=g) for g in per_seed]).to(device)
    gen = torch.Generator(device).manual_seed(int(seeds[0]))  # ancestral noise and the augmentation
    check_size(model.base, (low_size, low_size))
    low = guided_sample(model.base, diffusion, noise_low, text, uncond, steps, cfg_scale, percentile, sampler, eta, gen)
    return upsample(model.upsampler, diffusion, low, image_size, text, uncond, steps, cfg_scale, aug_level, gen,
                    percentile, sampler, eta, noise)
