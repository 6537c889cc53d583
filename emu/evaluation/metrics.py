"""Reconstruction metrics of Table 1 (emu_paper.txt, section 3.1): PSNR and SSIM; and how much a
model's samples of one prompt vary from seed to seed.

PSNR and SSIM take images in [-1, 1], as the models produce them, and compute on [0, 1] (peak value 1).
Both return one number per image, so a caller can average over a held-out set or look at the worst.
"""
import itertools

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x, y):
    """Peak signal-to-noise ratio in dB, 10 log10(1 / MSE) on [0, 1].

    :param x, y: (B, 3, H, W) images in [-1, 1].
    :return: (B,) float tensor; +inf for an image identical to its reference (MSE 0).
    """
    x, y = _to_unit(x), _to_unit(y)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(x, y, window_size=11, sigma=1.5):
    """Structural similarity (Wang et al., 2004) with the standard settings: an 11x11 Gaussian
    window of sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 (for peak value 1), statistics over the "valid"
    positions of the window (no padding), averaged over positions and channels.

    :param x, y: (B, C, H, W) images in [-1, 1], H and W at least `window_size`.
    :return: (B,) float tensor; 1 for identical images, lower the more the structure differs.
    """
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x, y = _to_unit(x), _to_unit(y)
    channels = x.shape[1]
    coords = torch.arange(window_size, dtype=x.dtype, device=x.device) - (window_size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, window_size, window_size)  # (C, 1, k, k)

    def local_mean(t):  # Gaussian-weighted mean around each position, channel by channel
        return F.conv2d(t, window, groups=channels)  # (B, C, H - k + 1, W - k + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)  # (B,)


def _to_unit(images):
    """[-1, 1] -> [0, 1], in float32 (or float64 if given) so the metrics do not depend on the model's dtype."""
    images = images.detach()
    if images.dtype != torch.float64:
        images = images.float()
    return (images + 1.0) / 2.0


def seed_variety(images, n):
    """How different a model's images of one prompt are from seed to seed, against images of different
    prompts: what prompt accuracy cannot see (a model that draws one image per prompt scores as well as
    one that draws many). Pixel distances are crude for photographs, and fine for the toy world, where
    "the same image" means the same objects in the same place.

    :param images: (P * n, H, W, 3) uint8, each prompt's n images together (sample.py's order).
    :return: {"seeds": mean RMS distance in [0, 1] between two images of the same prompt, over every
              pair of each prompt's images; "prompts": the same between the first images of consecutive
              prompts, the scale of a real difference}; "prompts" is None for a single prompt.
    """
    if n < 2 or len(images) % n:
        raise ValueError(f"seed_variety needs n >= 2 images of each prompt, got {len(images)} images for n={n}")
    x = np.asarray(images, dtype=np.float64).reshape(len(images) // n, n, -1) / 255.0  # (P, n, pixels)

    def rms(a, b):
        return np.sqrt(((a - b) ** 2).mean(axis=-1))

    seeds = np.mean([rms(x[:, i], x[:, j]).mean() for i, j in itertools.combinations(range(n), 2)])
    prompts = rms(x[:-1, 0], x[1:, 0]).mean() if len(x) > 1 else None
    return {"seeds": float(seeds), "prompts": None if prompts is None else float(prompts)}
