"""Image analysis for two of the curation funnel's automatic filters (emu_paper.txt, section 3.3).

The paper narrows billions of web images to about two thousand photogenic ones. Before any person
looks, automatic filters throw out what is plainly unsuitable. Two of them need code of their own:

    text_word_count    the paper's "OCR word count filter to eliminate images with too much
                       overlaying text". We have no OCR model, so this is a proxy: it counts
                       word-like groups of glyph-like marks without reading them.
    kmeans             plain k-means with k-means++ seeding, in cosine geometry, which groups images
                       by their embeddings. It stands in for the paper's "visual concept
                       classification", used "to balance images from various domains and categories"...
    balance_clusters   ...so that each group keeps only its `cap` best-scored members and no one kind
                       of picture crowds out the rest.

How the text proxy sees text. Printed text is made of thin strokes in one colour that differ
sharply from a locally plain background. A morphological top-hat finds exactly such thin marks.
The "opening" of an image (a local minimum filter, then a local maximum filter, over a small square
window) erases every bright structure too thin to hold the window, and leaves large shapes and
smooth shading as they were. So the image minus its opening (the white top-hat) is high only on thin
bright marks. The "closing" does the same for dark marks (closing minus image: the black top-hat).
Pixels where a top-hat is strong are "ink". The ink is split into connected regions, and a region
counts as a glyph when it has a glyph's size and shape, and two tests on its surroundings pass:
  - its ring is quiet: the pixels just around it are at the background level. This tells letters
    from grain and foliage, because around a speck of grain lies more grain;
  - it stands out from the background: its level differs from that of the plain pixels nearby. This
    rejects the light gaps between dark letters (and the dark gaps between light ones). To a top-hat
    those gaps are thin light marks too, hemmed in by the letters, but their level is the background's.
Glyphs that sit on one text line with letter-sized gaps between them are grouped into words. A word
needs at least two glyphs, so a stray mark is never a word.

Dark text and light text are counted separately, and an image scores the larger count, not the sum:
a caption outlined in the opposite colour (white letters edged in black) shows up in both.
"""
import numpy as np
import torch
import torch.nn.functional as F

from emu.evaluation.judges import luminance

# -----------------------------------------------------------------------------
# text: a proxy for an OCR word count

INK = 0.15  # a top-hat above this (about 38 grey levels) can be ink: overlay text is meant to be read
QUIET = 0.06  # a top-hat below this (about 15 grey levels) is background level: plain, no texture
MIN_GLYPH = 4  # glyphs shorter than this (in pixels) cannot be told from specks
QUIET_RING = 0.6  # at least this fraction of the one-pixel ring around a glyph's box is quiet
LETTER_GAP = 0.4  # letters of one word are at most this many x-heights apart; a word space is wider


def window_extreme(x, r, extreme):
    """Minimum or maximum (`extreme` = np.minimum or np.maximum) over each pixel's (2r+1)^2 square.

    The square's extreme is separable: the extreme along rows of the extreme along columns. Edges are
    replicated, so the frame's border does not look like a dark or a light mark.
    :param x: (B, H, W) array.
    """
    H, W = x.shape[1:]
    p = np.pad(x, [(0, 0), (r, r), (0, 0)], mode="edge")  # (B, H + 2r, W)
    x = p[:, :H]
    for i in range(1, 2 * r + 1):
        x = extreme(x, p[:, i:i + H])
    p = np.pad(x, [(0, 0), (0, 0), (r, r)], mode="edge")  # (B, H, W + 2r)
    x = p[:, :, :W]
    for i in range(1, 2 * r + 1):
        x = extreme(x, p[:, :, i:i + W])
    return x


def label_regions(mask):
    """Label 8-connected regions of a boolean (B, H, W) mask -> (B, H, W) int64 labels, -1 off.

    Like `emu.evaluation.judges.connected_components`, each region is labelled by the flat index of its first
    pixel, with two changes. Diagonal neighbours count, because a thin glyph such as "x" or "v" is held
    together only diagonally. And it works on the list of neighbouring on-pixel pairs rather than on
    whole images, as union-find by "hook and shortcut": every pixel points to a parent no larger than
    itself; each round, every root hooks onto the smallest root it touches across an edge, then every
    pixel jumps to its parent's parent until it points to a root. The rounds needed typically grow
    with the log of a region's size, so a sprawling region (grain, foliage) costs a few rounds
    instead of one per pixel of its length, as plain label propagation would.
    """
    on = np.flatnonzero(mask)
    index = np.full(mask.shape, -1)
    index.ravel()[on] = np.arange(len(on))  # (B, H, W) position of each on-pixel in `on`
    # each neighbouring pair once: right, down, down-right and down-left
    pairs = [(index[:, :, :-1], index[:, :, 1:]), (index[:, :-1], index[:, 1:]),
             (index[:, :-1, :-1], index[:, 1:, 1:]), (index[:, :-1, 1:], index[:, 1:, :-1])]
    a = np.concatenate([p[(p >= 0) & (q >= 0)] for p, q in pairs])  # (n_edges,)
    b = np.concatenate([q[(p >= 0) & (q >= 0)] for p, q in pairs])
    parent = np.arange(len(on))
    while True:
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            break
        np.minimum.at(parent, ra, rb)  # hook each root onto the smallest root across its edges
        np.minimum.at(parent, rb, ra)
        while True:  # shortcut: point every pixel at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    labels = np.full(mask.shape, -1)
    labels.ravel()[on] = on[parent]
    return labels


def glyph_boxes(ink, quiet, level, background):
    """Find the ink regions that look like glyphs -> their boxes.

    A region is a glyph when it is
      - between MIN_GLYPH pixels and half the image tall (smaller is a speck, larger is no overlay text);
      - at most three times as wide as tall (long thin runs are rules, borders, horizons, not letters);
      - not a solid blob: filling at most 70% of its box, unless it is a thin bar like "l" or "I";
      - on a quiet background: at least QUIET_RING of the one-pixel ring around its box is quiet.
        Grain and texture fail this, because around a speck of grain lies more grain. A letter's ring
        is background, or the gap to the next letter, which is background too;
      - off the background level: its mean level differs by at least INK from the mean level of the
        background pixels within one glyph height of its box. This rejects the thin light gaps between
        dark letters (and the thin dark gaps between light ones), which pass every other test: they
        look like thin marks only because the letters hem them in, and their level is the background's.
    :param ink: (B, H, W) bool, the candidate marks of one polarity.
    :param quiet: (B, H, W) bool, pixels at this polarity's background level (its top-hat is small).
    :param level: (B, H, W) float luminance, negated for dark marks so that ink is always above the background.
    :param background: (B, H, W) bool, plain pixels: quiet for both polarities.
    :return: (image index, top, bottom, left, right) int arrays of shape (n_glyphs,), bounds inclusive.
    """
    Bn, H, W = ink.shape
    labels = label_regions(ink)
    flat = np.flatnonzero(ink)
    _, region = np.unique(labels.ravel()[flat], return_inverse=True)  # (n_ink,) region of each ink pixel, 0..n-1
    n = region.max() + 1 if len(region) else 0
    b, ys, xs = np.unravel_index(flat, ink.shape)
    image = np.zeros(n, dtype=np.int64)
    image[region] = b
    top, bottom, left, right = np.full(n, H), np.full(n, -1), np.full(n, W), np.full(n, -1)
    np.minimum.at(top, region, ys)
    np.maximum.at(bottom, region, ys)
    np.minimum.at(left, region, xs)
    np.maximum.at(right, region, xs)
    area = np.bincount(region, minlength=n)
    height, width = bottom - top + 1, right - left + 1

    # Sums over boxes, read off summed-area tables in four lookups each. The ring is the box grown by one
    # pixel minus the box; the neighbourhood is the box grown by its height; both are clipped to the frame.
    def box_sums(values, *boxes):
        table = np.pad(values.cumsum(axis=1).cumsum(axis=2), [(0, 0), (1, 0), (1, 0)])  # (B, H+1, W+1)
        return [table[image, btm + 1, rgt + 1] - table[image, t, rgt + 1] - table[image, btm + 1, lft] + table[image, t, lft]
                for t, btm, lft, rgt in boxes]

    def grown(by):
        return np.maximum(top - by, 0), np.minimum(bottom + by, H - 1), np.maximum(left - by, 0), np.minimum(right + by, W - 1)
    box, ring_box, near = (top, bottom, left, right), grown(1), grown(height)
    ring_size = (ring_box[1] - ring_box[0] + 1) * (ring_box[3] - ring_box[2] + 1) - height * width
    quiet_in_ring_box, quiet_in_box = box_sums(quiet, ring_box, box)
    ring_quiet = quiet_in_ring_box - quiet_in_box
    n_background = box_sums(background, near)[0]
    background_level = box_sums(np.where(background, level, 0), near)[0] / np.maximum(n_background, 1)
    ink_level = np.bincount(region, weights=level.ravel()[flat], minlength=n) / np.maximum(area, 1)

    thin_bar = 3 * width <= height
    keep = ((height >= MIN_GLYPH) & (2 * height <= H) & (width <= 3 * height)
            & ((area <= 0.7 * height * width) | thin_bar)
            & (ring_size > 0) & (ring_quiet >= QUIET_RING * ring_size)
            & (n_background > 0) & (ink_level - background_level >= INK))
    return image[keep], top[keep], bottom[keep], left[keep], right[keep]


def linked_groups(linked):
    """Connected components of a graph given by its symmetric (n, n) bool adjacency -> (n,) group ids.

    Every node repeatedly takes the smallest id among the nodes it is linked to (itself included).
    """
    n = len(linked)
    group = np.arange(n)
    while True:
        new = np.where(linked | np.eye(n, dtype=bool), group[None, :], n).min(axis=1)
        if np.array_equal(new, group):
            return group
        group = new


def count_words(top, bottom, left, right):
    """Group one image's glyph boxes into text lines, then into words; count words of at least two glyphs.

    Two glyphs are neighbours on a line when their vertical extents overlap by at least half the shorter
    one, neither is more than three times as tall as the other (a capital or an "l" is about twice an
    "a"), and the horizontal gap between their boxes is at most 1.5 times the shorter height. Chains of
    neighbours make a line segment. The segment's x-height is the median height of its glyphs (most
    letters are lowercase), and it breaks into words wherever the gap exceeds LETTER_GAP x-heights:
    the space between words is wider than the one between letters.
    """
    n = len(top)
    if n < 2:
        return 0
    height = bottom - top + 1
    shorter = np.minimum(height[:, None], height[None, :])  # (n, n)
    overlap = np.minimum(bottom[:, None], bottom[None, :]) - np.maximum(top[:, None], top[None, :]) + 1
    gap = np.maximum(left[:, None], left[None, :]) - np.minimum(right[:, None], right[None, :]) - 1  # < 0: overlap
    neighbours = ((2 * overlap >= shorter) & (3 * shorter >= np.maximum(height[:, None], height[None, :]))
                  & (gap <= 1.5 * shorter))  # (n, n), symmetric
    line = linked_groups(neighbours)
    x_height = np.zeros(n)
    for g in np.unique(line):
        x_height[line == g] = np.median(height[line == g])
    word = linked_groups(neighbours & (gap <= LETTER_GAP * x_height[:, None]))
    return int((np.bincount(word) >= 2).sum())


def text_word_count(images):
    """Estimate how many words of text each image carries: (B, H, W, 3) uint8 -> (B,) int64.

    What it measures: the number of groups of at least two glyph-like marks that sit side by side on
    a line, with letter-sized gaps between them, as the letters of a word do (the module docstring says
    how the marks are found). Dark and light text are counted separately, and the larger count is
    returned. It reads nothing, and its limits follow from that:
      - text must contrast with its background by about 40 grey levels (INK), with glyphs at least
        4 px tall and strokes thinner than the top-hat window (5 px, or about 1/32 of the shorter side
        of images larger than 160 px). Bolder or larger lettering (a poster headline) is missed;
      - glyphs whose surroundings are not plain (text printed straight onto foliage or grain) are missed;
      - at the smallest font sizes (about 10 px) a word space is hardly wider than a letter gap, so
        neighbouring words merge and the count falls short: about 80% of the words for Pillow's
        default 10 px font, against 100% +- 8% at 14 and 20 px;
      - one-letter words ("a", "I"), and words whose letters touch into one mark, are not counted;
      - an image with both dark and light text counts only the more numerous kind;
      - text with an outline in the opposite colour (meme captions) counts through its fill or its
        outline, whichever stands out from the photo, but fill and outline together must stay thinner
        than the window, so it is often undercounted;
      - a regular fine pattern on plain ground (rows of small dots, a barcode) can pass for text.
    The count is meant for ranking and thresholding images by how much text they show, as the paper's
    filter does.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or min(images.shape[1:3]) < 8:
        raise ValueError(f"text_word_count wants (B, H, W, 3) uint8 images at least 8 px, got {images.dtype} {images.shape}")
    Bn, H, W = images.shape[:3]
    y = luminance(images.astype(np.float32) / 255).astype(np.float32)  # (B, H, W)
    r = max(2, round(min(H, W) / 64))  # window 2r+1: 5 px up to 160 px images, then growing with the image
    bright = y - window_extreme(window_extreme(y, r, np.minimum), r, np.maximum)  # white top-hat: thin light marks
    dark = window_extreme(window_extreme(y, r, np.maximum), r, np.minimum) - y  # black top-hat: thin dark marks
    background = (bright < QUIET) & (dark < QUIET)  # plain pixels, neither a light nor a dark mark
    counts = np.zeros((2, Bn), dtype=np.int64)
    for polarity, (tophat, level) in enumerate(((bright, y), (dark, -y))):
        # ink: strong, and at least half as strong as the strongest mark nearby, so that the grey antialiased
        # pixels between two letters do not join them
        ink = tophat > np.maximum(INK, 0.5 * window_extreme(tophat, r, np.maximum))
        image, top, bottom, left, right = glyph_boxes(ink, tophat < QUIET, level, background)
        for i in np.unique(image):
            on = image == i
            counts[polarity, i] = count_words(top[on], bottom[on], left[on], right[on])
    return counts.max(axis=0)


# -----------------------------------------------------------------------------
# balance: k-means on embeddings, then a cap on each cluster


def kmeans(x, k, seed=0, iters=50):
    """Cluster the rows of x by direction: (N, D) float tensor -> (centroids (k, D), assignments (N,) long).

    Cosine geometry: rows are normalised to unit length first (an all-zero row stays zero), similarity
    is the dot product, and a centroid is the normalised mean of its members (spherical k-means).
    Image embeddings such as CLIP's are compared by angle, not length, which is why.

    Seeding is k-means++: the first centroid is a random point, and each next one is a point drawn
    with probability proportional to its squared distance to the nearest centroid chosen so far
    (2 - 2 cos for unit vectors), so the seeds spread over the data and do not fall into one group.
    Then Lloyd's iterations alternate between assigning each point to its most similar centroid (ties
    go to the lower index) and moving each centroid to its members' mean direction. They stop when no
    assignment changes, or after `iters` rounds. The same x, k and seed always give the same result.

    A cluster left empty is re-seeded at the point farthest from its own centroid, so k clusters stay
    in use. When every point already sits on its centroid (the data have fewer than k distinct
    directions, as with duplicates), there is nothing to split: the cluster stays empty and keeps its
    old centroid, which never produces a NaN. With k >= N every point is its own cluster, and the
    centroids are the N normalised points: (N, D), not (k, D).
    """
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    x = F.normalize(x.detach().float(), dim=1)  # (N, D) unit rows
    N = len(x)
    if k >= N:
        return x.clone(), torch.arange(N, device=x.device)
    g = torch.Generator().manual_seed(seed)

    # k-means++ seeding
    chosen = [int(torch.randint(N, (1,), generator=g))]
    nearest = x @ x[chosen[0]]  # (N,) similarity of each point to its nearest centroid so far
    for _ in range(1, k):
        d2 = (2 - 2 * nearest).clamp_min(0).double().cpu()  # squared distances; sampled on the CPU generator
        if d2.sum() == 0:  # every point already coincides with a centroid: any choice is as good
            d2 = torch.ones(N, dtype=torch.float64)
        chosen.append(int(torch.multinomial(d2, 1, generator=g)))
        nearest = torch.maximum(nearest, x @ x[chosen[-1]])
    centroids = x[chosen].clone()  # (k, D)

    # Lloyd's iterations
    assignments = (x @ centroids.T).argmax(dim=1)  # (N,)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)  # (k, D)
        counts = torch.bincount(assignments, minlength=k)
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            own = (x * centroids[assignments]).sum(dim=1)  # (N,) similarity of each point to its centroid
            farthest = torch.argsort(own, stable=True)[:len(empty)]
            movable = own[farthest] < 1 - 1e-6  # a point on its own centroid would only make a duplicate
            centroids[empty[movable]] = x[farthest[movable]]
        new = (x @ centroids.T).argmax(dim=1)
        if torch.equal(new, assignments):
            break
        assignments = new
    return centroids, assignments


def balance_clusters(assignments, scores, cap):
    """Keep each cluster's `cap` best-scored items: (N,) cluster ids, (N,) scores -> (N,) bool mask.

    Within a cluster, items rank by score, highest first, and equal scores rank by index, lower first.
    The first `cap` of each cluster are kept, so a cluster of `cap` items or fewer keeps them all.
    Accepts tensors or arrays; returns a bool tensor.
    """
    assignments = torch.as_tensor(assignments).long().cpu()
    scores = torch.as_tensor(scores).cpu()
    N = len(assignments)
    # Sorting by score (descending), then by cluster, with stable sorts, lists each cluster's items
    # together, by score, ties in index order (stability keeps the earlier, lower index first).
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    order = order[torch.sort(assignments[order], stable=True).indices]
    sizes = torch.bincount(assignments)
    start = torch.cumsum(sizes, dim=0) - sizes  # (n_clusters,) where each cluster begins in `order`
    rank = torch.arange(N) - start[assignments[order]]  # (N,) rank within its cluster, of the item order[i]
    keep = torch.zeros(N, dtype=torch.bool)
    keep[order] = rank < cap
    return keep
