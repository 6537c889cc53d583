"""The analytic FLOP count (emu/models/flops.py) against torch's FlopCounterMode on real forward passes."""
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from emu.models.flops import train_step_flops, unet_flops
from emu.variants.pixel import BASE_PRESETS, UPSAMPLER_PRESETS
from emu.text.encoder import TextEmbedding, TextImageEmbedding
from emu.models.unet import PRESETS, UNet, count_parameters

CONFIGS = {
    "toy": PRESETS["toy"],
    # three levels, attention everywhere, two transformer blocks and two ResBlocks per level
    "deep": replace(PRESETS["toy"], channel_mult=(1, 2, 3), attention_levels=(0, 1, 2), transformer_depth=2,
                    num_res_blocks=2),
    # other text widths and a head width that gives several heads per level
    "wide-text": replace(PRESETS["toy"], channel_mult=(1, 2), attention_levels=(0, 1), head_dim=16, context_dim=96,
                         clip_dim=80, t5_dim=40, pooled_dim=24),
    # the pixel models (emu/variants/pixel.py): T5 alone; the upsampler also takes its low-res image and augmentation level
    "pixel-base": BASE_PRESETS["toy"].unet,
    "pixel-upsampler": UPSAMPLER_PRESETS["toy"].unet,
    # Kandinsky's decoder: conditioned on an image embedding too
    "image-embedding": replace(PRESETS["toy"], image_embed_dim=24, image_tokens=3),
    # ... and its inpainting version, which also reads the masked latents and the mask
    "inpainting": replace(PRESETS["toy"], image_embed_dim=24, image_tokens=3, cond_channels=17),
}


def random_inputs(cfg, batch, latent_size, clip_tokens, t5_tokens):
    """Latents, timesteps and a TextEmbedding of random values. The masks are all True, so the
    U-Net's without_padding() keeps every token and the token counts are the ones asked for."""
    text = TextEmbedding(clip=torch.randn(batch, clip_tokens, cfg.clip_dim),
                         clip_mask=torch.ones(batch, clip_tokens, dtype=torch.bool),
                         t5=torch.randn(batch, t5_tokens, cfg.t5_dim),
                         t5_mask=torch.ones(batch, t5_tokens, dtype=torch.bool),
                         pooled=torch.randn(batch, cfg.pooled_dim))
    x = torch.randn(batch, cfg.in_channels, latent_size, latent_size)
    t = torch.randint(0, 1000, (batch,))
    return x, t, text


def measured_flops(cfg, batch, latent_size, clip_tokens, t5_tokens, backward=False):
    """FlopCounterMode's total for one forward (and backward) of UNet(cfg) on the CPU."""
    torch.manual_seed(0)
    unet = UNet(cfg)
    x, t, text = random_inputs(cfg, batch, latent_size, clip_tokens, t5_tokens)
    # On the CPU, scaled_dot_product_attention runs a fused kernel that FlopCounterMode does not
    # count (it reports 0 FLOPs for it); the math backend runs the same attention as two bmm's it does.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        extra = {"cond": torch.randn(batch, cfg.cond_channels, latent_size, latent_size)} if cfg.cond_channels else {}
        if cfg.aug_embedding:
            extra["t_aug"] = torch.randint(0, 1000, (batch,))
        if cfg.image_embed_dim:  # Kandinsky's decoder reads the image embedding with the text
            text = TextImageEmbedding(**vars(text), image=torch.randn(batch, cfg.image_embed_dim))
        out = unet(x, t, text, **extra)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_matches_flop_counter(name):
    cfg = CONFIGS[name]
    batch, latent_size, clip_tokens, t5_tokens = 2, 8, 7, 5
    assert unet_flops(cfg, latent_size, clip_tokens, t5_tokens, batch) == measured_flops(cfg, batch, latent_size, clip_tokens, t5_tokens)


def test_doubling_the_batch_doubles_the_count():
    cfg = CONFIGS["deep"]
    assert unet_flops(cfg, 8, 77, 77, batch=2) == 2 * unet_flops(cfg, 8, 77, 77, batch=1)
    assert train_step_flops(cfg, 8, 77, 77, batch=4) == 4 * train_step_flops(cfg, 8, 77, 77, batch=1)


def test_training_step_is_about_three_forwards():
    # The backward skips the input gradients of the first conv and of the conditioning projections
    # (nothing needs them), so the real forward + backward is a little under 3x the forward.
    cfg = CONFIGS["toy"]
    measured = measured_flops(cfg, 2, 8, 7, 5, backward=True)
    assert 0.95 * train_step_flops(cfg, 8, 7, 5, batch=2) < measured <= train_step_flops(cfg, 8, 7, 5, batch=2)


class Unpadded(TextEmbedding):
    """On the meta device the masks hold no values to cut padding by; with all-True masks
    without_padding() is the identity anyway."""

    def without_padding(self):
        return self


def test_emu_preset_count_on_the_meta_device():
    # The paper's 2.8B U-Net at 256x256 pixels (32x32 latents) with 77 + 77 text tokens, counted
    # by FlopCounterMode without allocating or computing anything.
    cfg, batch, latent_size, tokens = PRESETS["emu"], 1, 32, 77
    with torch.device("meta"):
        unet = UNet(cfg)
        x, t, text = random_inputs(cfg, batch, latent_size, tokens, tokens)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, Unpadded(**vars(text)))
    flops = unet_flops(cfg, latent_size, tokens, tokens, batch)
    assert flops == counter.get_total_flops()
    # The order of magnitude: each weight is applied once per pixel of its level, and the levels run
    # from 4x4 to 32x32 pixels, so 2 x params x 16 < FLOPs < 2 x params x 1024. It is 0.42 TFLOP.
    params = count_parameters(cfg)
    assert 2 * params * 16 < flops < 2 * params * 1024
    assert 1e11 < flops < 1e12
