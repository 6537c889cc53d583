"""A VQ image tokenizer (VQGAN, Esser et al. 2021): images <-> grids of integer token ids.

A convolutional encoder, a codebook of K vectors that snaps each encoder output to its nearest code,
and a decoder: an image becomes an (h, w) grid of token ids in [0, K). The Muse-like model
(emu/variants/muse.py) generates such grids; Kandinsky's MoVQ (emu/variants/kandinsky.py) is this
tokenizer with spatially conditioned decoder norms, used as a latent first stage.

    image (B, 3, H, W) -> Encoder -> quant_conv -> (B, D, h, w) -> VectorQuantizer -> ids (B, h, w)
    ids (B, h, w) -> codebook lookup (B, D, h, w) -> Decoder -> image (B, 3, H, W)

The encoder and decoder are emu.models.autoencoder's. The tokenizer is trained with its AELoss (L1,
optional perceptual, PatchGAN hinge) plus the quantizer's loss: see vq_training_losses.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.models.autoencoder import AutoencoderConfig, Decoder, Encoder


@dataclass
class VQConfig:
    image_channels: int = 3
    base_channels: int = 16        # width of the first (full-resolution) level
    channel_mult: tuple = (1, 2, 2)  # width multiplier per level; downsampling factor 2**(levels - 1)
    num_res_blocks: int = 1        # ResBlocks per level in the encoder (one more in the decoder)
    shortcuts: bool = True         # emu.models.autoencoder's residual resampling and linear patch path
    codebook_size: int = 256       # K codes: token ids are 0..K-1
    code_dim: int = 16             # D, the width of one code
    beta: float = 0.25             # commitment weight: beta * ||z - sg(e)||^2 (VQ-VAE's value)
    ema: bool = True               # learn the codebook by EMA of assigned outputs instead of a loss
    ema_decay: float = 0.99
    restart_after: int = 10        # training steps a code may go unused before it is restarted (0: never)
    disc_channels: int = 32        # PatchDiscriminator width and depth, for training with AELoss
    disc_layers: int = 2
    spatial_norm: bool = False     # MoVQ (Kandinsky's autoencoder): the code modulates every decoder norm
    latent_scale: float = 1.0      # MoVQ as a diffusion first stage (emu.variants.kandinsky.MoVQLatents): latents x this

    @property
    def downsample_factor(self):
        return 2 ** (len(self.channel_mult) - 1)

    def autoencoder_config(self):
        """The AutoencoderConfig whose Encoder and Decoder the tokenizer reuses: codes in place of
        latents, and no Fourier features (VQGAN has none)."""
        return AutoencoderConfig(latent_channels=self.code_dim, base_channels=self.base_channels,
                                 channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks, fourier=False,
                                 shortcuts=self.shortcuts, disc_channels=self.disc_channels, disc_layers=self.disc_layers)


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

    Saved and loaded like the autoencoder (emu.models.autoencoder.save_autoencoder / load_autoencoder:
    config.json says kind "vq"), so a script's --ae flag takes either."""
    kind = "vq"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ae_cfg = cfg.autoencoder_config()
        # emu.models.autoencoder's Encoder outputs a Gaussian's mean and log-variance (2D channels); a 1x1
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
    """The tokenizer's loss: emu.models.autoencoder.AELoss's generator loss plus the quantizer's loss.

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
