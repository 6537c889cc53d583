"""Pixel diffusion, Imagen-style: a text-to-image U-Net on small images and a diffusion upsampler.

Emu's quality-tuning also works on a pixel diffusion model like Imagen (emu_paper.txt, section 4.2,
Figure 10), and Emu upsamples the curated images that are smaller than the target size with a pixel
diffusion upsampler inspired by Imagen's (section 3.3). Both are emu.unet.UNet, configured:

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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from emu.diffusion import GaussianDiffusion, classifier_free_guidance
from emu.unet import UNet, UNetConfig


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

# The toy models make toy-world images (emu/toyworld.py renders them at 32x32): a 16x16 base model
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


def noise_augment(diffusion, images, t_aug, generator=None):
    """Corrupt `images` by the forward process to timesteps t_aug: sqrt(ab) x + sqrt(1 - ab) eps.

    :param images: (N, C, H, W) conditioning images.
    :param t_aug: an int or (N,) integer timesteps (0 barely changes them; T - 1 leaves almost only noise).
    :return: (N, C, H, W)
    """
    t_aug = torch.as_tensor(t_aug, device=images.device).expand(len(images))
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return diffusion.q_sample(images, t_aug, noise)


def aug_timestep(diffusion, aug_level):
    """The integer timestep of an augmentation level in [0, 1] (Imagen's aug_level is continuous time)."""
    return round(aug_level * (diffusion.num_timesteps - 1))


def upsampler_condition(diffusion, low_res, size, t_aug, generator=None):
    """What the upsampler sees of the low-resolution image: upsampled to `size`, then noise-augmented.

    The noise is added at the target size, so it is i.i.d. per pixel the model sees, as in q_sample.
    :param low_res: (N, 3, h, w) in [-1, 1].
    :param t_aug: (N,) augmentation timesteps.
    :return: (N, 3, H, W)
    """
    return noise_augment(diffusion, resize(low_res, size), t_aug, generator)


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


def check_size(model, size):
    """Raise if the U-Net cannot work on images of `size` (H, W): each level halves them."""
    factor = 2 ** (len(model.cfg.channel_mult) - 1)
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
             generator=None, percentile=0.995, sampler="ddim", eta=0.0):
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
    :return: (N, 3, H, W) in [-1, 1].
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    check_size(model, size)
    device = next(model.parameters()).device
    low_res = low_res.to(device)
    t_aug = torch.full((len(low_res),), aug_timestep(diffusion, aug_level), device=device)
    cond = upsampler_condition(diffusion, low_res, size, t_aug, generator)  # (N, 3, H, W)
    noise = torch.randn(len(low_res), model.cfg.in_channels, *size, generator=generator, device=device)
    return guided_sample(model, diffusion, noise, text, uncond, steps, cfg_scale, percentile, sampler, eta, generator,
                         model_kwargs={"cond": cond, "t_aug": t_aug})
