"""The Imagen-like pixel diffusion models: base text-to-image U-Net and super-resolution upsampler."""
import dataclasses

import pytest
import torch

from emu.diffusion import dynamic_threshold
from emu.models.nn import ResBlock
from emu.variants.pixel import (BASE_PRESETS, UPSAMPLER_PRESETS, aug_timestep, base_generate, build_model,
                                noise_augment, resize, upsample, upsampler_condition, upsampler_training_loss)
from emu.text.encoder import TextEmbedding
from emu.datasets.toyworld import make_example
from emu.models.unet import SpatialTransformer, UNet, count_parameters


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def t5_text(batch, dim=64, length=6, seed=0):
    """A TextEmbedding of random T5 tokens (the CLIP fields, which a T5-only U-Net ignores, are zeros)."""
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(clip=torch.zeros(batch, 1, dim), clip_mask=torch.ones(batch, 1, dtype=torch.bool),
                         t5=torch.randn(batch, length, dim, generator=g),
                         t5_mask=torch.ones(batch, length, dtype=torch.bool), pooled=torch.zeros(batch, dim))


def randomize_outputs(unet):
    """Make the zero-initialised output layers random, so the untrained U-Net's output depends on its inputs."""
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    for block in unet.modules():
        if isinstance(block, ResBlock):  # its conv2 carries the timestep and augmentation embedding
            torch.nn.init.normal_(block.conv2.weight, std=0.02)
        if isinstance(block, SpatialTransformer):
            torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    return unet.eval()


def toy_images(n, size=32):
    """n toy-world images as (n, 3, size, size) in [-1, 1]."""
    arrays = [make_example(i, 0, size, photogenic=True)[0] for i in range(n)]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])


def test_presets_chain_and_have_the_papers_sizes():
    for name in ("toy", "imagen"):
        base, up = BASE_PRESETS[name], UPSAMPLER_PRESETS[name]
        assert base.image_size == up.low_res_size  # the upsampler takes the base model's images
        assert base.unet.in_channels == up.unet.in_channels == up.unet.cond_channels == 3
        assert base.unet.t5_only and up.unet.t5_only and up.unet.aug_embedding and not base.unet.aug_embedding
    assert UPSAMPLER_PRESETS["imagen"].image_size == 4 * UPSAMPLER_PRESETS["imagen"].low_res_size == 256
    assert 2.0e9 < count_parameters(BASE_PRESETS["imagen"].unet) < 2.5e9  # Imagen: 2B
    assert 0.55e9 < count_parameters(UPSAMPLER_PRESETS["imagen"].unet) < 0.65e9  # Imagen: 600M


def test_upsampler_output_has_the_target_size_and_depends_on_the_low_res_image_and_its_level():
    torch.manual_seed(0)
    model, diffusion = build_model(UPSAMPLER_PRESETS["toy"])
    model = randomize_outputs(model)
    x, t, text = torch.randn(2, 3, 32, 32), torch.tensor([100, 600]), t5_text(2)
    low, t_aug = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 0])
    cond = upsampler_condition(diffusion, low, 32, t_aug, torch.Generator().manual_seed(0))
    assert cond.shape == (2, 3, 32, 32)
    out = model(x, t, text, cond=cond, t_aug=t_aug)
    assert out.shape == (2, 3, 32, 32)
    other = upsampler_condition(diffusion, -low, 32, t_aug, torch.Generator().manual_seed(0))
    assert (model(x, t, text, cond=other, t_aug=t_aug) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (model(x, t, text, cond=cond, t_aug=torch.tensor([500, 500])) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="cond"):
        model(x, t, text)  # an upsampler without its low-res image is an error, not a silent zero


def test_noise_augment_at_level_zero_keeps_the_image_and_at_the_last_level_destroys_it():
    diffusion = build_model(UPSAMPLER_PRESETS["toy"])[1]
    images = toy_images(2)
    g = torch.Generator().manual_seed(0)
    assert (noise_augment(diffusion, images, 0, g) - images).abs().max() < 0.05
    destroyed = noise_augment(diffusion, images, diffusion.num_timesteps - 1, g)
    corr = torch.corrcoef(torch.stack([destroyed.flatten(), images.flatten()]))[0, 1]
    assert abs(corr) < 0.05


def test_noise_augment_has_the_forward_process_statistics_and_is_seeded():
    diffusion = build_model(UPSAMPLER_PRESETS["toy"])[1]
    images, t = torch.full((2, 3, 128, 128), 0.6), 400
    out = noise_augment(diffusion, images, torch.tensor([t, t]), torch.Generator().manual_seed(1))
    ab = diffusion.alphas_cumprod[t].item()
    assert out.mean().item() == pytest.approx(ab ** 0.5 * 0.6, abs=0.01)
    assert out.var().item() == pytest.approx(1 - ab, rel=0.03)
    assert torch.equal(out, noise_augment(diffusion, images, t, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, noise_augment(diffusion, images, t, torch.Generator().manual_seed(2)))


def test_a_few_upsampler_training_steps_reduce_the_loss_on_toy_images():
    # Predicting eps, the loss falls within a few steps (predicting v, as the toy preset does, the
    # first steps gain less: v at high noise is the image, which takes longer to learn).
    torch.manual_seed(0)
    model, diffusion = build_model(dataclasses.replace(UPSAMPLER_PRESETS["toy"], prediction="eps"))
    high = toy_images(4)
    low, text = resize(high, 16), t5_text(4)

    def fixed_loss():  # the same timesteps, noise and augmentation every time
        with torch.no_grad():
            return upsampler_training_loss(model, diffusion, high, low, text, torch.Generator().manual_seed(123)).item()

    before = fixed_loss()
    opt, g = torch.optim.Adam(model.parameters(), lr=2e-3), torch.Generator().manual_seed(0)
    for _ in range(10):
        loss = upsampler_training_loss(model, diffusion, high, low, text, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before


class Oracle(UNet):
    """Predicts the noise (or v) as if the clean image were `gain` times the upsampler's conditioning
    image, or `gain` times a fixed `image` for a base model; it ignores the text."""

    def __init__(self, cfg, diffusion, gain=1.0, image=None):
        super().__init__(cfg)
        self.diffusion, self.gain, self.image = diffusion, gain, image

    def forward(self, x, t, text, cond=None, t_aug=None):
        x0 = self.gain * (self.image if cond is None else cond)
        ab = self.diffusion._ab(t, x)
        return self.diffusion.target(x0, t, (x - ab.sqrt() * x0) / (1 - ab).sqrt())


def test_upsample_carries_the_low_res_image_through_guidance_and_sampling():
    cfg = UPSAMPLER_PRESETS["toy"]
    diffusion = build_model(cfg)[1]
    low = toy_images(2, size=16)
    out = upsample(Oracle(cfg.unet, diffusion), diffusion, low, 32, t5_text(2), t5_text(2, seed=1), steps=4,
                   cfg_scale=3.0, aug_level=0.0, generator=torch.Generator().manual_seed(0))
    # the same generator draws the same augmentation noise first
    cond = upsampler_condition(diffusion, low, 32, torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, cond.clamp(-1, 1), atol=1e-4, rtol=0)
    assert (out - resize(low, 32)).abs().max() < 0.05  # level 0 barely augments


def test_sampling_rescales_an_overshooting_prediction_instead_of_saturating_it():
    # A model whose clean-image estimate is 3x too contrasty everywhere: dynamic thresholding scales
    # each image down to [-1, 1] (at its 99.5th percentile of |x|), where clipping would saturate it.
    cfg = UPSAMPLER_PRESETS["toy"]
    diffusion = build_model(cfg)[1]
    low = toy_images(2, size=16)
    out = upsample(Oracle(cfg.unet, diffusion, gain=3.0), diffusion, low, 32, t5_text(2), steps=4, aug_level=0.0,
                   generator=torch.Generator().manual_seed(0))
    cond = upsampler_condition(diffusion, low, 32, torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, dynamic_threshold(3 * cond), atol=1e-4, rtol=0)
    assert (out - (3 * cond).clamp(-1, 1)).abs().mean() > 0.1
    base = BASE_PRESETS["toy"]
    image = toy_images(2, size=16)
    out = base_generate(Oracle(base.unet, diffusion, gain=3.0, image=image), diffusion, t5_text(2), None, 16, steps=4,
                        cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, dynamic_threshold(3 * image), atol=1e-4)


def test_upsample_takes_any_batch_to_the_asked_size_in_range():
    torch.manual_seed(0)
    model, diffusion = build_model(UPSAMPLER_PRESETS["toy"])
    model = randomize_outputs(model)
    images = torch.rand(3, 3, 12, 20) * 2 - 1  # not the size the model is meant for, and not square
    run = lambda seed: upsample(model, diffusion, images, (24, 40), t5_text(3), t5_text(3, seed=1), steps=3,
                                cfg_scale=4.0, generator=torch.Generator().manual_seed(seed))
    out = run(0)
    assert out.shape == (3, 3, 24, 40) and out.abs().max() <= 1
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))
    with pytest.raises(ValueError, match="divisible by 4"):
        upsample(model, diffusion, images, (26, 40), t5_text(3))


def test_base_generate_makes_seeded_images_in_range():
    torch.manual_seed(0)
    cfg = BASE_PRESETS["toy"]
    model, diffusion = build_model(cfg)
    model = randomize_outputs(model)
    run = lambda seed: base_generate(model, diffusion, t5_text(2), t5_text(2, seed=1), cfg.image_size, steps=3,
                                     cfg_scale=4.0, generator=torch.Generator().manual_seed(seed))
    out = run(0)
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))


def test_aug_level_maps_zero_and_one_to_the_first_and_last_timestep():
    diffusion = build_model(UPSAMPLER_PRESETS["toy"])[1]
    assert aug_timestep(diffusion, 0.0) == 0 and aug_timestep(diffusion, 1.0) == diffusion.num_timesteps - 1
