"""Kandinsky's image prior: a caption's CLIP text embedding -> the CLIP image embedding of an image
that caption could describe (kandinsky_paper.txt, section 3; the idea is DALL-E 2's).

A Kandinsky-style decoder U-Net is conditioned on a CLIP *image* embedding. At generation time
there is only a caption, so a prior first predicts the image embedding from the caption's text
embedding. The paper compares several priors (Table 3): none, a linear map, a residual MLP, and a
transformer diffusion model. Two are here:

  * LinearPrior: one linear layer, fit in closed form (ridge regression). The paper's best FID
    (8.03): "there might exist a linear relationship between visual and textual embedding spaces".
  * DiffusionPrior: a transformer that denoises the image embedding, conditioned on the caption's
    CLIP token states and pooled embedding, trained with the diffusion loss predicting the clean
    embedding and sampled with classifier-free guidance. The paper's best CLIP score and human
    evaluation; its real size is 20 layers, 32 heads, width 2048 (section 3).

Both work in a normalised image-embedding space: every coordinate is standardised by its mean and
standard deviation over the training set ("element-wise normalization of visual embeddings ... based
on full-dataset statistics", which the paper says makes the diffusion converge faster), and the
prediction is mapped back ("inverse normalization") at the end.

Shapes: text.pooled (B, P) is CLIP's projected caption vector, text.clip (B, L, Dc) its token states
(emu.text.encoder.TextEmbedding); image embeddings are (B, E), CLIP's projected image vector
(emu.text.clip.CLIPVisionModel). For CLIP ViT-L/14, P = E = 768.
"""
import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu import EmuError
from emu.checkpoint import load_checkpoint, load_state_dict_checked
from emu.diffusion import GaussianDiffusion, classifier_free_guidance
from emu.models.nn import timestep_embedding
from emu.text.clip import CLIP_LENGTH, CLIPLayer
from emu.text.encoder import drop_captions


class EmbeddingNorm(nn.Module):
    """Element-wise standardisation of image embeddings by training-set statistics, and its inverse."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, embeddings):
        """Set the statistics from (N, E) training embeddings."""
        self.mean.copy_(embeddings.mean(0))
        self.std.copy_(embeddings.std(0).clamp(min=1e-6))
        return self

    def normalize(self, x):
        return (x - self.mean) / self.std

    def denormalize(self, x):
        return x * self.std + self.mean


class LinearPrior(nn.Module):
    """image embedding = denormalize(W @ text.pooled + b): one linear layer."""
    kind = "linear"

    def __init__(self, text_dim, image_dim):
        super().__init__()
        self.cfg = {"text_dim": text_dim, "image_dim": image_dim}
        self.proj = nn.Linear(text_dim, image_dim)
        self.norm = EmbeddingNorm(image_dim)

    @torch.no_grad()
    def fit(self, text_embeds, image_embeds, ridge=1e-3):
        """Least squares with a ridge penalty, in closed form: the (W, b) minimising
        ||[X, 1] [W; b]^T - Y||^2 + ridge * N * ||W||^2 over (N, P) text and (N, E) normalised image
        embeddings. (The bias is not penalised.) float64 for the solve: X^T X is badly conditioned
        when captions repeat."""
        y = self.norm.fit(image_embeds).normalize(image_embeds).double()
        x = text_embeds.double()
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean  # centring takes the bias out of the penalised solve
        gram = xc.T @ xc + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, xc.T @ yc)  # (P, E)
        self.proj.weight.copy_(w.T.float())
        self.proj.bias.copy_((y_mean - x_mean @ w).float())
        return self

    def cfg_dims(self):
        """(text width, image-embedding width)."""
        return self.cfg["text_dim"], self.cfg["image_dim"]

    def forward(self, text):
        """:param text: a TextEmbedding (only .pooled is read). :return: (B, E) image embeddings."""
        return self.norm.denormalize(self.proj(text.pooled))

    def generate(self, text, uncond=None, generator=None, **_):
        """The same as forward: a linear prior is deterministic, with nothing to guide."""
        return self(text)


@dataclass
class DiffusionPriorConfig:
    image_dim: int = 64      # E, CLIP's projected image vector (768 for ViT-L/14)
    text_dim: int = 64       # P, CLIP's projected caption vector
    token_dim: int = 64      # Dc, CLIP's token states (768 for ViT-L/14's text tower)
    width: int = 128         # the transformer's width
    depth: int = 4
    heads: int = 4
    timesteps: int = 1000
    schedule: str = "cosine"  # DALL-E 2's prior: cosine schedule, predicting the clean embedding


PRIOR_PRESETS = {
    # a toy prior for the toy towers' 64-wide embeddings
    "toy": DiffusionPriorConfig(),
    # the paper's: "num_layers=20, num_heads=32, and hidden_size=2048" (section 3) on CLIP ViT-L/14's
    # 768-wide embeddings: 1.01B parameters, the paper's "1B" (Table 2)
    "kandinsky": DiffusionPriorConfig(image_dim=768, text_dim=768, token_dim=768, width=2048, depth=20, heads=32),
}


class DiffusionPrior(nn.Module):
    """A transformer encoder denoising a normalised image embedding, conditioned on the caption.

    Its sequence is the caption's CLIP token states (projected to the width), then four tokens: the
    caption's pooled embedding, the timestep, the noisy image embedding, and a learned query whose
    output is the prediction of the clean embedding. The layers are standard pre-norm encoder layers
    (self-attention over the whole sequence, padding masked, then a 4x GELU MLP): CLIP's own layer,
    emu.text.clip.CLIPLayer, so attention goes through emu.models.attention. Dropping the caption (its states and
    pooled vector replaced by the empty caption's) teaches the unconditional prediction that
    classifier-free guidance needs.
    """
    kind = "diffusion"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.tokens_in = nn.Linear(cfg.token_dim, w)
        self.text_in = nn.Linear(cfg.text_dim, w)
        self.time_in = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.image_in = nn.Linear(cfg.image_dim, w)
        self.query = nn.Parameter(torch.zeros(w))
        self.position = nn.Parameter(torch.zeros(CLIP_LENGTH + 4, w))  # the caption's positions, then the four
        layer = SimpleNamespace(hidden_size=w, intermediate_size=4 * w, num_attention_heads=cfg.heads,
                                layer_norm_eps=1e-5, hidden_act="gelu")
        self.layers = nn.ModuleList(CLIPLayer(layer) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.image_dim)
        self.norm = EmbeddingNorm(cfg.image_dim)
        self.diffusion = GaussianDiffusion(cfg.schedule, cfg.timesteps, "x0")
        for p in (self.query, self.position):
            nn.init.normal_(p, std=0.02)

    def cfg_dims(self):
        """(text width, image-embedding width)."""
        return self.cfg.text_dim, self.cfg.image_dim

    def forward(self, x_t, t, text):
        """:param x_t: (B, E) noisy normalised image embeddings; t: (B,) timesteps; text: a TextEmbedding.
        :return: (B, E) the predicted clean normalised embeddings."""
        text = text.without_padding()
        B, L = text.clip_mask.shape
        four = torch.stack([self.text_in(text.pooled), self.time_in(timestep_embedding(t, self.cfg.width)),
                            self.image_in(x_t), self.query.expand(B, -1)], dim=1)  # (B, 4, W)
        h = torch.cat([self.tokens_in(text.clip), four], dim=1) + self.position[:L + 4]  # (B, L + 4, W)
        mask = torch.cat([text.clip_mask, torch.ones(B, 4, dtype=torch.bool, device=x_t.device)], dim=1)
        for layer in self.layers:
            h = layer(h, mask)
        return self.out(self.norm_out(h[:, -1]))

    def training_loss(self, image_embeds, text, empty, generator=None, p_uncond=0.1):
        """The diffusion loss on (B, E) image embeddings (normalised here) and their captions'
        TextEmbedding; `empty` is the empty caption's (one row), swapped in with probability p_uncond."""
        text = drop_captions(text, empty, p_uncond, generator)
        return self.diffusion.training_loss(self, self.norm.normalize(image_embeds), text, generator=generator)

    @torch.no_grad()
    def generate(self, text, uncond, steps=25, cfg_scale=4.0, generator=None):
        """(B, E) image embeddings for the captions in `text`, by DDIM with classifier-free guidance.
        :param uncond: the empty caption's TextEmbedding, B rows."""
        device = text.pooled.device
        noise = torch.randn(len(text), self.cfg.image_dim, generator=generator, device=device)
        model_fn = lambda x, t: classifier_free_guidance(self, x, t, text, uncond, cfg_scale)
        return self.norm.denormalize(self.diffusion.sample(model_fn, noise, steps=steps, generator=generator))


def prior_config(prior):
    """The plain configuration a checkpoint keeps, to rebuild `prior` with build_prior."""
    cfg = prior.cfg if isinstance(prior, LinearPrior) else asdict(prior.cfg)
    return {"kind": prior.kind, **cfg}


def build_prior(config):
    """A LinearPrior or DiffusionPrior from prior_config's output."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "linear":
        return LinearPrior(**config)
    if kind == "diffusion":
        return DiffusionPrior(DiffusionPriorConfig(**config))
    raise ValueError(f"unknown prior kind {kind!r}")


def load_prior(path, device="cpu"):
    """The prior train_prior.py saved at `path` (prior.pt), frozen, in eval mode."""
    if not os.path.isfile(path):
        raise EmuError(f"{path}: image prior not found (run python train_prior.py)")
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise EmuError(f"{path}: not an image prior written by train_prior.py (no 'config' or 'model' entry)")
    try:
        prior = build_prior(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise EmuError(f"{path}: its prior configuration does not fit this code ({e})") from None
    load_state_dict_checked(prior, ckpt["model"], path)
    return prior.to(device).eval().requires_grad_(False)


def cosine_similarity(predicted, true, center=None):
    """(B,) cosine similarity of predicted and true image embeddings.

    With `center` (the mean training embedding), both are measured from it: how well the prior
    predicts what sets this image apart from the average one. Embeddings that share a large common
    part (those of an untrained CLIP tower do: any two are at cosine 0.98) need it to say anything."""
    predicted, true = predicted.float(), true.float()
    if center is not None:
        predicted, true = predicted - center, true - center
    return F.cosine_similarity(predicted, true, dim=-1)


def count_parameters(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in DiffusionPrior(cfg).parameters())
