"""Layers shared by the autoencoder and the U-Net.

Small helpers in the style of improved-diffusion's nn.py: timestep embeddings, zero-initialised
modules, group norm, and the residual / resampling / attention blocks both models are built from.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.models.attention import attention


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps.

    :param t: (B,) tensor of timesteps.
    :param dim: output width.
    :return: (B, dim) float tensor.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module):
    """Zero every parameter of `module` and return it (output layers start as the identity/zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def normalization(channels, max_groups=32, min_group_size=4, eps=1e-6, groups=0):
    """GroupNorm with the most groups (at most `max_groups`, each of at least `min_group_size`
    channels) that divide `channels` evenly.

    The group size matters in narrow networks: a group of one channel is instance norm, which
    erases each channel's mean and spread per image, so a narrow decoder could no longer say how
    bright or how contrasty its image is. Stable Diffusion's 128-channel layers have 32 groups of
    4; narrower layers keep groups of at least 4 rather than more groups.
    """
    groups = groups or math.gcd(channels, max(1, min(max_groups, channels // min_group_size)))  # or as given
    return nn.GroupNorm(groups, channels, eps=eps)


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned normalisation (Zheng et al. 2022, the Kandinsky autoencoder):
    GroupNorm, then a per-pixel scale and shift computed by 1x1 convolutions from the quantised code
    `zq`, resized (nearest) to the feature map. The decoder is told what the code says at every
    position in every layer, which keeps neighbouring patches with the same code from looking alike."""

    def __init__(self, channels, code_channels):
        super().__init__()
        self.norm = normalization(channels)
        self.scale = nn.Conv2d(code_channels, channels, 1)
        self.shift = nn.Conv2d(code_channels, channels, 1)

    def forward(self, x, zq):
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm(x) * self.scale(zq) + self.shift(zq)


def norm_layer(channels, code_channels=0, eps=1e-6, groups=0):
    """GroupNorm, or a SpatialNorm conditioned on a code of `code_channels` channels."""
    return SpatialNorm(channels, code_channels) if code_channels else normalization(channels, eps=eps, groups=groups)


def apply_norm(norm, x, zq=None):
    """norm(x), passing a SpatialNorm its code."""
    return norm(x, zq) if isinstance(norm, SpatialNorm) else norm(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with a skip connection.

    With `emb_dim` set (the U-Net), a conditioning vector is projected to a per-channel scale and
    shift applied after the second norm (FiLM, as in improved-diffusion's use_scale_shift_norm), or
    with `emb_add` to a per-channel bias added before it (Stable Diffusion's ResBlocks). Without it
    (the autoencoder), the block is a plain residual block. With `code_channels` (a MoVQ decoder)
    both norms are SpatialNorms, conditioned on the quantised code passed as `zq`.
    """

    def __init__(self, in_ch, out_ch, emb_dim=None, dropout=0.0, code_channels=0, emb_add=False, eps=1e-6, groups=0):
        super().__init__()
        self.norm1 = norm_layer(in_ch, code_channels, eps, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_add = emb_add
        self.emb = nn.Linear(emb_dim, out_ch if emb_add else 2 * out_ch) if emb_dim else None
        self.norm2 = norm_layer(out_ch, code_channels, eps, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)) if emb_dim else nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb=None, zq=None):
        h = self.conv1(F.silu(apply_norm(self.norm1, x, zq)))
        if self.emb is not None and self.emb_add:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = apply_norm(self.norm2, h, zq)
        if self.emb is not None and not self.emb_add:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 convolution.

    With `shortcut`, the convolution learns a residual on top of 2x2 average pooling (the
    space-to-channel shortcut of DC-AE, Chen et al. 2024): the block starts close to plain
    downsampling instead of having to learn to pass its input through, which is what makes a
    small autoencoder learn in hundreds of steps rather than thousands.
    """

    def __init__(self, ch, shortcut=False, pad_after=False):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if pad_after else 1)
        self.shortcut, self.pad_after = shortcut, pad_after

    def forward(self, x):
        # pad_after: one row and column of zeros after the image and none before (Stable Diffusion's VAE)
        h = self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_after else x)
        return h + F.avg_pool2d(x, 2) if self.shortcut else h


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a convolution (with `shortcut`,
    the convolution is a residual on top of the nearest-neighbour upsampled input)."""

    def __init__(self, ch, shortcut=False):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.shortcut = shortcut

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv(x)
        return h + x if self.shortcut else h


class MultiHeadAttention(nn.Module):
    """Self-attention, or cross-attention when `context_dim` is given (U-Net, autoencoder, text towers).

    :param dim: query width (and output width).
    :param heads: number of heads.
    :param context_dim: key/value source width for cross-attention (None: self-attention).
    :param head_dim: width of one head; default dim // heads (T5 sets it apart from dim).
    :param qkv_bias, out_bias: whether the projections have biases (CLIP: both; T5: neither).
    """

    def __init__(self, dim, heads, context_dim=None, head_dim=None, qkv_bias=False, out_bias=True):
        super().__init__()
        assert head_dim or dim % heads == 0, f"dim {dim} not divisible by heads {heads}"
        self.heads, self.head_dim = heads, head_dim or dim // heads
        inner, kv_dim = heads * self.head_dim, context_dim or dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.out = nn.Linear(inner, dim, bias=out_bias)

    def forward(self, x, context=None, context_mask=None, bias=None, causal=False, scale=None):
        """
        :param x: (B, N, dim) queries' source.
        :param context: (B, M, context_dim) keys' and values' source; None attends to x itself.
        :param context_mask: optional (B, M) bool, True at real tokens (for self-attention, M = N).
        :param bias, causal, scale: passed to attention() (T5's position bias, CLIP's causal mask).
        """
        B, N, _ = x.shape
        context = x if context is None else context
        split = lambda t: t.view(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        h = attention(q, k, v, key_padding_mask=context_mask, bias=bias, causal=causal, scale=scale)  # (B, H, N, Dh)
        return self.out(h.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (the autoencoder's mid block);
    `qkv_bias`: the query, key and value projections have biases (Stable Diffusion's VAE)."""

    def __init__(self, ch, code_channels=0, qkv_bias=False, groups=0):
        super().__init__()
        self.norm = norm_layer(ch, code_channels, groups=groups)
        self.attn = MultiHeadAttention(ch, heads=1, qkv_bias=qkv_bias)

    def forward(self, x, zq=None):
        B, C, H, W = x.shape
        h = apply_norm(self.norm, x, zq).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = self.attn(h).transpose(1, 2).view(B, C, H, W)
        return x + h
