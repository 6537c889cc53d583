"""Automatic judges that stand in for the paper's human raters in the toy world.

The paper evaluates with people (emu_paper.txt, section 4.1): five raters pick the more visually
appealing of two images without seeing the prompt, three raters pick the image that better matches
the prompt. Here the raters are programs, built from what the paper's photography guidelines
(section 3.3) ask for, and they obey one hard rule: a judge sees only pixels, plus the prompt text
for faithfulness. It never reads the toy world's hidden labels; generated images have none.

    photo_measurements  six fixed formulas on pixels, one per guideline, each in [0, 1]
    appeal_score        their mean: the automatic aesthetic score (also the curation filter's)
    AppealJudge         n raters = appeal score + each rater's own taste (seeded noise)
    AttributeClassifier a small CNN that reads shape, colour, count, position and background
    FaithfulnessJudge   n raters who compare the classifier's belief in what the prompt states
                        (both in emu/evaluation/faithfulness.py)

Each formula's constants come from what a photographer would call good or bad, stated beside
it; none is fitted to data. Where several standard formulas could measure a guideline, we kept
the one that tracked it best on toy web images, whose hidden qualities are known (the tests pin
that each measurement goes the right way). Nothing here looks at, or is tuned for, the models
being compared.
"""

import numpy as np

from emu.evaluation.pairwise import TIE, A, B, faithfulness_to_ternary

MEASUREMENTS = ("composition", "exposure", "contrast", "sharpness", "noise", "clutter")

# -----------------------------------------------------------------------------
# pixel statistics the measurements share


def luminance(images):
    """Rec. 601 luma of (B, H, W, 3) float images in [0, 1] -> (B, H, W)."""
    return images @ np.array([0.299, 0.587, 0.114])


def median3x3(x):
    """Median over each pixel's 3x3 neighbourhood (edges replicated), per channel.

    A median removes isolated grainy pixels but leaves a step edge where it is and as steep as it
    was, so tones and edges are measured on what the eye sees through the grain. It also erases
    objects smaller than about 3x3 pixels, which is why the salient mask uses `blur3x3` instead.

    :param x: (B, H, W, C) array.
    """
    H, W = x.shape[1], x.shape[2]
    p = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="edge")
    shifted = np.stack([p[:, i:i + H, j:j + W] for i in range(3) for j in range(3)])  # (9, B, H, W, C)
    return np.partition(shifted, 4, axis=0)[4]


def blur3x3(x):
    """The binomial blur [1, 2, 1] / 4 along each axis (edges replicated), per channel.

    It averages grain down by about 2.7x but keeps a 3-pixel object visible, unlike the median.

    :param x: (B, H, W, C) array.
    """
    H, W = x.shape[1], x.shape[2]
    p = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="edge")
    w = (0.25, 0.5, 0.25)
    return sum(w[i] * w[j] * p[:, i:i + H, j:j + W] for i in range(3) for j in range(3))


def background_colour(images):
    """The background's RGB colour: the per-channel median of the one-pixel frame border.

    A photo's border is mostly background, and a median ignores a subject or a stray object that
    reaches the edge. (B, H, W, 3) -> (B, 3).
    """
    border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def salient_mask(images):
    """Pixels that stand out from the background: (B, H, W, 3) in [0, 1] -> (B, H, W) bool.

    A pixel stands out when, after a light blur (grain is not content), some channel differs from
    the border-estimated background by more than a threshold. The threshold is the larger of
    0.1 (about 25 grey levels: above the soft light falloff across a plain backdrop and the grain
    left after the blur) and a quarter of the image's strongest difference (so a washed-out photo
    still has a subject: the eye adapts to the photo's own contrast).
    """
    distance = np.abs(blur3x3(images) - background_colour(images)[:, None, None, :]).max(axis=-1)  # (B, H, W)
    strongest = np.percentile(distance.reshape(len(images), -1), 99.5, axis=1)
    threshold = np.maximum(0.1, 0.25 * strongest)
    return distance > threshold[:, None, None]


def connected_components(mask):
    """Label 4-connected regions of a boolean (B, H, W) mask -> (B, H, W) int64 labels, -1 off.

    Label propagation: every on-pixel starts with its own flat index (unique across the batch) and
    repeatedly takes the smallest label among itself and its on-neighbours, until nothing changes.
    Each region ends up labelled by its smallest pixel index. Slow for huge images, instant at 32x32.
    """
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        p = np.pad(labels, [(0, 0), (1, 1), (1, 1)], constant_values=big)
        up, down, left, right = p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]
        neighbours = np.minimum(np.minimum(up, down), np.minimum(left, right))
        new = np.where(mask, np.minimum(labels, neighbours), big)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


# -----------------------------------------------------------------------------
# the six measurements: one fixed formula per guideline, each in [0, 1] with 1 = good


def exposure_measure(images, denoised):
    """Lighting: balanced exposure, neither dim nor blown out.

    A well-exposed photo's tones reach well to both sides of mid-grey: its brightest channel
    value rises towards white and its darkest falls towards black. Under-exposure squeezes every
    tone towards black, so the highlights never get bright; over-exposure squeezes them towards
    white, so the shadows never get dark. The reach is the shorter of (brightest - 0.5) and
    (0.5 - darkest), on the denoised image so one hot pixel is not a highlight; reaching 0.35
    (to within 0.15 of black and of white) scores 1. Clipped pixels (pure black or pure white:
    detail lost for good) subtract their share of the frame on top.
    """
    flat = denoised.reshape(len(images), -1)
    reach = np.minimum(flat.max(axis=1) - 0.5, 0.5 - flat.min(axis=1))
    y = luminance(images)
    clipped = ((y <= 2 / 255) | (y >= 253 / 255)).mean(axis=(1, 2))
    return np.clip(reach / 0.35 - clipped, 0, 1)


def contrast_measure(denoised):
    """Colour and contrast: vibrant colours and strong contrast, not a grey or one-colour frame.

    The mean of two standard measures (on the denoised image: grain is not colour), each
    saturating at what reads as clearly vivid: RMS contrast (the standard deviation of
    luminance) reaches 1 at 0.25, a print with deep shadows and bright highlights; Hasler and
    Suesstrunk's colourfulness M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2),
    rg = R - G, yb = (R + G) / 2 - B (on 0..255), reaches 1 at 59, their "quite colourful".
    """
    rms = luminance(denoised).std(axis=(1, 2))
    R, G, Bl = (denoised[..., c].reshape(len(denoised), -1) * 255 for c in range(3))
    rg, yb = R - G, (R + G) / 2 - Bl
    colourful = np.hypot(rg.std(axis=1), yb.std(axis=1)) + 0.3 * np.hypot(rg.mean(axis=1), yb.mean(axis=1))
    return (np.clip(rms / 0.25, 0, 1) + np.clip(colourful / 59, 0, 1)) / 2


def sharpness_measure(denoised):
    """Subject detail: crisp edges rather than soft ones (acutance).

    At a crisp edge the whole change happens between two neighbouring pixels, so the largest
    one-pixel step is as large as the largest two-pixel step; a blur spreads the change out, and
    a Gaussian blur of 1 pixel brings the ratio down to about 0.5. We take the ratio of the 99th
    percentiles (the strongest edges) of the one-pixel and two-pixel steps, largest over
    directions and channels, on the denoised image (grain is not detail). It does not depend on
    how strong the edges are, only on how steep. A ratio of 0.5 scores 0, 0.9 scores 1.
    """
    def strongest_step(d):  # 99th percentile over pixels of the largest step over x, y and channels
        dx = np.abs(denoised[:, :, d:] - denoised[:, :, :-d])[:, :-d]  # (B, H-d, W-d, 3)
        dy = np.abs(denoised[:, d:] - denoised[:, :-d])[:, :, :-d]
        return np.percentile(np.maximum(dx, dy).max(axis=-1).reshape(len(denoised), -1), 99, axis=1)
    ratio = strongest_step(1) / np.maximum(strongest_step(2), 0.02)  # 0.02: a frame with no edges at all
    return np.clip((ratio - 0.5) / 0.4, 0, 1)


def noise_measure(images):
    """Clean pixels: little sensor grain.

    Grain is estimated from the high-pass residual of the Laplacian-like kernel
    [[1,-2,1],[-2,4,-2],[1,-2,1]] (it cancels flat areas and smooth light falloff; for white noise
    of std s its output has std 6s). The robust std 1.4826 * median(|residual|) / 6 ignores the
    few pixels on edges. Grain of std 0.04 (10 grey levels) is plain to any viewer and scores 0.
    """
    y = luminance(images)
    r = (y[:, :-2, :-2] - 2 * y[:, :-2, 1:-1] + y[:, :-2, 2:]
         - 2 * y[:, 1:-1, :-2] + 4 * y[:, 1:-1, 1:-1] - 2 * y[:, 1:-1, 2:]
         + y[:, 2:, :-2] - 2 * y[:, 2:, 1:-1] + y[:, 2:, 2:])
    sigma = 1.4826 * np.median(np.abs(r).reshape(len(images), -1), axis=1) / 6
    return np.clip(1.0 - sigma / 0.04, 0, 1)


def subject_and_clutter_measures(images):
    """Composition and an uncluttered background, both from the regions that stand out.

    The salient mask (see `salient_mask`) is split into connected regions. The subject is every
    region at least half as large as the largest (a group of equal objects is one subject); the
    smaller ones are distractions.

    composition: the subject is whole and well placed. Its bounding box should keep a margin of
    at least 1/16 of the frame (2 px at 32 px) from every edge (touching the edge means it is cut
    off), and it should cover at least 5% of the frame (less reads as a speck lost in the frame).
    Score = margin term * size term; no subject at all scores 0.
    clutter: 0.7 ** (number of distractions of at least 2 px): each stray object costs 30%.
    Returns (composition, clutter), each (B,).
    """
    Bn, H, W = images.shape[:3]
    mask = salient_mask(images)
    labels = connected_components(mask)
    area = np.bincount(labels[mask], minlength=mask.size)  # area of the region labelled by each index
    pixel_area = np.where(mask, area[np.maximum(labels, 0)], 0)  # (B, H, W) area of each pixel's region
    largest = pixel_area.reshape(Bn, -1).max(axis=1)
    subject = pixel_area >= np.maximum(0.5 * largest, 1)[:, None, None]
    small = mask & ~subject & (pixel_area >= 2)
    # count a distraction once, at its labelling pixel (the region's smallest index)
    is_root = labels == np.arange(mask.size).reshape(mask.shape)
    n_distractions = (small & is_root).sum(axis=(1, 2))
    clutter = 0.7 ** n_distractions

    ys, xs = np.mgrid[0:H, 0:W]
    has_subject = subject.any(axis=(1, 2))
    top = np.where(subject, ys, H).min(axis=(1, 2))
    bottom = np.where(subject, ys, -1).max(axis=(1, 2))
    left = np.where(subject, xs, W).min(axis=(1, 2))
    right = np.where(subject, xs, -1).max(axis=(1, 2))
    margin = np.minimum(np.minimum(top, left), np.minimum(H - 1 - bottom, W - 1 - right))
    margin_term = np.clip(margin / (min(H, W) / 16), 0, 1)
    size_term = np.clip(subject.mean(axis=(1, 2)) / 0.05, 0, 1)
    composition = np.where(has_subject, margin_term * size_term, 0.0)
    return composition, clutter


def photo_measurements(images):
    """Score each image on each guideline from its pixels alone.

    :param images: (B, H, W, 3) uint8 array.
    :return: {name: (B,) float array in [0, 1], 1 = good} for the names in MEASUREMENTS.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"photo_measurements wants (B, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    x = images.astype(np.float64) / 255.0
    denoised = median3x3(x)
    composition, clutter = subject_and_clutter_measures(x)
    return {"composition": composition, "exposure": exposure_measure(x, denoised),
            "contrast": contrast_measure(denoised), "sharpness": sharpness_measure(denoised),
            "noise": noise_measure(x), "clutter": clutter}


def appeal_score(images):
    """The automatic aesthetic score: the mean of the six measurements, (B, H, W, 3) uint8 -> (B,).

    Every guideline counts equally; the paper gives no weighting and neither do we.
    """
    m = photo_measurements(images)
    return np.mean([m[k] for k in MEASUREMENTS], axis=0)


# -----------------------------------------------------------------------------
# visual appeal: five raters who never see the prompt


class AppealJudge:
    """`n_raters` raters who each say which of two images is more visually appealing.

    Rater r sees image i as appeal_score(i) + e[r, i], with e drawn from N(0, noise^2) by the
    rater's own seeded generator: one rater's taste, which differs from the next rater's. A rater
    calls a Tie when the two perceived scores differ by less than `tie_margin`. The judge is never
    given the prompt, as the paper's appeal raters never see the caption.

    noise=0.03 makes two raters rarely disagree about images whose scores differ by more than
    0.1 (a tenth of the scale), and often about images closer than that. tie_margin=0.02 is a
    difference too small to see.
    """

    def __init__(self, n_raters=5, noise=0.03, tie_margin=0.02, seed=0):
        self.n_raters, self.noise, self.tie_margin, self.seed = n_raters, noise, tie_margin, seed

    def vote(self, images_a, images_b):
        """(B, H, W, 3) uint8 pairs -> (n_raters, B) int64 votes: A (+1), B (-1) or TIE (0).

        Deterministic: the same images and seed always give the same votes.
        """
        if len(images_a) != len(images_b):
            raise ValueError(f"AppealJudge.vote got {len(images_a)} A images and {len(images_b)} B images")
        score_a, score_b = appeal_score(images_a), appeal_score(images_b)
        taste = np.stack([np.random.default_rng([self.seed, r]).normal(0.0, self.noise, size=(2, len(score_a)))
                          for r in range(self.n_raters)])  # (n_raters, 2, B)
        diff = (score_a + taste[:, 0]) - (score_b + taste[:, 1])  # (n_raters, B)
        return np.where(np.abs(diff) < self.tie_margin, TIE, np.where(diff > 0, A, B)).astype(np.int64)


def judge_pairs(images_a, images_b, prompts, appeal_judge, faith_judge):
    """Both tasks' votes on the same pairs, ready for emu.evaluation.pairwise.summarize.

    :return: {"visual appeal": (5, B), "text faithfulness": (3, B)} votes in {+1, 0, -1},
             +1 = A. The appeal judge is not given the prompts.
    """
    return {"visual appeal": appeal_judge.vote(images_a, images_b),
            "text faithfulness": faithfulness_to_ternary(faith_judge.vote(images_a, images_b, prompts))}
