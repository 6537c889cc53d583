"""The autoencoder of the latent diffusion model: images <-> latents, and what it is trained against.

Emu's autoencoder (emu_paper.txt, section 3.1) is the usual KL-regularised convolutional
autoencoder of latent diffusion, with three changes that recover fine detail:

  * 16 latent channels instead of 4: the 8x downsampling squeezes 64 pixels into one latent
    position, and 4 channels are too few to keep small objects (Table 1: AE-4, AE-8, AE-16);
  * an adversarial loss (a PatchGAN discriminator, as in VQGAN / Stable Diffusion);
  * a fixed, non-learnable Fourier feature transform that lifts RGB from 3 to more channels
    before the encoder (Table 1: Fourier-AE-16).

The toy preset also turns on `shortcuts` (see Encoder) so that a network this small learns in
the few hundred steps a CPU run affords; the `emu` preset leaves them off, as the paper has none.

Layout:

    image (B, 3, H, W) -> [FourierFeatures] -> (B, 3 + 2F, H, W)
      Encoder: conv_in, per level `num_res_blocks` x ResBlock then Downsample (not after the last),
               mid (ResBlock, SpatialSelfAttention, ResBlock), norm, SiLU, conv -> mean, logvar
    posterior mean/sample (B, C, H/f, W/f) -> Decoder (the mirror image) -> image (B, 3, H, W)

`encode` returns the posterior mean times `scale_factor` (set after training so latents have
unit standard deviation, which the diffusion noise schedule assumes); `decode` undoes the scale.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.models.nn import Downsample, ResBlock, SpatialSelfAttention, Upsample, apply_norm, norm_layer, normalization


@dataclass
class AutoencoderConfig:
    latent_channels: int = 16      # C of the latents (4, 8 or 16 in Table 1)
    base_channels: int = 32        # width of the first (full-resolution) level
    channel_mult: tuple = (1, 2, 2)  # width multiplier per level; downsampling factor 2**(levels - 1)
    num_res_blocks: int = 1        # ResBlocks per level in the encoder (one more per level in the decoder)
    fourier: bool = True           # lift RGB with FourierFeatures before the encoder
    fourier_features: int = 8      # F frequencies: the encoder sees 3 + 2F channels
    fourier_scale: float = 1.0     # standard deviation of the random frequencies
    fourier_seed: int = 0          # seed of the frequency matrix (it is rebuilt from this, never saved)
    kl_weight: float = 1e-6        # weight of the KL term (per latent element) in the training loss
    shortcuts: bool = False        # residual resampling and a linear patch path (see Encoder); toy scale
    disc_channels: int = 64        # width of the PatchGAN discriminator's first layer
    disc_layers: int = 3           # strided layers of the discriminator
    disc_weight: float = 0.5       # scale of the adaptive adversarial weight (AELoss); 0.5 is Stable Diffusion's
    # Stable Diffusion's published VAE (emu/variants/stable_diffusion.py) is this network with:
    quant_convs: bool = False      # 1x1 convolutions after the encoder and before the decoder
    attn_qkv_bias: bool = False    # biases on the mid block's query, key and value projections
    pad_after: bool = False        # downsampling pads one row and column after the image, none before
    norm_groups: int = 0           # every GroupNorm's groups (SD: 32); 0: set by the width (nn.normalization)

    @property
    def downsample_factor(self):
        """f: each level after the first halves the resolution."""
        return 2 ** (len(self.channel_mult) - 1)


PRESETS = {
    # 32x32 toy images -> 8x8x16 latents; a training step at batch 16 takes about 0.15 s on two CPU cores.
    # Shortcuts on: without them this small network needs thousands of steps to reconstruct
    # what a linear code of 4x4 patches already gets (see Encoder). A KL weight of 1e-2 keeps some
    # posterior noise in training, so the decoder forgives the small latent errors of a briefly
    # trained U-Net (latent noise of std 0.2 costs 31 dB instead of 27 dB at 1e-6).
    # Fourier frequencies of std 0.1 rather than 1: when the linear patch path still read the sinusoids, at 1
    # the toy autoencoder lost colour in 600 steps (the toy prompts' real images passed through it were read
    # with the right colour 77% of the time at 1.0, 89% at 0.1, 98% without the features). With the patch
    # path on RGB (see Encoder), 0.1, 1 and 3 give the same held-out PSNR on real photographs (41.15 to
    # 41.20 dB, experiments/table1_autoencoder.py's 4x setting, two seeds).
    # Adversarial weight 0.1, not Stable Diffusion's 0.5: at 8x on real photographs, from step 500 of
    # 1000, 0.5 cost Fourier-AE-16 0.70 dB of held-out PSNR, 0.1 cost 0.04 dB, 0.02 nothing (README, Table 1).
    "toy": AutoencoderConfig(latent_channels=16, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                             fourier=True, fourier_features=8, fourier_scale=0.1, kl_weight=1e-2, disc_channels=32,
                             disc_layers=2, disc_weight=0.1, shortcuts=True),
    # The toy network at the paper's downsampling, 8x (one more level): 64x64 images -> 8x8x16 latents
    # (experiments/table1_autoencoder.py's main table).
    "toy-f8": AutoencoderConfig(latent_channels=16, base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                                fourier=True, fourier_features=8, fourier_scale=0.1, kl_weight=1e-2, disc_channels=32,
                                disc_layers=2, disc_weight=0.1, shortcuts=True),
    # The paper's shape: three 2x2 downsamplings (factor 8, "compresses the image resolution by 64x"),
    # 16 latent channels, Fourier features on. The widths are Stable Diffusion's; the paper does not
    # publish its own, nor the number of Fourier frequencies.
    "emu": AutoencoderConfig(latent_channels=16, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             fourier=True, fourier_features=32, disc_channels=64, disc_layers=3),
}


# -----------------------------------------------------------------------------
# Fourier features

class FourierFeatures(nn.Module):
    """A fixed random Fourier feature transform of each pixel's colour (no learnable parameters).

    Each pixel's RGB vector c in [-1, 1]^3 is projected on F random frequency vectors f_k and
    mapped to [c, sin(2 pi f_k . c), cos(2 pi f_k . c)]. A convolutional encoder responds smoothly
    to its input, so small colour differences (thin lines, texture, small objects on a similar
    background) produce small activations; the sinusoids turn them into large swings the first
    layer can pick up, the same reason Fourier features help networks fit fine detail (Tancik et
    al., 2020). Emu applies such a transform to lift RGB from 3 to more channels (section 3.1).

    The frequency matrix is a non-persistent buffer drawn from a seeded generator: it moves with
    `.to(device)` but is not in the state dict, and the same seed rebuilds the same transform.
    """

    def __init__(self, num_features, scale=1.0, seed=0, in_channels=3):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        freqs = torch.randn(num_features, in_channels, generator=generator) * scale  # (F, 3)
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_channels = in_channels + 2 * num_features

    def forward(self, x):
        """:param x: (B, 3, H, W) in [-1, 1]. :return: (B, 3 + 2F, H, W)."""
        proj = 2 * math.pi * torch.einsum("fc,bchw->bfhw", self.freqs, x)  # (B, F, H, W)
        return torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=1)


# -----------------------------------------------------------------------------
# encoder and decoder

class MidBlock(nn.Module):
    """ResBlock -> self-attention -> ResBlock at the lowest resolution: the one place every
    position can see the whole image."""

    def __init__(self, ch, code_channels=0, qkv_bias=False, groups=0):
        super().__init__()
        self.res1 = ResBlock(ch, ch, code_channels=code_channels, groups=groups)
        self.attn = SpatialSelfAttention(ch, code_channels, qkv_bias, groups)
        self.res2 = ResBlock(ch, ch, code_channels=code_channels, groups=groups)

    def forward(self, x, zq=None):
        return self.res2(self.attn(self.res1(x, zq=zq), zq), zq=zq)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): posterior mean and log-variance.

    With `cfg.shortcuts` (DC-AE's "residual autoencoding", Chen et al. 2024, in a simple form), the
    downsamplings are residuals on top of average pooling, and a linear patch path adds a learned
    linear code of each f x f patch to the output (the decoder has the mirror image of both). A
    linear code of 4x4 patches alone reconstructs the toy needles at 33 dB (PCA); the deep path then
    only learns what it misses. With train_ae.py's toy defaults (600 steps at batch 16) the held-out
    PSNR is 28.2 dB with the shortcuts and 22.9 dB without, whose reconstructions lose the needles'
    colours.

    The patch path reads the image's own `image_channels` (the first ones of the input), never the
    Fourier features after them: it is a linear code of pixels. Fed the sinusoids too (16 of every
    pixel's 19 values), the linear code became a regression on random colour features that must
    first learn to ignore them: on real photographs (experiments/table1_autoencoder.py's crops, 600 steps)
    Fourier-AE-16's held-out PSNR was 31.7 dB against AE-16's 33.9; with the patch path on RGB, 34.3.
    """

    def __init__(self, cfg, in_channels, image_channels=None):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.factor = cfg.downsample_factor
        self.patch = None
        self.patch_channels = image_channels or in_channels  # the image's own channels, before any Fourier features
        if cfg.shortcuts:  # the linear patch path: f x f patch of pixels -> latent moments
            self.patch = nn.Conv2d(self.patch_channels * self.factor ** 2, 2 * cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks, ch = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, groups=cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch, cfg.shortcuts, cfg.pad_after))
        self.down = nn.Sequential(*blocks)
        self.mid = MidBlock(ch, qkv_bias=cfg.attn_qkv_bias, groups=cfg.norm_groups)
        self.norm_out = normalization(ch, groups=cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1) if cfg.quant_convs else None

    def forward(self, x):
        h = self.down(self.conv_in(x))  # (B, ch, H/f, W/f)
        h = self.mid(h)
        moments = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2C, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        if self.patch is not None:
            moments = moments + self.patch(F.pixel_unshuffle(x[:, :self.patch_channels], self.factor))
        return moments


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, 3, h*f, w*f): the encoder's mirror image.

    With `code_channels` (MoVQ, emu/models/vq.py's tokenizer with spatial_norm) every norm is a
    SpatialNorm conditioned on the quantised code, which forward() then takes as `zq`."""

    def __init__(self, cfg, out_channels=3, code_channels=0):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.factor = cfg.downsample_factor
        self.patch = None
        if cfg.shortcuts:  # the linear patch path back: latent -> f x f patch of pixels
            self.patch = nn.Conv2d(cfg.latent_channels, out_channels * self.factor ** 2, 1)
        ch = widths[-1]
        groups = cfg.norm_groups
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.quant_convs else None
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, code_channels, cfg.attn_qkv_bias, groups)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):  # one more than the encoder, as in latent diffusion
                self.up.append(ResBlock(ch, widths[level], code_channels=code_channels, groups=groups))
                ch = widths[level]
            if level > 0:
                self.up.append(Upsample(ch, cfg.shortcuts))
        self.norm_out = norm_layer(ch, code_channels, groups=groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z, zq=None):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z), zq)  # (B, ch, h, w)
        for block in self.up:
            h = block(h, zq=zq) if isinstance(block, ResBlock) else block(h)
        out = self.conv_out(F.silu(apply_norm(self.norm_out, h, zq)))  # (B, 3, H, W)
        if self.patch is not None:
            out = out + F.pixel_shuffle(self.patch(z), self.factor)
        return out


# -----------------------------------------------------------------------------
# the autoencoder

class Autoencoder(nn.Module):
    """KL-regularised autoencoder: images in [-1, 1] <-> latents of `cfg.latent_channels` channels."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.fourier:
            self.fourier = FourierFeatures(cfg.fourier_features, cfg.fourier_scale, cfg.fourier_seed)
            in_channels = self.fourier.out_channels
        else:
            self.fourier = nn.Identity()
            in_channels = 3
        self.encoder = Encoder(cfg, in_channels, image_channels=3)
        self.decoder = Decoder(cfg)
        # Multiplies latents in encode() and divides them in decode(). Training leaves it at 1;
        # train_ae.py then sets it to 1 / std of held-out latents, and it is saved with the weights.
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @property
    def downsample_factor(self):
        return self.cfg.downsample_factor

    def posterior(self, x):
        """The Gaussian posterior q(z | x), unscaled.

        :param x: (B, 3, H, W) images in [-1, 1].
        :return: mean and log-variance, each (B, C, H/f, W/f).
        """
        moments = self.encoder(self.fourier(x))  # (B, 2C, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training

    def forward(self, x, sample_posterior=True):
        """Reconstruct `x` for training.

        :param x: (B, 3, H, W) images in [-1, 1].
        :param sample_posterior: decode a sample z = mean + std * noise (training) or the mean.
        :return: (recon (B, 3, H, W), mean, logvar), the posterior stats for the KL term.
        """
        mean, logvar = self.posterior(x)
        z = mean
        if sample_posterior:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decoder(z), mean, logvar

    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) for diffusion (posterior
        mean, times scale_factor)."""
        mean, _ = self.posterior(x)
        return mean * self.scale_factor

    def decode(self, z):
        """Latents (B, C, h, w) as made by encode() -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(z / self.scale_factor)


@torch.no_grad()
def init_patch_paths_from_pca(ae, images, logvar=-4.0):
    """Start a shortcut autoencoder (cfg.shortcuts) as the best linear code of f x f patches: PCA.

    The encoder's linear patch path is set to project each patch's pixels on the top `latent_channels`
    principal components of the patches of `images` (N, 3, H, W), whitened (each component divided by
    its standard deviation); the decoder's maps them back. Both deep paths' output layers start at zero,
    so the untrained autoencoder is exactly that PCA code (about 31 dB on toy images), with posterior std
    exp(logvar / 2); training then only has to learn what a linear code misses (edges and corners: the
    shapes). The encoder's patch path reads the raw RGB channels, also where Fourier features lift the
    deep path's input. (train_ae.py --pca-start; README, "What made the toy model follow its prompts", has what it does to
    the toy world.)
    :return: the PSNR in dB of the PCA code on `images`.
    """
    f, C = ae.downsample_factor, ae.cfg.latent_channels
    patches = F.pixel_unshuffle(images.float(), f).permute(0, 2, 3, 1).flatten(0, 2)  # (patches, 3 f^2)
    mean = patches.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((patches - mean).T))  # ascending
    top, std = eigenvectors[:, -C:].flip(1), eigenvalues[-C:].flip(0).clamp(min=1e-8).sqrt()  # (3 f^2, C), (C,)
    enc, dec = ae.encoder.patch, ae.decoder.patch
    enc.weight.zero_()
    enc.weight[:C, :, 0, 0] = (top / std).T
    enc.bias.zero_()
    enc.bias[:C] = -(mean @ top) / std
    enc.bias[C:] = logvar
    dec.weight.copy_((top * std).unsqueeze(-1).unsqueeze(-1))  # (3 f^2, C, 1, 1)
    dec.bias.copy_(mean)
    for conv in (ae.encoder.conv_out, ae.decoder.conv_out):
        conv.weight.zero_()
        conv.bias.zero_()
    code = (patches - mean) @ top
    error = ((patches - mean - code @ top.T) ** 2).mean()
    return float(10 * torch.log10(4.0 / error))  # images in [-1, 1]: peak-to-peak 2


# -----------------------------------------------------------------------------
# discriminator and losses

class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al., 2017): a stack of strided 4x4 convolutions whose output
    is a grid of logits, one per overlapping patch, saying "real" (> 0) or "reconstructed" (< 0).

    Judging patches rather than whole images makes the adversarial loss a texture / sharpness loss,
    which is what an L1-trained autoencoder lacks (its reconstructions are blurry).
    """

    def __init__(self, in_channels=3, channels=64, num_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1), normalization(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        """:param x: (B, 3, H, W). :return: (B, 1, h, w) per-patch logits."""
        return self.net(x)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element of the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def hinge_discriminator_loss(logits_real, logits_fake):
    """Hinge loss: push real logits above +1 and reconstruction logits below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AELoss(nn.Module):
    """What the autoencoder is trained against (the VQGAN / latent diffusion recipe).

    Autoencoder:   L1 + perceptual_weight * perceptual + kl_weight * KL + adv_weight * (-D(recon))
    Discriminator: hinge loss on real images vs reconstructions.

    The adversarial terms are zero before `disc_start` steps: a discriminator facing the blurry
    output of an untrained decoder wins trivially and its gradients are noise. After that,
    adv_weight = disc_weight * |grad rec| / |grad gen|, both gradients taken at the decoder's last
    layer (Esser et al., 2021), so the adversarial gradient stays in proportion to the
    reconstruction gradient whatever the two losses' scales.

    :param discriminator: a PatchDiscriminator.
    :param perceptual: optional PerceptualLoss (images (B, 3, H, W) x2 -> (B,) distances).
    """

    def __init__(self, discriminator, kl_weight, disc_weight=0.5, disc_start=0, perceptual=None, perceptual_weight=1.0):
        super().__init__()
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.kl_weight, self.disc_weight, self.disc_start = kl_weight, disc_weight, disc_start
        self.perceptual_weight = perceptual_weight

    def adaptive_weight(self, rec_loss, gen_loss, last_layer, step):
        """disc_weight * |d rec / d last| / |d gen / d last|, clamped; 0 before disc_start."""
        if step < self.disc_start:
            return torch.zeros((), device=rec_loss.device)
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        gen_grad = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.norm() / (gen_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.disc_weight

    def generator_loss(self, x, recon, mean, logvar, last_layer, step):
        """The autoencoder's loss.

        :param x: (B, 3, H, W) real images; recon: their reconstructions; mean, logvar: the posterior.
        :param last_layer: the decoder's last weight (for the adaptive weight).
        :param step: training step (the adversarial term starts at disc_start).
        :return: (loss, dict of float logs).
        """
        rec_loss = (x - recon).abs().mean()
        if self.perceptual is not None:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual(x, recon).mean()
        kl = kl_divergence(mean, logvar)
        gen_loss = torch.zeros((), device=x.device)
        if step >= self.disc_start:
            gen_loss = -self.discriminator(recon).mean()  # the decoder wants high "real" logits
        adv_weight = self.adaptive_weight(rec_loss, gen_loss, last_layer, step)
        loss = rec_loss + self.kl_weight * kl + adv_weight * gen_loss
        logs = {"rec": rec_loss.item(), "kl": kl.item(), "gen": gen_loss.item(), "adv_weight": adv_weight.item()}
        return loss, logs

    def discriminator_loss(self, x, recon, step):
        """The discriminator's hinge loss on real `x` vs (detached) `recon`; zero before disc_start."""
        if step < self.disc_start:
            return torch.zeros((), device=x.device)
        logits_real = self.discriminator(x.detach())  # (B, 1, h, w)
        logits_fake = self.discriminator(recon.detach())
        return hinge_discriminator_loss(logits_real, logits_fake)
