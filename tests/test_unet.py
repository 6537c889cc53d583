import dataclasses
from unittest import mock

import torch

from emu.text import TextEmbedding
from emu.unet import PRESETS, UNet, count_parameters


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
