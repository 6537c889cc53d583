"""A Muse-like masked generative transformer: the second architecture quality-tuning is shown on.

Emu's section 4.2 (Figure 10) re-implements "a masked generative transformer model, similar to
Muse [9]" and quality-tunes it on 2000 images like the latent diffusion model. Muse (Chang et al.,
2023) has two parts:

  * a VQ image tokenizer (emu/models/vq.py): an image becomes an (h, w) grid of token ids in [0, K);
  * a bidirectional transformer over those ids, cross-attending to the text embeddings, trained to
    predict randomly masked tokens (BERT-style, with MaskGIT's cosine masking schedule), and
    sampled by MaskGIT's iterative parallel decoding: start from all-[MASK], and at each step keep
    the most confident predictions and re-mask the rest. This file is that transformer.

    ids with [MASK]s (B, h, w) + text -> MaskedTransformer -> logits (B, h*w, K)

The transformer blocks are emu.models.unet's, so every attention call goes through emu.models.attention.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.models.unet import TransformerBlock
from emu.text.encoder import TextEmbedding, drop_captions


@dataclass
class MaskedTransformerConfig:
    codebook_size: int = 256       # K, as the tokenizer's; the [MASK] id is K
    grid: int = 8                  # largest token grid side (learned positions per row and per column)
    dim: int = 128                 # transformer width
    depth: int = 4                 # transformer blocks
    heads: int = 4
    clip_dim: int = 64             # CLIP token width (768 for ViT-L/14)
    t5_dim: int = 64               # T5 token width (4096 for T5-XXL)


TRANSFORMER_PRESETS = {
    # 1.4M parameters over 8x8 token grids: a training step at batch 32 takes under a second on one
    # CPU core.
    "toy": MaskedTransformerConfig(),
    # Muse's base transformer has about 632M parameters and reads T5-XXL (Chang et al., 2023); Emu's
    # re-implementation would see the same CLIP and T5 embeddings as its U-Net. The depth and width
    # are ours, chosen to land near 632M (count_parameters gives about 630M).
    "muse": MaskedTransformerConfig(codebook_size=8192, grid=16, dim=1024, depth=29, heads=16,
                                    clip_dim=768, t5_dim=4096),
}


# -----------------------------------------------------------------------------
# the masked transformer

class MaskedTransformer(nn.Module):
    """Bidirectional transformer over image tokens, conditioned on text: ids -> logits over codes.

    Each token id (or [MASK] = codebook_size) is embedded and given a learned 2-D position (a row
    embedding plus a column embedding); pre-norm blocks of self-attention, cross-attention to the
    text tokens, and a feed-forward follow (emu.models.unet's TransformerBlock). As in the U-Net, the CLIP
    and T5 token embeddings are each projected to the model width and concatenated, with their
    padding masks, into the cross-attention context.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.mask_id = cfg.codebook_size
        self.token_embed = nn.Embedding(cfg.codebook_size + 1, cfg.dim)
        self.row_embed = nn.Parameter(torch.zeros(cfg.grid, cfg.dim))
        self.col_embed = nn.Parameter(torch.zeros(cfg.grid, cfg.dim))
        self.clip_proj = nn.Linear(cfg.clip_dim, cfg.dim)
        self.t5_proj = nn.Linear(cfg.t5_dim, cfg.dim)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads, cfg.dim) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)
        self.initialize_weights()

    def initialize_weights(self):
        # BERT's (and MaskGIT's) 0.02: small embeddings leave the residual stream to the blocks.
        for p in (self.token_embed.weight, self.row_embed, self.col_embed):
            nn.init.normal_(p, std=0.02)

    def forward(self, ids, text):
        """
        :param ids: (B, h, w) token ids, [MASK] = codebook_size where unknown; h, w <= cfg.grid.
        :param text: an emu.text.encoder.TextEmbedding for the batch.
        :return: (B, h*w, K) logits over the codebook, in row-major token order.
        """
        B, h, w = ids.shape
        pos = self.row_embed[:h, None] + self.col_embed[None, :w]  # (h, w, D)
        x = (self.token_embed(ids) + pos).flatten(1, 2)  # (B, N, D)
        text = text.without_padding()
        context = torch.cat([self.clip_proj(text.clip), self.t5_proj(text.t5)], dim=1)  # (B, Lc + Lt, D)
        context_mask = torch.cat([text.clip_mask, text.t5_mask], dim=1)  # (B, Lc + Lt)
        for block in self.blocks:
            x = block(x, context, context_mask)
        return self.head(self.norm_out(x))  # (B, N, K)


    def fsdp_units(self):
        """What FSDP gathers one at a time (emu/training/fsdp.py): each transformer block."""
        return list(self.blocks)


def count_parameters(cfg):
    """Build the transformer on the meta device (no memory) and count its parameters."""
    with torch.device("meta"):
        model = MaskedTransformer(cfg)
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# training objective

def random_mask(batch, num_tokens, generator, device):
    """Which tokens to mask for training, by MaskGIT's cosine schedule.

    Each sample draws u ~ U(0, 1) and masks round(cos(pi/2 * u) * N) of its N tokens (at least one),
    chosen uniformly. The cosine puts more weight on high mask ratios than a uniform ratio would:
    those are the hard early steps of decoding. Rounding (not floor or ceil) keeps the mean masked
    fraction at E[cos(pi/2 u)] = 2/pi.

    :return: (B, N) bool, True at masked tokens.
    """
    u = torch.rand(batch, generator=generator, device=device)
    n_masked = (torch.cos(math.pi / 2 * u) * num_tokens).round().clamp(min=1)  # (B,)
    order = torch.rand(batch, num_tokens, generator=generator, device=device).argsort(dim=1)
    rank = order.argsort(dim=1)  # (B, N): each token's place in a random order
    return rank < n_masked[:, None]


class MaskedTokens:
    """What the masked transformer learns, with the two calls train_step uses (emu/training/loop.py):
    training_noise draws each sample's mask (a masked model has no noise, so a noise offset does not
    apply), training_loss is the cross-entropy at the masked tokens."""

    def __init__(self, codebook_size):
        self.mask_id = codebook_size  # the [MASK] id (the model may be wrapped in DDP: not read from it)

    def training_noise(self, ids, noise_offset=0.0, generator=None):
        B, h, w = ids.shape
        return {"mask": random_mask(B, h * w, generator, ids.device)}

    def training_loss(self, model, ids, text, mask):
        """The cross-entropy over each image's masked tokens, averaged per image, then over the batch.

        Averaging per image first (MaskGIT averages over all masked tokens of the batch) weighs every
        image alike whatever its mask ratio, and keeps a batch's loss the mean of its images' losses,
        so that --grad-accum's micro-batches add up to the whole batch exactly.
        :param ids: (B, h, w) token ids; mask: (B, h*w) bool, True where the model must guess.
        """
        B, h, w = ids.shape
        targets = ids.flatten(1)  # (B, N)
        logits = model(targets.masked_fill(mask, self.mask_id).view(B, h, w), text)  # (B, N, K)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, N)
        # The unmasked tokens are visible in the input; predicting them teaches nothing.
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()

    @torch.no_grad()
    def check_loss(self, model, ids, text, seed=1234):
        """The loss at 8 fixed mask ratios from 1/8 to all tokens, the masked positions seeded: the
        same draws at every call, so held-out checks are comparable (qtune's early stopping)."""
        B, h, w = ids.shape
        gen = torch.Generator(ids.device).manual_seed(seed)
        total = 0.0
        for ratio in torch.linspace(1 / 8, 1, 8).tolist():
            rank = torch.rand(B, h * w, generator=gen, device=ids.device).argsort(dim=1).argsort(dim=1)
            total += self.training_loss(model, ids, text, rank < max(1, round(ratio * h * w))).item()
        return total / 8


def masked_token_loss(model, ids, text, empty_text, generator, p_uncond=0.1):
    """Cross-entropy of the model's predictions at masked tokens only.

    :param model: a MaskedTransformer (called as model(ids, text), with a `mask_id`).
    :param ids: (B, h, w) the images' token ids.
    :param text: the batch's TextEmbedding; empty_text: the empty caption's (one row). Each caption
                 is replaced by the empty one with probability `p_uncond`, so the model also learns
                 the unconditional prediction classifier-free guidance needs.
    :param generator: a torch.Generator on ids' device (caption dropout, mask ratios, positions).
    """
    text = drop_captions(text, empty_text, p_uncond, generator)
    objective = MaskedTokens(model.mask_id)
    return objective.training_loss(model, ids, text, **objective.training_noise(ids, generator=generator))


# -----------------------------------------------------------------------------
# MaskGIT decoding

def guided_logits(model, ids, text, uncond, scale):
    """Classifier-free guided logits: uncond + scale * (cond - uncond), in one batched call.

    :param ids: (B, h, w); text: the prompts' TextEmbedding (B rows); uncond: the empty prompt's (B rows).
    :param scale: 1.0 is the conditional model alone.
    """
    if scale == 1.0:
        return model(ids, text)
    out = model(torch.cat([ids, ids]), TextEmbedding.cat([text, uncond]))  # (2B, N, K)
    cond, unc = out.chunk(2)
    return unc + scale * (cond - unc)


def maskgit_schedule(num_tokens, steps):
    """How many of `num_tokens` are still masked after each of `steps` decoding steps.

    floor(N * cos(pi/2 * (t + 1) / T)) after step t: few tokens are decided early, when little is
    known, and many late. Every step decides at least one token, and none is masked after the last.
    """
    counts, previous = [], num_tokens
    for t in range(steps):
        n = math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
        n = 0 if t == steps - 1 else max(0, min(n, previous - 1))
        counts.append(n)
        previous = n
    return counts


@torch.no_grad()
def maskgit_sample(model, text, uncond, shape, steps=12, guidance=1.0, temperature=1.0, mask_temperature=4.5,
                   generator=None, callback=None):
    """MaskGIT's iterative parallel decoding (Chang et al., 2022), with classifier-free guidance.

    Start with every token [MASK]. At each step, predict all tokens, sample the masked ones (the
    decided ones stay), and re-mask the least confident of the newly sampled, as many as the cosine
    schedule leaves masked. Confidence is the token's log-probability plus Gumbel noise whose
    temperature falls linearly from `mask_temperature` to 0: early choices are more random, so the
    first tokens decided are not all the same easy background.

    :param text: the prompts' TextEmbedding (B rows); uncond: the empty prompt's (B rows).
    :param shape: (h, w) of the token grid.
    :param temperature: of the token sampling; 0 takes the most likely token.
    :param generator: a torch.Generator on the model's device; the same seed gives the same ids.
    :param callback: called after each step with {"step", "ids" (B, h, w), "logits" (B, N, K)}.
    :return: (B, h, w) token ids, none of them [MASK].
    """
    h, w = shape
    B, N, device = len(text), h * w, text.clip.device
    ids = torch.full((B, N), model.mask_id, dtype=torch.long, device=device)
    for step, n_masked in enumerate(maskgit_schedule(N, steps)):
        masked = ids == model.mask_id  # (B, N)
        logits = guided_logits(model, ids.view(B, h, w), text, uncond, guidance).float()  # (B, N, K)
        if temperature > 0:
            probs = F.softmax(logits / temperature, dim=-1).view(B * N, -1)
            sampled = torch.multinomial(probs, 1, generator=generator).view(B, N)
        else:
            sampled = logits.argmax(dim=-1)
        sampled = torch.where(masked, sampled, ids)  # (B, N) decided tokens never change
        log_p = F.log_softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
        u = torch.rand(B, N, generator=generator, device=device).clamp(min=1e-20)
        gumbel = -torch.log(-torch.log(u))
        confidence = log_p + mask_temperature * (1 - (step + 1) / steps) * gumbel
        confidence = confidence.masked_fill(~masked, float("inf"))  # decided tokens are never re-masked
        rank = confidence.argsort(dim=1).argsort(dim=1)  # (B, N): 0 = least confident
        ids = torch.where(rank < n_masked, model.mask_id, sampled)
        if callback is not None:
            callback({"step": step, "ids": ids.view(B, h, w), "logits": logits})
    return ids.view(B, h, w)


@torch.no_grad()
def muse_generate(model, tokenizer, text, uncond, seeds, image_size, steps=12, cfg_scale=5.0, temperature=1.0):
    """Text to image: MaskGIT decoding of a token grid, then the tokenizer's decoder.

    The sampling generator is seeded by the batch's first seed, so a batch of the same prompts and
    seeds decodes the same way in any model with the same grid.
    :return: (B, 3, image_size, image_size) in [-1, 1].
    """
    side = image_size // tokenizer.downsample_factor
    gen = torch.Generator(text.clip.device).manual_seed(int(seeds[0]))
    ids = maskgit_sample(model, text, uncond, (side, side), steps, guidance=cfg_scale, temperature=temperature,
                         generator=gen)
    return tokenizer.decode_tokens(ids)
