import torch

from emu.models.nn import normalization


def test_group_norm_groups_keep_at_least_four_channels():
    assert normalization(128).num_groups == 32  # Stable Diffusion's 32 groups of 4
    assert normalization(384).num_groups == 32  # wide layers: at most 32 groups
    assert normalization(16).num_groups == 4  # narrow toy layers: groups of 4, not instance norm
    assert normalization(96).num_groups == 24
    assert normalization(3).num_groups == 1


def test_group_norm_keeps_a_channels_brightness_relative_to_its_group():
    # Two channels of one group: one bright, one dark. Instance norm would map both to zeros;
    # a group of several channels keeps which one is brighter.
    x = torch.zeros(1, 16, 4, 4)
    x[:, 0], x[:, 1] = 2.0, -2.0
    x = x + 0.01 * torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    y = normalization(16)(x)
    assert y[0, 0].mean() > 0.5 and y[0, 1].mean() < -0.5
