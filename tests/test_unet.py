import dataclasses
import hashlib
from unittest import mock

import pytest
import torch

from emu.models.nn import ResBlock
from emu.text.encoder import TextEmbedding, TextImageEmbedding
from emu.models.unet import PRESETS, SpatialTransformer, UNet, UNetConfig, count_parameters


def random_text(batch, cfg, lengths=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    lc, lt = 10, 9
    clip_mask = torch.arange(lc)[None] < torch.tensor(lengths)[:, None]
    t5_mask = torch.arange(lt)[None] < torch.tensor(lengths)[:, None]
    return TextEmbedding(clip=torch.randn(batch, lc, cfg.clip_dim, generator=g), clip_mask=clip_mask,
                         t5=torch.randn(batch, lt, cfg.t5_dim, generator=g), t5_mask=t5_mask,
                         pooled=torch.randn(batch, cfg.pooled_dim, generator=g))


def toy_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(PRESETS["toy"]).eval()


def test_output_shape_and_zero_at_init():
    unet = toy_unet()
    x = torch.randn(2, 16, 8, 8)
    out = unet(x, torch.tensor([3, 900]), random_text(2, unet.cfg))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


def nontrivial_unet():
    """A toy U-Net whose zero-initialised output layers are made random, so its output depends on text."""
    unet = toy_unet()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    for block in unet.modules():  # and the zero-initialised transformer outputs
        if hasattr(block, "proj_out"):
            torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    return unet


def test_output_depends_on_text_but_not_on_padding():
    unet = nontrivial_unet()
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([100, 100])
    text = random_text(2, unet.cfg)
    base = unet(x, t, text)
    padded = dataclasses.replace(text, t5=text.t5.clone(), clip=text.clip.clone())
    padded.t5[~text.t5_mask] = 99.0  # change only the padded tokens
    padded.clip[~text.clip_mask] = -99.0
    assert torch.allclose(unet(x, t, padded), base, atol=1e-5)
    other = random_text(2, unet.cfg, seed=1)
    assert (unet(x, t, other) - base).abs().max() > 1e-3


def test_cutting_padding_columns_changes_nothing():
    unet = nontrivial_unet()
    text = random_text(2, unet.cfg, lengths=(3, 6))
    cut = text.without_padding()
    assert cut.clip.shape[1] == cut.t5.shape[1] == 6 and cut.clip_mask.all(dim=0).sum() == 3
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([10, 500])
    with mock.patch.object(TextEmbedding, "without_padding", lambda self: self):  # attend to every column
        full = unet(x, t, text)
    torch.testing.assert_close(unet(x, t, text), full, atol=1e-5, rtol=1e-5)


def test_non_square_latents_and_other_channel_counts():
    cfg = dataclasses.replace(PRESETS["toy"], in_channels=4)
    unet = UNet(cfg)
    x = torch.randn(1, 4, 8, 16)
    assert unet(x, torch.tensor([5]), random_text(1, cfg, lengths=(4,))).shape == x.shape


def test_emu_preset_builds_on_meta_device_with_about_2_8b_parameters():
    n = count_parameters(PRESETS["emu"])
    assert 2.7e9 < n < 2.9e9, n


def state_dict_fingerprint(cfg):
    """sha256 of every state-dict key with its shape, in order, for UNet(cfg) built on the meta device."""
    with torch.device("meta"):
        model = UNet(cfg)
    listing = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())
    return len(model.state_dict()), hashlib.sha256(listing.encode()).hexdigest()


def test_default_config_builds_the_same_parameters_as_before_the_pixel_options():
    # Checkpoints store unet_config as a dict of the fields they knew and are rebuilt with
    # UNetConfig(**dict): the fields added since (t5_only, cond_channels, aug_embedding) must default
    # to the model those checkpoints hold. The fingerprints were taken before those fields existed.
    assert state_dict_fingerprint(UNetConfig()) == (
        214, "25a86e7929e85a95b91d4af3057dd26d43a89d67afdae04b3cdfaccf36c17e36")
    assert count_parameters(UNetConfig()) == 2_429_904
    assert state_dict_fingerprint(PRESETS["emu"]) == (
        1376, "ff56dbf7bd169c98149d3398b9cd2e8d33c98597b11efbde0739f33afab7bf93")
    assert count_parameters(PRESETS["emu"]) == 2_797_888_528


def test_t5_only_ignores_clip_and_pools_the_real_t5_tokens():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["toy"], t5_only=True)
    unet = UNet(cfg)
    assert not any(name.startswith("clip_proj") for name, _ in unet.named_parameters())
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    for block in unet.modules():
        if isinstance(block, ResBlock):  # so the pooled vector in the timestep embedding shows in the output
            torch.nn.init.normal_(block.conv2.weight, std=0.02)
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([100, 700])
    text = random_text(2, cfg)
    base = unet(x, t, text)
    no_clip = dataclasses.replace(text, clip=torch.randn_like(text.clip), clip_mask=torch.zeros_like(text.clip_mask),
                                  pooled=torch.randn_like(text.pooled))
    assert torch.equal(unet(x, t, no_clip), base)
    padded = dataclasses.replace(text, t5=text.t5.clone())
    padded.t5[~text.t5_mask] = 99.0  # only padding changes: neither the attention nor the mean sees it
    torch.testing.assert_close(unet(x, t, padded), base, atol=1e-5, rtol=1e-5)
    assert (unet(x, t, random_text(2, cfg, seed=1)) - base).abs().max() > 1e-3
    with mock.patch.object(SpatialTransformer, "forward", lambda self, x, context, mask: x):
        # without cross-attention the T5 tokens still reach the output, through their mean
        assert (unet(x, t, random_text(2, cfg, seed=1)) - unet(x, t, text)).abs().max() > 1e-3


def test_conditioning_image_and_augmentation_level_are_extra_inputs():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["toy"], in_channels=3, cond_channels=3, aug_embedding=True)
    unet = UNet(cfg)
    assert unet.conv_in.in_channels == 6 and unet.conv_out.out_channels == 3
    x, t, text, cond = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), random_text(2, cfg), torch.randn(2, 3, 8, 8)
    assert unet(x, t, text, cond=cond, t_aug=torch.tensor([0, 0])).shape == x.shape
    with pytest.raises(ValueError, match="t_aug"):
        unet(x, t, text, cond=cond)
    with pytest.raises(ValueError, match="cond"):
        latent_unet = UNet(PRESETS["toy"])
        latent_unet(torch.randn(1, 16, 8, 8), t[:1], random_text(1, PRESETS["toy"], lengths=(4,)), cond=cond[:1])


def test_an_image_embedding_conditions_through_the_time_embedding_and_the_context():
    """Kandinsky's decoder: the CLIP image embedding is added to the time embedding and becomes
    extra cross-attention tokens; the output depends on it through either path."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["toy"], image_embed_dim=24, image_tokens=3)
    unet = UNet(cfg)
    assert unet.image_to_tokens.out_features == 3 * cfg.context_dim
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    for block in unet.modules():
        if isinstance(block, ResBlock):
            torch.nn.init.normal_(block.conv2.weight, std=0.02)
        if isinstance(block, SpatialTransformer):  # zero-initialised: the identity until trained
            torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x, t, text = torch.randn(2, 16, 8, 8), torch.tensor([100, 700]), random_text(2, cfg)
    embed = torch.randn(2, 24)
    with_image = lambda image: TextImageEmbedding(**vars(text), image=image)
    base = unet(x, t, with_image(embed))
    assert (unet(x, t, with_image(torch.randn(2, 24))) - base).abs().max() > 1e-3
    with mock.patch.object(SpatialTransformer, "forward", lambda self, x, context, mask: x):
        # without cross-attention the image embedding still reaches the output, through the time embedding
        assert (unet(x, t, with_image(torch.randn(2, 24))) - unet(x, t, with_image(embed))).abs().max() > 1e-3
    unet.image_proj.weight.data.zero_()
    unet.image_proj.bias.data.zero_()
    # and through the context alone
    assert (unet(x, t, with_image(torch.randn(2, 24))) - unet(x, t, with_image(embed))).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image embedding"):
        unet(x, t, text)
    with pytest.raises(ValueError, match="image embedding"):  # and a plain U-Net refuses one
        UNet(PRESETS["toy"])(x, t, with_image(embed))
