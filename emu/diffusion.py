"""DDPM: the noise schedule, the training loss, and two samplers (DDPM ancestral and DDIM).

Notation (Ho et al. 2020): beta_t is the variance added at step t, alpha_bar_t = prod_{s<=t} (1 - beta_s),
and the forward process in closed form is

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,   eps ~ N(0, I).

The model predicts either eps ("eps") or v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x_0 ("v").
Timesteps are integers 0..T-1; t = 0 is the least noisy.
"""
import math

import torch
import torch.nn.functional as F

from emu.text.encoder import Conditioning


def make_betas(schedule, num_timesteps):
    """The per-step variances beta_t as a float64 tensor of length `num_timesteps`.

    linear:        DDPM's 1e-4 .. 0.02 (scaled so any T gives the same curve).
    scaled_linear: Stable Diffusion's latent schedule, linear in sqrt(beta) from 0.00085 to 0.012.
    cosine:        Nichol & Dhariwal's alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta <= 0.999.
    """
    T = num_timesteps
    if schedule == "linear":
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {schedule!r} (choose linear, scaled_linear or cosine)")


def sample_noise(x, offset=0.0, generator=None):
    """Gaussian noise shaped like x, plus `offset` times a per-(image, channel) constant.

    The noise offset (Guttenberg 2023) lets the model change the mean brightness of a channel,
    which plain N(0, I) noise barely touches at high t; it gives high-contrast images.
    noise = randn_like(x) + offset * randn(B, C, 1, 1).
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if offset:
        B, C = x.shape[:2]
        noise = noise + offset * torch.randn(B, C, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
    return noise


def dynamic_threshold(x0, percentile=0.995):
    """Imagen's dynamic thresholding (Saharia et al. 2022) of an x0 estimate, image by image.

    s is the `percentile` quantile of |x0| over each image's values, at least 1; x0 is clamped to
    [-s, s] and divided by s. An image already within [-1, 1] is unchanged; one that overshoots is
    pulled back into [-1, 1] instead of saturating, which lets large guidance scales work.

    :param x0: (B, ...) estimate of the clean image.
    :param percentile: in [0, 1]; Imagen uses 0.995.
    :return: x0's shape, within [-1, 1].
    """
    a = x0.abs().flatten(1).float().sort(dim=1).values  # (B, N)
    # the quantile with linear interpolation, as torch.quantile (which refuses inputs over 2^24 values)
    pos = percentile * (a.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, a.shape[1] - 1)
    s = (a[:, lo] + (pos - lo) * (a[:, hi] - a[:, lo])).clamp(min=1.0)  # (B,)
    s = s.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


class GaussianDiffusion:
    """Holds the schedule and does the maths: q_sample, the loss, and the sampling steps."""

    def __init__(self, schedule="scaled_linear", num_timesteps=1000, prediction="eps", min_snr_gamma=0.0, spacing="linspace"):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction type {prediction!r} (choose eps, v or x0)")
        if spacing not in ("linspace", "trailing"):
            raise ValueError(f"unknown timestep spacing {spacing!r} (choose linspace or trailing)")
        self.schedule, self.num_timesteps, self.prediction, self.spacing = schedule, num_timesteps, prediction, spacing
        self.min_snr_gamma = min_snr_gamma
        self.betas = make_betas(schedule, num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64, decreasing

    def _ab(self, t, x):
        """alpha_bar at timesteps t (B,), shaped (B, 1, 1, 1) like x; t = -1 means alpha_bar = 1 (clean)."""
        ab = torch.where(t >= 0, self.alphas_cumprod.to(t.device)[t.clamp(min=0)], torch.ones((), dtype=torch.float64, device=t.device))
        return ab.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """Jump straight to step t of the forward process: sqrt(ab) x0 + sqrt(1 - ab) noise."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0, t, noise):
        """What the model is trained to output at (x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":  # the clean sample itself (DALL-E 2's and Kandinsky's image prior, emu/variants/prior.py)
            return x0
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def training_noise(self, x0, noise_offset=0.0, generator=None):
        """A random timestep and noise (with `noise_offset`) for every latent in x0: {"t": (B,), "noise"}.
        (train_step draws them for the whole batch first, then splits the batch into micro-batches.)"""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        return {"t": t, "noise": sample_noise(x0, noise_offset, generator)}

    def training_loss(self, model, x0, text, noise_offset=0.0, generator=None, t=None, noise=None):
        """Mean squared error between the model output and its target at a random timestep.

        :param model: called as model(x_t, t, text).
        :param x0: (B, C, H, W) clean latents.
        :param text: the batch's emu.text.encoder.TextEmbedding (captions already dropped for CFG).
        :param t, noise: the timesteps and noise to use; drawn with training_noise() when not given.
        """
        if t is None:
            t, noise = self.training_noise(x0, noise_offset, generator).values()
        out = model(self.q_sample(x0, t, noise), t, text)
        if not self.min_snr_gamma:
            return F.mse_loss(out.float(), self.target(x0, t, noise).float())
        per_sample = (out.float() - self.target(x0, t, noise).float()).square().flatten(1).mean(dim=1)
        return (per_sample * self.loss_weight(t)).mean()

    def loss_weight(self, t):
        """Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy"): each timestep's loss, seen as an error of the clean sample, is weighted by
        min(SNR(t), gamma) instead of what the prediction target implies (SNR for eps, SNR + 1 for v). The
        nearly clean steps, which only polish detail, stop dominating the gradient, and the model learns
        the content (what the caption decides) sooner. (B,) float32."""
        ab = self.alphas_cumprod.to(t.device)[t].float()
        snr = ab / (1 - ab)
        implied = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.prediction]
        return snr.clamp(max=self.min_snr_gamma) / implied

    @torch.no_grad()
    def check_loss(self, model, x0, text, seed=1234):
        """The denoising loss at 8 fixed timesteps with seeded noise: the same draws at every call, so
        held-out checks during training are comparable (qtune's early stopping)."""
        gen = torch.Generator(x0.device).manual_seed(seed)
        total = 0.0
        for t_value in torch.linspace(50, self.num_timesteps - 50, 8).long():
            t = t_value.expand(len(x0)).to(x0.device)
            noise = sample_noise(x0, 0.0, gen)
            total += F.mse_loss(model(self.q_sample(x0, t, noise), t, text).float(), self.target(x0, t, noise).float()).item()
        return total / 8

    def predict_x0_eps(self, model_out, x_t, t):
        """Turn the model output into (x0, eps) estimates at x_t."""
        ab = self._ab(t, x_t)
        if self.prediction == "eps":
            eps = model_out
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        elif self.prediction == "x0":
            x0 = model_out
            eps = self.eps_from_x0(x0, x_t, t)
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * model_out
            eps = (1 - ab).sqrt() * x_t + ab.sqrt() * model_out
        return x0, eps

    def eps_from_x0(self, x0, x_t, t):
        """The noise that x_t holds besides the clean estimate x0: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
        ab = self._ab(t, x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def ddpm_step(self, x0, x_t, t, s, generator=None):
        """One ancestral step x_t -> x_s (s < t) sampling the posterior q(x_s | x_t, x0).

        On a respaced schedule (fewer steps), the step's beta is 1 - ab_t / ab_s; the posterior is
        N(c0 x0 + ct x_t, beta_tilde) with c0 = sqrt(ab_s) beta / (1 - ab_t),
        ct = sqrt(1 - beta) (1 - ab_s) / (1 - ab_t), beta_tilde = beta (1 - ab_s) / (1 - ab_t).
        """
        ab_t, ab_s = self._ab(t, x_t), self._ab(s, x_t)
        beta = 1 - ab_t / ab_s
        mean = ab_s.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t) * x_t
        var = beta * (1 - ab_s) / (1 - ab_t)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + var.sqrt() * noise * (s >= 0).view(-1, *([1] * (x_t.dim() - 1)))

    def ddim_step(self, x0, eps, x_t, t, s, eta=0.0, generator=None):
        """One DDIM step x_t -> x_s (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM."""
        ab_t, ab_s = self._ab(t, x_t), self._ab(s, x_t)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        x_s = ab_s.sqrt() * x0 + (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_s = x_s + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return x_s

    def timesteps(self, steps, start=None):
        """`steps` evenly spaced timesteps from `start` (default T-1) down, then -1 (the clean image): down to 0
        ("linspace"), or at every (start+1)/steps-th step counted back from start+1, ending at (start+1)/steps - 1
        ("trailing": Lin et al. 2024, and how diffusers' schedulers space them with that setting)."""
        start = self.num_timesteps - 1 if start is None else start
        if self.spacing == "trailing":
            ts = torch.arange(start + 1, 0, -(start + 1) / steps, dtype=torch.float64).round().long() - 1
        else:
            ts = torch.linspace(start, 0, steps).round().long()
        return torch.cat([ts, torch.tensor([-1])])

    @torch.no_grad()
    def sample(self, model_fn, noise, steps=50, sampler="ddim", eta=0.0, generator=None, clip_x0=None,
               threshold_percentile=None, callback=None, start=None):
        """Run the reverse process from `noise` (B, C, H, W) and return the final x_0. With `start`, `noise`
        is a sample already at that step (x_start, as SDEdit makes from an image with q_sample), and the
        reverse process runs from there.

        :param model_fn: called as model_fn(x_t, t) -> model output (guidance already applied).
        :param sampler: "ddim" (with `eta`) or "ddpm" (ancestral).
        :param clip_x0: clamp the x0 estimate to [-clip_x0, clip_x0] at every step (None: off).
        :param threshold_percentile: dynamically threshold the x0 estimate at every step with this
            percentile (dynamic_threshold; Imagen's 0.995), for data in [-1, 1] such as pixels (None: off).
        :param callback: called after every step as callback(step, steps, x0), with the step's estimate
            of the clean sample (the editor's preview); an exception it raises stops sampling (cancel).
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r} (choose ddim or ddpm)")
        x = noise
        ts = self.timesteps(steps, start).to(noise.device)
        for i, (t_now, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            t = t_now.expand(x.shape[0])
            s = t_next.expand(x.shape[0])
            x0, eps = self.predict_x0_eps(model_fn(x, t), x, t)
            if clip_x0 is not None or threshold_percentile is not None:
                if clip_x0 is not None:
                    x0 = x0.clamp(-clip_x0, clip_x0)
                if threshold_percentile is not None:
                    x0 = dynamic_threshold(x0, threshold_percentile)
                # The step must head for the x0 it keeps: the noise is re-read from x_t and that x0, as the
                # DDPM posterior (which takes x0 and x_t alone, as Imagen samples) does implicitly. A DDIM step
                # that kept the model's own eps would pair a pulled-back x0 with the noise of the overshooting
                # one: the pixel cascade's guided samples then lost their prompts (README, three architectures).
                eps = self.eps_from_x0(x0, x, t)
            if sampler == "ddpm":
                x = self.ddpm_step(x0, x, t, s, generator)
            else:
                x = self.ddim_step(x0, eps, x, t, s, eta, generator)
            if callback is not None:
                callback(i + 1, len(ts) - 1, x0)
        return x


# Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
# section 3.4): a large guidance scale inflates the spread of the guided prediction far beyond what the
# model predicts for any one caption, and the images come out over-exposed and over-saturated. Rescaling
# the guided output to the conditional output's standard deviation undoes that; blending a fraction phi of
# the rescaled output with the rest of the plain one keeps the images from turning flat. phi = 0.7 is the
# paper's value. In the toy world, at guidance 5, the pretrained model's exposure measure (the judges')
# is 0.83 without it and 0.68 with it, against 0.28 for the haystack it learned from and 0.31 unguided,
# while its prompt accuracy stays the same (README, "Guidance rescale").
GUIDANCE_RESCALE = 0.7


def classifier_free_guidance(model, x, t, text, uncond, scale, model_kwargs=None, rescale=0.0):
    """Guided model output: out_uncond + scale * (out_cond - out_uncond), in one batched call.

    :param text: the prompts' TextEmbedding (B rows); uncond: the empty prompt's (B rows).
    :param scale: 1.0 is plain conditional sampling; larger trades diversity for faithfulness.
    :param model_kwargs: other inputs of the model, each with B rows and the same in both halves
        (a super-resolution model's low-resolution image and its augmentation level).
    :param rescale: guidance rescale's phi in [0, 1] (GUIDANCE_RESCALE): each row of the guided output is
        blended, phi to 1 - phi, with itself scaled to the conditional output's standard deviation.
        0 is plain guidance.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    model_kwargs = model_kwargs or {}
    if scale == 1.0:
        return model(x, t, text, **model_kwargs)
    both = {k: torch.cat([v, v]) for k, v in model_kwargs.items()}
    out = model(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([text, uncond]), **both)
    cond, unc = out.chunk(2)
    guided = unc + scale * (cond - unc)
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.dim()))  # one standard deviation per row
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12))
    return rescale * rescaled + (1.0 - rescale) * guided


@torch.no_grad()
def guided_images(model, first_stage, diffusion, text, uncond, seeds, size, cfg_scale, steps, sampler, eta,
                  model_kwargs=None, callback=None, cfg_rescale=0.0):
    """Images from a latent model: one noise tensor per seed (drawn on the CPU from that seed alone, so
    the same seed gives the same start in any model and on any device), sampled with classifier-free
    guidance, then decoded by the first stage.

    :param size: the images' (height, width) in pixels; the latents are first_stage.downsample_factor smaller.
    :param model_kwargs: other inputs of the model (classifier_free_guidance's).
    :param callback: GaussianDiffusion.sample's, given the latents' clean estimate and the first stage,
        as callback(step, steps, x0, first_stage), so that it can decode a preview.
    :param cfg_rescale: guidance rescale's phi (classifier_free_guidance's `rescale`).
    :return: (B, 3, H, W).
    """
    f, device = first_stage.downsample_factor, text.pooled.device
    shape = (model.cfg.in_channels, size[0] // f, size[1] // f)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    gen = torch.Generator(device).manual_seed(int(seeds[0]))
    model_fn = lambda x, t: classifier_free_guidance(model, x, t, text, uncond, cfg_scale, model_kwargs, cfg_rescale)
    each_step = None if callback is None else (lambda i, n, x0: callback(i, n, x0, first_stage))
    latents = diffusion.sample(model_fn, noise.to(device), steps=steps, sampler=sampler, eta=eta, generator=gen,
                               callback=each_step)
    return first_stage.decode(latents)
