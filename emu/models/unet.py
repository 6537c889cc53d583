"""The denoising U-Net of the latent diffusion model, conditioned on text.

Layout (improved-diffusion / Stable Diffusion style):

    latents (B, C, H, W) -> conv_in
      down: per level, `num_res_blocks` x [ResBlock -> SpatialTransformer?], then Downsample
      middle: ResBlock -> SpatialTransformer -> ResBlock
      up: per level, `num_res_blocks + 1` x [concat skip -> ResBlock -> SpatialTransformer?], Upsample
    -> GroupNorm -> SiLU -> conv_out (zero-initialised, so the untrained model predicts 0)

Conditioning (emu_paper.txt, section 3.1: CLIP ViT-L and T5-XXL text embeddings):
  * the timestep embedding, plus the pooled CLIP text embedding, drives every ResBlock (FiLM);
  * the token embeddings of both towers, each projected to `context_dim` and concatenated along
    the sequence (with their padding masks), are the keys/values of every cross-attention layer.

The same network, configured, is also an Imagen-like pixel diffusion model (emu/variants/pixel.py):
  * `t5_only`: condition on the T5 tokens alone, as Imagen does; the pooled vector added to the
    timestep embedding is then the mean of the T5 tokens;
  * `cond_channels`: an image concatenated to the input on the channels (a super-resolution model's
    upsampled low-resolution image);
  * `aug_embedding`: the noise-augmentation level of that image, embedded like the timestep and added
    to the timestep embedding.

And it is Kandinsky's decoder (emu/variants/kandinsky.py): `image_embed_dim` adds a CLIP image
embedding to the timestep embedding and, as `image_tokens` tokens, to the context; `xlmr_dim` replaces
both towers' tokens by XLM-R's (Kandinsky 2.1's multilingual tower), the pooled vector then being
M-CLIP's projection of them.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from emu.models.nn import (Downsample, MultiHeadAttention, ResBlock, Upsample, normalization, timestep_embedding,
                           zero_module)


@dataclass
class UNetConfig:
    in_channels: int = 16          # latent channels of the autoencoder
    model_channels: int = 48       # width of the first level
    channel_mult: tuple = (1, 2)   # width multiplier per level; each level after the first halves H, W
    num_res_blocks: int = 1        # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (1,)  # levels that get a self+cross-attention transformer after each ResBlock
    transformer_depth: int = 1     # transformer blocks per SpatialTransformer
    head_dim: int = 32             # width of one attention head
    context_dim: int = 128         # width the text tokens are projected to
    clip_dim: int = 64             # CLIP token width (768 for ViT-L/14)
    t5_dim: int = 64               # T5 token width (4096 for T5-XXL)
    pooled_dim: int = 64           # pooled CLIP embedding width (768 for ViT-L/14)
    dropout: float = 0.0
    t5_only: bool = False          # cross-attend to T5 tokens alone, pool them instead of CLIP's vector (Imagen)
    cond_channels: int = 0         # channels of an image concatenated to the input (super-resolution)
    aug_embedding: bool = False    # embed a noise-augmentation level next to the timestep (super-resolution)
    image_embed_dim: int = 0       # condition on a CLIP image embedding of this width too (Kandinsky's decoder)
    image_tokens: int = 4          # ... which becomes this many extra cross-attention tokens
    xlmr_dim: int = 0              # cross-attend to XLM-R tokens of this width instead of CLIP's and T5's (Kandinsky 2.1)
    # Stable Diffusion's published U-Net (emu/variants/stable_diffusion.py) is this network with:
    emb_add: bool = False          # the timestep embedding added to each ResBlock's features, not FiLM
    norm_eps: float = 1e-6         # the ResBlocks' and the output's GroupNorm epsilon (SD: 1e-5)
    norm_groups: int = 0           # every GroupNorm's groups (SD: 32); 0: set by the width (nn.normalization)
    num_heads: int = 0             # every attention layer has this many heads (SD v1: 8), not width // head_dim
    # and with t5_dim = 0 (CLIP's tokens alone), pooled_dim = 0 (no pooled vector) and context_dim = 0 (the
    # tokens go to the cross-attention as they are, not projected to a common width)


PRESETS = {
    # 2.4M parameters: trains on 8x8 toy latents on a laptop CPU in minutes (about 0.13 s a step at
    # batch 16 on two cores). As in SDXL, the highest-resolution level has no attention: there it
    # costs the most and adds the least.
    "toy": UNetConfig(),
    # The paper's scale: "a large U-Net with 2.8B trainable parameters" with wider channels and more
    # residual blocks per stage than SDXL; the exact widths are not published, these give ~2.8B.
    "emu": UNetConfig(in_channels=16, model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=3,
                      attention_levels=(1, 2, 3), transformer_depth=2, head_dim=64, context_dim=1024,
                      clip_dim=768, t5_dim=4096, pooled_dim=768),
}


# -----------------------------------------------------------------------------
# transformer blocks

class FeedForward(nn.Module):
    """GEGLU feed-forward: (x W1) * gelu(x W2), then project back."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention over pixels, cross-attention to text, feed-forward."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), MultiHeadAttention(dim, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), MultiHeadAttention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context, context_mask):
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flatten a feature map to tokens, run transformer blocks, and add the result back."""

    def __init__(self, ch, heads, depth, context_dim, groups=0):
        super().__init__()
        self.norm = normalization(ch, groups=groups)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, heads, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(ch, ch))  # the block starts as the identity

    def forward(self, x, context, context_mask):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        for block in self.blocks:
            h = block(h, context, context_mask)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class Stage(nn.Module):
    """A ResBlock optionally followed by a SpatialTransformer: one step of the U-Net."""

    def __init__(self, in_ch, out_ch, emb_dim, cfg, attend, context_dim):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, emb_add=cfg.emb_add, eps=cfg.norm_eps, groups=cfg.norm_groups)
        heads = cfg.num_heads or out_ch // cfg.head_dim
        self.attn = SpatialTransformer(out_ch, heads, cfg.transformer_depth, context_dim, cfg.norm_groups) if attend else None

    def forward(self, x, emb, context, context_mask):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, context_mask)


# -----------------------------------------------------------------------------
# the U-Net

class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_dim = 4 * ch
        embedding_mlp = lambda: nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.time_mlp = embedding_mlp()
        self.aug_mlp = embedding_mlp() if cfg.aug_embedding else None  # the augmentation level, embedded alike
        if cfg.t5_only and cfg.xlmr_dim:
            raise ValueError("t5_only and xlmr_dim each pick the one tower the context comes from; set one")
        if not cfg.context_dim and (cfg.t5_dim or cfg.t5_only or cfg.xlmr_dim):
            raise ValueError("context_dim 0 (CLIP's tokens unprojected) needs CLIP's tokens alone: t5_dim 0, no t5_only or xlmr_dim")
        # each tower's tokens projected to the context width (or, with context_dim 0, CLIP's as they are)
        project = lambda width: nn.Linear(width, cfg.context_dim) if cfg.context_dim else nn.Identity()
        pooled_dim = cfg.t5_dim if cfg.t5_only else cfg.pooled_dim
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None
        self.clip_proj = None if cfg.t5_only or cfg.xlmr_dim else project(cfg.clip_dim)
        self.t5_proj = project(cfg.t5_dim) if cfg.t5_dim and not cfg.xlmr_dim else None
        self.xlmr_proj = project(cfg.xlmr_dim) if cfg.xlmr_dim else None
        context_dim = cfg.context_dim or cfg.clip_dim
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch, 3, padding=1)
        # Kandinsky's decoder (kandinsky_paper.txt, section 3): the CLIP image embedding is added to the
        # time embedding and, as a few tokens, joins the text in the cross-attention context.
        self.image_proj = nn.Linear(cfg.image_embed_dim, emb_dim) if cfg.image_embed_dim else None
        self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.image_tokens * context_dim) if cfg.image_embed_dim else None

        self.down, skip_chs = nn.ModuleList(), [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(ch, mult * cfg.model_channels, emb_dim, cfg, level in cfg.attention_levels, context_dim))
                ch = mult * cfg.model_channels
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([Stage(ch, ch, emb_dim, cfg, True, context_dim), Stage(ch, ch, emb_dim, cfg, False, context_dim)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                self.up.append(Stage(ch + skip_chs.pop(), mult * cfg.model_channels, emb_dim, cfg, level in cfg.attention_levels,
                                     context_dim))
                ch = mult * cfg.model_channels
            if level != 0:
                self.up.append(Upsample(ch))

        self.norm_out = normalization(ch, eps=cfg.norm_eps, groups=cfg.norm_groups)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        # Activation checkpointing (--grad-checkpoint): in training, keep only each Stage's input and
        # recompute its inside during the backward pass: about a third more compute for much less memory.
        self.grad_checkpoint = False

    def run_stage(self, stage, h, emb, context, context_mask):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, context, context_mask, use_reentrant=False)
        return stage(h, emb, context, context_mask)

    def text_conditioning(self, text):
        """The pooled vector for the timestep embedding and the cross-attention context with its mask.

        :return: pooled (B, E), context (B, L, ctx), context_mask (B, L) with L = Lc + Lt, or Lt if t5_only,
                 or XLM-R's length with xlmr_dim.
        """
        text = text.without_padding()
        if self.cfg.xlmr_dim:  # text: an emu.text.encoder.MultilingualImageEmbedding
            return self.pooled(text.pooled), self.xlmr_proj(text.xlmr), text.xlmr_mask
        if self.cfg.t5_only:
            mask = text.t5_mask[:, :, None].to(text.t5.dtype)  # (B, Lt, 1)
            pooled = (text.t5 * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, Dt) mean of the real tokens
            return self.pooled(pooled), self.t5_proj(text.t5), text.t5_mask
        if self.t5_proj is None:  # CLIP's tokens alone (Stable Diffusion)
            return self.pooled(text.pooled), self.clip_proj(text.clip), text.clip_mask
        context = torch.cat([self.clip_proj(text.clip), self.t5_proj(text.t5)], dim=1)  # (B, Lc + Lt, ctx)
        context_mask = torch.cat([text.clip_mask, text.t5_mask], dim=1)  # (B, Lc + Lt)
        return self.pooled(text.pooled), context, context_mask

    def pooled(self, vector):
        """The pooled vector's contribution to the timestep embedding; 0 for a U-Net without one."""
        return 0.0 if self.pooled_proj is None else self.pooled_proj(vector)

    def fsdp_units(self):
        """What FSDP gathers one at a time (emu/training/fsdp.py): every Stage, Downsample and Upsample."""
        return [*self.down, *self.mid, *self.up]

    def forward(self, x, t, text, cond=None, t_aug=None):
        """Predict the noise (or v) in `x`.

        :param x: (B, C, H, W) noisy latents (or pixels).
        :param t: (B,) timesteps.
        :param text: an emu.text.encoder.TextEmbedding for the batch; with cfg.image_embed_dim, a
                     TextImageEmbedding, whose .image (B, image_embed_dim) is the CLIP image embedding.
        :param cond: (B, cond_channels, H, W) image concatenated to x; only with cfg.cond_channels.
        :param t_aug: (B,) timesteps of the noise augmentation `cond` went through; only with cfg.aug_embedding.
        :return: (B, C, H, W)
        """
        image_embed = getattr(text, "image", None)
        if ((cond is not None) != (self.cfg.cond_channels > 0) or (t_aug is not None) != self.cfg.aug_embedding
                or (image_embed is not None) != (self.cfg.image_embed_dim > 0)):
            raise ValueError("pass `cond` if and only if cfg.cond_channels > 0, `t_aug` if and only if "
                             "cfg.aug_embedding, and text with an image embedding (a TextImageEmbedding) if and only "
                             "if cfg.image_embed_dim > 0")
        pooled, context, context_mask = self.text_conditioning(text)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.model_channels)) + pooled  # (B, E)
        if self.aug_mlp is not None:
            emb = emb + self.aug_mlp(timestep_embedding(t_aug, self.cfg.model_channels))
        if self.image_proj is not None:
            emb = emb + self.image_proj(image_embed)
            tokens = self.image_to_tokens(image_embed).view(len(x), self.cfg.image_tokens, -1)  # (B, n, ctx)
            context = torch.cat([context, tokens], dim=1)
            context_mask = torch.cat([context_mask, context_mask.new_ones(len(x), self.cfg.image_tokens)], dim=1)

        h = self.conv_in(x if cond is None else torch.cat([x, cond], dim=1))  # (B, ch, H, W)
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else self.run_stage(layer, h, emb, context, context_mask)
            skips.append(h)
        for layer in self.mid:
            h = self.run_stage(layer, h, emb, context, context_mask)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = self.run_stage(layer, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(cfg):
    """Build the U-Net on the meta device (no memory) and count its parameters."""
    with torch.device("meta"):
        model = UNet(cfg)
    return sum(p.numel() for p in model.parameters())
