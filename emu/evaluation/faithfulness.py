"""The text-faithfulness judge of the toy world (emu/evaluation/judges.py has the appeal judge).

Three raters see the prompt and say which of two images shows it: A, B, BOTH or NEITHER. They read
the images with a small CNN trained on freshly rendered toy-world images to name each image's shape,
colour, count, position and background; it never sees a model's images while training.
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from emu import EmuError
from emu.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from emu.datasets import toyworld
from emu.evaluation.pairwise import BOTH, NEITHER, A, B

CLASSES = {"shape": tuple(toyworld.SHAPES), "color": tuple(toyworld.COLORS), "count": (1, 2, 3),
           "position": tuple(toyworld.POSITIONS), "background": tuple(toyworld.BACKGROUNDS)}


class AttributeClassifier(nn.Module):
    """A small CNN that reads a toy-world image's shape, colour, count, position and background.

    The input is the image and a per-image standardised copy of it (minus its mean colour,
    over its standard deviation): the copy shows the same shapes whatever the exposure, contrast
    and colours, which lets shape be learnt from a few thousand images. Four 3x3 conv layers take
    32x32 down to 8x8. The heads read the global max and mean of each channel (what is there,
    wherever it is) and a 4x4 average-pooled map (where it is, which `position` needs).
    """

    def __init__(self, width=16, size=32):
        super().__init__()
        self.width, self.size = width, size
        w = width
        layers = []
        for c_in, c_out, stride in ((6, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        n_features = 4 * w * (2 + (size // 8) ** 2)
        self.heads = nn.ModuleDict({
            a: nn.Sequential(nn.Linear(n_features, 128), nn.ReLU(), nn.Linear(128, len(CLASSES[a])))
            for a in toyworld.ATTRIBUTES})

    @staticmethod
    def prepare(images):
        """(B, H, W, 3) uint8 tensor -> (B, 6, H, W) float: the image in [-1, 1] and its standardised copy."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        standardised = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 0.05)
        return torch.cat([x, standardised], dim=1)

    def forward(self, x):
        """x: (B, 6, H, W) from `prepare` -> {attribute: (B, n_classes) logits}."""
        h = self.features(x)  # (B, 4w, H/4, W/4)
        # the position map: a fixed grid over the frame (size // 8 cells a side; at 32 x 32, 2 x 2 averages), so
        # an image of another size or aspect ratio is read with positions relative to its frame
        grid = F.adaptive_avg_pool2d(h, self.size // 8)
        h = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3)), grid.flatten(1)], dim=1)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def probabilities(self, images, batch_size=256):
        """(B, H, W, 3) uint8 images -> {attribute: (B, n_classes) numpy probabilities}. Trained on
        size x size squares; other sizes of about as many pixels (the toy world's other aspect ratios)
        are read with positions relative to their frame."""
        first = np.asarray(images[:1])
        if first.dtype != np.uint8 or first.ndim != 4 or first.shape[3] != 3 or min(first.shape[1:3]) < self.size // 2:
            raise ValueError(f"AttributeClassifier wants (H, W, 3) uint8 images with sides of at least {self.size // 2}, "
                             f"got {first.dtype} {first.shape[1:]}")
        self.eval()
        device = next(self.parameters()).device
        out = {a: [] for a in toyworld.ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            x = self.prepare(torch.as_tensor(np.asarray(images[i:i + batch_size]), device=device))
            for a, logits in self(x).items():
                out[a].append(logits.softmax(dim=-1).cpu().numpy())
        return {a: np.concatenate(p) for a, p in out.items()}


def render_labelled_images(n, seed, size=32, lowest_quality=0.3):
    """`n` fresh toy-world images, each photographic quality drawn uniformly from [lowest_quality, 1].

    The classifier must read content through whatever a generator produces, crisp or blurred,
    washed-out, noisy or cluttered, so it trains on a wide range, not on needles. The range stops
    at 0.3, below 92% of web images' qualities (beta(3, 2)): lower, the content itself is mostly
    destroyed, and such images teach noise rather than shapes.
    :return: images (n, size, size, 3) uint8 and labels (n, 5) int64 class indices per attribute.
    """
    rng = np.random.default_rng([seed, 104729])
    images, labels = [], []
    for _ in range(n):
        scene = toyworld.sample_scene(rng, photogenic=False)
        scene.qualities = {q: float(rng.uniform(lowest_quality, 1.0)) for q in toyworld.QUALITIES}
        images.append(toyworld.render(scene, size, rng))
        labels.append([CLASSES[a].index(getattr(scene, a)) for a in toyworld.ATTRIBUTES])
    return np.stack(images), np.array(labels, dtype=np.int64)


def flip_left_right(x, labels, flip):
    """Mirror the images where `flip` is True, swapping their "left" and "right" position labels.

    A mirrored toy scene is another valid toy scene (triangles point up either way; only the soft
    light now comes from the other side), so this doubles the training data for free.
    """
    left, right = CLASSES["position"].index("left"), CLASSES["position"].index("right")
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    labels = labels.clone()
    pos = labels[:, toyworld.ATTRIBUTES.index("position")]
    labels[:, toyworld.ATTRIBUTES.index("position")] = torch.where(
        flip & (pos == left), right, torch.where(flip & (pos == right), left, pos))
    return x, labels


def train_attribute_classifier(n_images=4000, steps=400, seed=0, size=32, batch_size=128, lr=3e-3, verbose=True):
    """Train an AttributeClassifier on freshly rendered, labelled toy-world images.

    The defaults take about 30 s on two CPU cores (12 s of it rendering) and read 1000 new web-like toy
    images right 99.5% of the time (shape, the hardest, 97.6%; 800 steps: 99.9% and 99.5%).

    The labels come from the renderer of the training images; the judge later sees only the
    pixels of generated images, which have no labels.
    """
    torch.manual_seed(seed)
    t0 = time.time()
    images, labels = render_labelled_images(n_images, seed, size)
    x = AttributeClassifier.prepare(torch.as_tensor(images))  # (N, 6, H, W)
    y = torch.as_tensor(labels)  # (N, 5)
    model = AttributeClassifier(size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = flip_left_right(x[idx], y[idx], torch.rand(batch_size, generator=gen) < 0.5)
        logits = model(xb)
        loss = sum(F.cross_entropy(logits[a], yb[:, k]) for k, a in enumerate(toyworld.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if verbose and (step % 200 == 0 or step == steps - 1):
            print(f"attribute classifier step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return model.eval()


def classifier_accuracy(classifier, images, labels):
    """Per-attribute accuracy of the classifier on labelled images: {attribute: fraction}."""
    probs = classifier.probabilities(images)
    return {a: float((probs[a].argmax(axis=1) == labels[:, k]).mean()) for k, a in enumerate(toyworld.ATTRIBUTES)}


def save_classifier(model, path):
    """Atomically write the classifier's weights, size and class lists to `path`."""
    save_checkpoint(path, {"model": model.state_dict(), "width": model.width, "size": model.size,
                           "classes": {a: list(c) for a, c in CLASSES.items()}})


def load_classifier(path):
    """Read a classifier written by save_classifier; EmuError naming the file if it does not fit."""
    ckpt = load_checkpoint(path)
    if not {"model", "width", "size", "classes"} <= set(ckpt):
        raise EmuError(f"{path}: not an attribute classifier checkpoint (keys {sorted(ckpt)[:6]})")
    if ckpt["classes"] != {a: list(c) for a, c in CLASSES.items()}:
        raise EmuError(f"{path}: classifier was trained on different attribute classes than this toy world's")
    model = AttributeClassifier(width=ckpt["width"], size=ckpt["size"])
    load_state_dict_checked(model, ckpt["model"], path)
    return model.eval()


def load_or_train_classifier(path, steps=None):
    """The judges' attribute classifier at `path`, trained on fresh toy-world images (`steps` steps,
    default train_attribute_classifier's) and saved there the first time."""
    if os.path.exists(path):
        return load_classifier(path)
    print(f"training the faithfulness judge's attribute classifier -> {path}")
    classifier = train_attribute_classifier(**({"steps": steps} if steps else {}))
    save_classifier(classifier, path)
    return classifier


def faithfulness_score(classifier, images, prompts):
    """How well each image shows what its prompt states, (B,) in [0, 1].

    The mean, over the attributes the prompt states (read with toyworld.parse_caption), of the
    classifier's probability that the image has the stated value. A prompt that states nothing
    checkable is matched by any image (score 1).
    """
    if len(images) != len(prompts):
        raise ValueError(f"faithfulness_score got {len(images)} images for {len(prompts)} prompts")
    probs = classifier.probabilities(images)
    scores = np.ones(len(prompts))
    for i, prompt in enumerate(prompts):
        stated = {a: v for a, v in toyworld.parse_caption(prompt).items() if v is not None}
        if stated:
            scores[i] = np.mean([probs[a][i, CLASSES[a].index(v)] for a, v in stated.items()])
    return scores


class FaithfulnessJudge:
    """`n_raters` raters who see the prompt and say which image shows it: A, B, BOTH or NEITHER.

    Rater r sees image i's faithfulness as faithfulness_score(i) + e[r, i], e ~ N(0, noise^2)
    from the rater's own seeded generator. With both perceived scores within `close_margin`
    of each other, the rater answers BOTH if both are at least `match_threshold` (both show the
    prompt) and NEITHER if both are below it; otherwise the rater picks the higher one.
    Votes use emu.evaluation.pairwise's encoding: A = +1, B = -1, BOTH = 2, NEITHER = 3
    (`faithfulness_to_ternary` maps BOTH and NEITHER to a tie, as the paper counts them).

    match_threshold=0.9: an image matches when it gets every stated attribute right. One stated
    attribute the classifier is sure is wrong pulls the mean to at most 0.8 (of five attributes)
    or 0.5 (of two), so the bar sits above that. close_margin=0.1: beliefs a tenth of the scale
    apart are not a preference. noise=0.03 as for the appeal raters: two raters rarely disagree
    about images whose scores are more than 0.1 apart.
    """

    def __init__(self, classifier, n_raters=3, noise=0.03, match_threshold=0.9, close_margin=0.1, seed=0):
        self.classifier, self.n_raters, self.noise, self.seed = classifier, n_raters, noise, seed
        self.match_threshold, self.close_margin = match_threshold, close_margin

    def vote(self, images_a, images_b, prompts):
        """(B, H, W, 3) uint8 pairs and their B prompts -> (n_raters, B) int64 votes in {A, B, BOTH, NEITHER}.

        Deterministic: the same images, prompts and seed always give the same votes.
        """
        score_a = faithfulness_score(self.classifier, images_a, prompts)
        score_b = faithfulness_score(self.classifier, images_b, prompts)
        error = np.stack([np.random.default_rng([self.seed, r]).normal(0.0, self.noise, size=(2, len(score_a)))
                          for r in range(self.n_raters)])  # (n_raters, 2, B)
        seen_a, seen_b = score_a + error[:, 0], score_b + error[:, 1]  # (n_raters, B)
        close = np.abs(seen_a - seen_b) < self.close_margin
        both = close & (seen_a >= self.match_threshold) & (seen_b >= self.match_threshold)
        neither = close & (seen_a < self.match_threshold) & (seen_b < self.match_threshold)
        better = np.where(seen_a >= seen_b, A, B)
        return np.where(both, BOTH, np.where(neither, NEITHER, better)).astype(np.int64)
