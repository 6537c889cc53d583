"""A Muse-like masked generative transformer: the second architecture quality-tuning is shown on.

Emu's section 4.2 (Figure 10) re-implements "a masked generative transformer model, similar to
Muse [9]" and quality-tunes it on 2000 images like the latent diffusion model. Muse (Chang et al.,
2023) has two parts, both here:

  * a VQ image tokenizer (VQGAN, Esser et al. 2021): a convolutional encoder, a codebook of K
    vectors that snaps each encoder output to its nearest code, and a decoder. An image becomes an
    (h, w) grid of integer token ids in [0, K);
  * a bidirectional transformer over those ids, cross-attending to the text embeddings, trained to
    predict randomly masked tokens (BERT-style, with MaskGIT's cosine masking schedule), and
    sampled by MaskGIT's iterative parallel decoding: start from all-[MASK], and at each step keep
    the most confident predictions and re-mask the rest.

Layout:

    image (B, 3, H, W) -> Encoder -> quant_conv -> (B, D, h, w) -> VectorQuantizer -> ids (B, h, w)
    ids (B, h, w) -> codebook lookup (B, D, h, w) -> Decoder -> image (B, 3, H, W)
    ids with [MASK]s (B, h, w) + text -> MaskedTransformer -> logits (B, h*w, K)

The encoder and decoder are emu.autoencoder's; the transformer blocks are emu.unet's, so every
attention call goes through emu.attention. The tokenizer is trained with emu.autoencoder's
AELoss (L1, optional perceptual, PatchGAN hinge) plus the quantizer's loss: see vq_training_losses.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.autoencoder import AutoencoderConfig, Decoder, Encoder
from emu.text import TextEmbedding
from emu.training import drop_captions
from emu.unet import TransformerBlock


@dataclass
class VQConfig:
    image_channels: int = 3
    base_channels: int = 16        # width of the first (full-resolution) level
    channel_mult: tuple = (1, 2, 2)  # width multiplier per level; downsampling factor 2**(levels - 1)
    num_res_blocks: int = 1        # ResBlocks per level in the encoder (one more in the decoder)
    shortcuts: bool = True         # emu.autoencoder's residual resampling and linear patch path
    codebook_size: int = 256       # K codes: token ids are 0..K-1
    code_dim: int = 16             # D, the width of one code
    beta: float = 0.25             # commitment weight: beta * ||z - sg(e)||^2 (VQ-VAE's value)
    ema: bool = True               # learn the codebook by EMA of assigned outputs instead of a loss
    ema_decay: float = 0.99
    restart_after: int = 10        # training steps a code may go unused before it is restarted (0: never)
    disc_channels: int = 32        # PatchDiscriminator width and depth, for training with AELoss
    disc_layers: int = 2
    spatial_norm: bool = False     # MoVQ (Kandinsky's autoencoder): the code modulates every decoder norm
    latent_scale: float = 1.0      # MoVQ as a diffusion first stage (emu.kandinsky.MoVQLatents): latents x this

    @property
    def downsample_factor(self):
        return 2 ** (len(self.channel_mult) - 1)

    def autoencoder_config(self):
        """The AutoencoderConfig whose Encoder and Decoder the tokenizer reuses: codes in place of
        latents, and no Fourier features (VQGAN has none)."""
        return AutoencoderConfig(latent_channels=self.code_dim, base_channels=self.base_channels,
                                 channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks, fourier=False,
                                 shortcuts=self.shortcuts, disc_channels=self.disc_channels, disc_layers=self.disc_layers)


@dataclass
class MaskedTransformerConfig:
    codebook_size: int = 256       # K, as the tokenizer's; the [MASK] id is K
    grid: int = 8                  # largest token grid side (learned positions per row and per column)
    dim: int = 128                 # transformer width
    depth: int = 4                 # transformer blocks
    heads: int = 4
    clip_dim: int = 64             # CLIP token width (768 for ViT-L/14)
    t5_dim: int = 64               # T5 token width (4096 for T5-XXL)


VQ_PRESETS = {
    # 32x32 toy images -> 8x8 tokens (f4) from 256 codes; 0.26M parameters, a training step at
    # batch 16 takes about a quarter of a second on one CPU core.
    "toy": VQConfig(),
    # Muse's base resolution: 256x256 images -> 16x16 tokens (f16) from 8192 codes (Chang et al.,
    # 2023). The widths are those of MaskGIT's VQGAN, which Muse builds on (128 base channels,
    # multipliers 1, 1, 2, 2, 4, two ResBlocks a level, 256-dimensional codes); the restart interval
    # is our choice.
    "muse": VQConfig(base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, shortcuts=False,
                     codebook_size=8192, code_dim=256, restart_after=100, disc_channels=64, disc_layers=3),
    # MoVQ, Kandinsky's autoencoder (kandinsky_paper.txt, Table 2: 67M parameters; Table 4: 16384
    # codes). The toy one is the toy tokenizer with spatially conditioned decoder norms.
    "toy-movq": VQConfig(spatial_norm=True),
    # The widths are those of the released Kandinsky 2.1 MoVQ config as we recall it (128 base
    # channels, multipliers 1, 2, 2, 4, two ResBlocks a level, 4-dimensional codes; f8): 62.5M
    # parameters here, where the paper says 67M (ours has attention in the middle block only).
    "movq": VQConfig(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, shortcuts=False,
                     codebook_size=16384, code_dim=4, restart_after=100, disc_channels=64, disc_layers=3,
                     spatial_norm=True),
}

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
# vector quantizer

class VectorQuantizer(nn.Module):
    """Snap each D-dimensional vector to its nearest of K codes (squared L2), VQ-VAE style.

    The forward value is the code; the gradient passes straight through to the encoder output
    (the straight-through estimator, van den Oord et al. 2017). The loss is the commitment term
    beta * ||z - sg(e)||^2, which keeps the encoder near its codes, plus, without EMA, the codebook
    term ||sg(z) - e||^2 that pulls the codes towards their outputs.

    With `ema`, the codebook is not learned by gradient: each training step sets every code to an
    exponential moving average of the outputs assigned to it (cluster sizes and sums averaged
    separately, sizes Laplace-smoothed so that an unused code is never divided by zero). It is a
    buffer, which the optimiser never sees.

    Codes unused for `restart_after` training steps are dead: nothing pulls them back, and the
    rest of the codebook has to do their work. They are restarted at random encoder outputs of
    the current batch, so every code stays near the data (as in Jukebox, Dhariwal et al. 2020).
    """

    def __init__(self, num_codes, dim, beta=0.25, ema=True, decay=0.99, restart_after=0, eps=1e-5):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.restart_after, self.eps = ema, decay, restart_after, eps
        codebook = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)  # VQGAN's init
        if ema:
            self.register_buffer("codebook", codebook)
            # Start as if every code had been assigned one output equal to itself: the averages and
            # the codebook agree from the first step.
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("code_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))

    @torch.no_grad()
    def nearest(self, flat):
        """Index of the nearest code to each row of `flat` (M, D): argmin ||z||^2 - 2 z.e + ||e||^2."""
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]  # (M, K)
        return dist.argmin(dim=1)

    def lookup(self, ids):
        """Token ids (B, h, w) -> their code vectors (B, D, h, w)."""
        return F.embedding(ids, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z):
        """
        :param z: (B, D, h, w) encoder outputs.
        :return: (quantized (B, D, h, w), loss (scalar), ids (B, h, w)).
        """
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (M, D), M = B*h*w
        ids = self.nearest(flat)  # (M,)
        quantized = self.lookup(ids.view(B, h, w))  # (B, D, h, w)
        loss = self.beta * F.mse_loss(z, quantized.detach())
        if not self.ema:
            loss = loss + F.mse_loss(z.detach(), quantized)
        if self.training:
            self.update(flat.detach(), ids)
        # Straight-through: z - sg(z) is exactly zero, so the value is the code itself, bit for bit,
        # and the gradient with respect to z is the identity.
        quantized = quantized.detach() + (z - z.detach())
        return quantized, loss, ids.view(B, h, w)

    @torch.no_grad()
    def update(self, flat, ids):
        """Training-time codebook upkeep for a batch `flat` (M, D) assigned to `ids` (M,): the EMA
        step (with `ema`), then the restart of dead codes."""
        counts = torch.bincount(ids, minlength=self.num_codes)  # (K,)
        if self.ema:
            sums = torch.zeros_like(self.code_sum).index_add_(0, ids, flat.to(self.code_sum.dtype))  # (K, D)
            self.cluster_size.lerp_(counts.to(self.cluster_size.dtype), 1 - self.decay)
            self.code_sum.lerp_(sums, 1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # (K,) Laplace smoothing
            self.codebook.copy_(self.code_sum / smoothed[:, None])
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after:
            dead = (self.unused_steps >= self.restart_after).nonzero().squeeze(1)  # (n_dead,)
            if len(dead):
                picks = flat[torch.randint(len(flat), (len(dead),), device=flat.device)]  # (n_dead, D)
                self.codebook[dead] = picks.to(self.codebook.dtype)
                if self.ema:
                    self.code_sum[dead] = picks.to(self.code_sum.dtype)
                    self.cluster_size[dead] = 1.0
                self.unused_steps[dead] = 0


def codebook_usage(ids, codebook_size):
    """How much of the codebook a batch of token ids uses.

    :return: (fraction of the K codes used at least once, perplexity exp(H) of the code histogram:
              K when every code is equally used, 1 when one code takes everything).
    """
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean().item(), entropy.exp().item()


# -----------------------------------------------------------------------------
# the tokenizer

class VQTokenizer(nn.Module):
    """VQGAN-style tokenizer: images in [-1, 1] <-> grids of token ids in [0, codebook_size).

    Saved and loaded like the autoencoder (emu.autoencoder.save_autoencoder / load_autoencoder:
    config.json says kind "vq"), so a script's --ae flag takes either."""
    kind = "vq"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ae_cfg = cfg.autoencoder_config()
        # emu.autoencoder's Encoder outputs a Gaussian's mean and log-variance (2D channels); a 1x1
        # convolution (VQGAN's quant_conv) maps them to the code width instead.
        self.encoder = Encoder(ae_cfg, cfg.image_channels)
        self.quant_conv = nn.Conv2d(2 * cfg.code_dim, cfg.code_dim, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.ema, cfg.ema_decay, cfg.restart_after)
        self.decoder = Decoder(ae_cfg, cfg.image_channels, code_channels=cfg.code_dim if cfg.spatial_norm else 0)

    @property
    def downsample_factor(self):
        return self.cfg.downsample_factor

    def forward(self, images):
        """Reconstruct `images` (B, 3, H, W) for training.

        :return: (recon (B, 3, H, W), vq_loss (scalar), ids (B, H/f, W/f)).
        """
        quantized, vq_loss, ids = self.quantizer(self.encode_latents(images))
        return self.decode_codes(quantized), vq_loss, ids

    def decode_codes(self, quantized):
        """Code vectors (B, D, h, w) -> images; a MoVQ decoder also reads them in every norm."""
        return self.decoder(quantized, quantized if self.cfg.spatial_norm else None)

    def encode_latents(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> the encoder's continuous output before the codebook, (B, D, H/f, W/f)."""
        return self.quant_conv(self.encoder(images))

    def nearest_ids(self, z):
        """Vectors (B, D, h, w) -> the ids of their nearest codes, (B, h, w) (the codebook is left as it is)."""
        B, D, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> token ids (B, H/f, W/f) (the codebook is left as it is)."""
        return self.nearest_ids(self.encode_latents(images))

    def decode_tokens(self, ids):
        """Token ids (B, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        return self.decode_codes(self.quantizer.lookup(ids)).clamp(-1.0, 1.0)

    decode = decode_tokens


def vq_training_losses(tokenizer, ae_loss, images, step):
    """The tokenizer's loss: emu.autoencoder.AELoss's generator loss plus the quantizer's loss.

    A VQ tokenizer has no posterior; a zero mean and log-variance make AELoss's KL term exactly zero.
    One training step, as in train_ae.py:

        ae_loss = AELoss(PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers), kl_weight=0.0, ...)
        loss, recon, logs = vq_training_losses(tokenizer, ae_loss, x, step)
        opt.zero_grad(); loss.backward(); opt.step()
        disc_loss = ae_loss.discriminator_loss(x, recon, step)   # then its own backward and step

    :param images: (B, 3, H, W) in [-1, 1]; step: the training step (AELoss's disc_start counts it).
    :return: (loss, recon (B, 3, H, W), dict of float logs with the codebook usage).
    """
    recon, vq_loss, ids = tokenizer(images)
    zero = torch.zeros((), device=images.device)
    loss, logs = ae_loss.generator_loss(images, recon, zero, zero, tokenizer.decoder.conv_out.weight, step)
    usage, perplexity = codebook_usage(ids, tokenizer.cfg.codebook_size)
    return loss + vq_loss, recon, {**logs, "vq": vq_loss.item(), "usage": usage, "perplexity": perplexity}


# -----------------------------------------------------------------------------
# the masked transformer

class MaskedTransformer(nn.Module):
    """Bidirectional transformer over image tokens, conditioned on text: ids -> logits over codes.

    Each token id (or [MASK] = codebook_size) is embedded and given a learned 2-D position (a row
    embedding plus a column embedding); pre-norm blocks of self-attention, cross-attention to the
    text tokens, and a feed-forward follow (emu.unet's TransformerBlock). As in the U-Net, the CLIP
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
        :param text: an emu.text.TextEmbedding for the batch.
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
        """What FSDP gathers one at a time (emu/fsdp.py): each transformer block."""
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
    """What the masked transformer learns, with the two calls train_step uses (emu/training.py):
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
