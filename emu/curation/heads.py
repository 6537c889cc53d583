"""Small heads on CLIP image embeddings for the curation funnel: the aesthetic score (fitted to people's
ratings) and the unsafe-content probability, saved as safetensors beside their metadata; and Stable
Diffusion v1's published safety checker, which flags images by their embeddings' closeness to concepts.
"""
import csv
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from emu import EmuError
from emu.text.clip import SAFETY_CONCEPTS
from emu.text.hf import find_weight_files, load_hf_weights, read_config

class EmbeddingHead(nn.Module):
    """A linear map, or a one-hidden-layer MLP, from a unit CLIP image embedding to one number.

    The LAION aesthetic predictor is this kind of head (an MLP on CLIP ViT-L/14 embeddings trained
    on human ratings); a linear probe is the smallest version and often nearly as good.
    """

    def __init__(self, dim, hidden=0):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = nn.Linear(dim, 1) if hidden == 0 else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, embeddings):
        """(B, dim) embeddings -> (B,) scores; the embeddings are normalised first."""
        return self.net(nn.functional.normalize(embeddings.float(), dim=-1)).squeeze(-1)


class SafetyConcepts(nn.Module):
    """Stable Diffusion v1's safety checker (its safety_checker/ folder), on CLIP ViT-L/14 image embeddings.

    It holds 17 concept embeddings and 3 "special care" ones, each with its own threshold on the cosine
    similarity. An image is flagged when any concept's similarity passes its threshold; once any
    special-care concept passes its own, every later threshold is lowered by 0.01. The margins are
    rounded to three decimals before they are compared with zero, as the published checker does.
    """
    gives_probability = True  # 1.0 for a flagged image, 0.0 for the others: the checker's verdict as it is

    def __init__(self, dim, concepts=17, special=3):
        super().__init__()
        self.concept_embeds = nn.Parameter(torch.zeros(concepts, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.zeros(special, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.zeros(concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.zeros(special), requires_grad=False)

    def forward(self, embeddings):
        """(B, dim) embeddings -> (B,) 1.0 where the checker flags the image, else 0.0."""
        unit = nn.functional.normalize(embeddings.float(), dim=-1)
        special = unit @ nn.functional.normalize(self.special_care_embeds, dim=-1).T - self.special_care_embeds_weights
        concept = unit @ nn.functional.normalize(self.concept_embeds, dim=-1).T - self.concept_embeds_weights
        flagged = []
        for special_margins, concept_margins in zip(special.tolist(), concept.tolist()):
            adjustment = 0.0
            for margin in special_margins:
                if round(margin + adjustment, 3) > 0:
                    adjustment = 0.01
            flagged.append(any(round(margin + adjustment, 3) > 0 for margin in concept_margins))
        return torch.tensor(flagged, dtype=torch.float32)


def load_safety_checker(path):
    """The concept check of a Stable Diffusion folder's safety_checker/ (its image tower is read by
    emu.text.clip.load_clip_vision); a one-line EmuError for a folder that is not one."""
    config, _ = read_config(path)
    files, source = find_weight_files(path)
    if SAFETY_CONCEPTS[0] not in files:
        raise EmuError(f"{source}: not a Stable Diffusion safety checker (no {SAFETY_CONCEPTS[0]})")
    checker = SafetyConcepts(int(config.get("projection_dim", 768)))
    load_hf_weights(checker, path, {name: name for name in SAFETY_CONCEPTS}, ("vision_model.", "visual_projection."))
    return checker.eval()


def save_head(head, path):
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, path,
              metadata={"dim": str(head.dim), "hidden": str(head.hidden)})


def load_head(path):
    """Load an EmbeddingHead, or for a directory the safety checker it holds (load_safety_checker);
    a one-line EmuError for a missing or foreign file."""
    if os.path.isdir(path):
        return load_safety_checker(path)
    try:
        with safe_open(path, "pt") as f:
            info = f.metadata() or {}
        head = EmbeddingHead(int(info["dim"]), int(info["hidden"]))
        head.load_state_dict(load_file(path))
    except FileNotFoundError:
        raise EmuError(f"{path}: head not found") from None
    except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as e:
        raise EmuError(f"{path}: not a head on CLIP embeddings ({type(e).__name__}: {str(e)[:100]})") from None
    return head.eval().requires_grad_(False)


def train_aesthetic_head(embeddings, ratings, hidden=0, ridge=1e-3, steps=500, lr=1e-3, seed=0):
    """Fit an EmbeddingHead to human ratings by least squares.

    A linear head is solved in closed form (ridge regression on the centred unit embeddings; `ridge`
    is relative to their mean square), so it fits exactly what a linear map can. An MLP head
    (hidden > 0) is trained with full-batch AdamW for `steps` steps.

    :param embeddings: (N, D) CLIP image embeddings of the rated images.
    :param ratings: (N,) their ratings, on any scale (the head predicts that scale).
    """
    torch.manual_seed(seed)
    x = nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)  # (N, D)
    y = torch.as_tensor(ratings, dtype=torch.float64)
    head = EmbeddingHead(x.shape[1], hidden)
    if hidden == 0:
        xc, yc = x - x.mean(0), y - y.mean()
        gram = xc.T @ xc  # (D, D)
        w = torch.linalg.solve(gram + ridge * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc)
        with torch.no_grad():
            head.net.weight.copy_(w[None])
            head.net.bias.fill_(float(y.mean() - x.mean(0) @ w))
        return head.eval().requires_grad_(False)
    with torch.no_grad():  # start at the mean rating: the MLP learns only the differences
        head.net[-1].bias.fill_(float(y.mean()))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.mse_loss(head(x.float()), y.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)


def read_ratings(path):
    """A ratings file: CSV with a header naming `key` and `rating` columns -> {key: rating}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise EmuError(f"{path}: ratings file not found") from None
    if not rows or not {"key", "rating"} <= set(rows[0]):
        raise EmuError(f"{path}: a ratings file needs a header with 'key' and 'rating' columns")
    try:
        return {r["key"]: float(r["rating"]) for r in rows}
    except (TypeError, ValueError):
        raise EmuError(f"{path}: a rating that is not a number") from None
