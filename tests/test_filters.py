"""Tests for emu/curation/filters.py: the text-in-image proxy, k-means and the per-cluster cap."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from emu.curation.filters import balance_clusters, kmeans, label_regions, text_word_count

WORDS = ("the quick brown fox jumps over lazy dog while seven small birds sing about rain and sun in old "
         "green hills").split()


def photo_like(size, seed=0):
    """A few large soft ellipses on a flat colour: big shapes and smooth shading, no text."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 200, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.15, 0.4, 2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.array(im.filter(ImageFilter.GaussianBlur(size / 25)))


def with_text(background, n_words, font_size=None, fill=(0, 0, 0)):
    """Write up to `n_words` words in lines across the image -> (image, number of words that fit)."""
    im = Image.fromarray(background)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default() if font_size is None else ImageFont.load_default(size=font_size)
    line_height = font.getbbox("Hg")[3] + 3
    x, y, drawn = 3, 2, 0
    for i in range(n_words):
        word = WORDS[i % len(WORDS)]
        if x + font.getlength(word) > im.width - 3:  # next line
            x, y = 3, y + line_height
        if y + line_height > im.height:
            break
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word + " ")
        drawn += 1
    return np.array(im), drawn


def plain(size, level=235):
    return np.full((size, size, 3), level, dtype=np.uint8)


def count(image):
    return int(text_word_count(image[None])[0])


# -----------------------------------------------------------------------------
# text_word_count


def test_label_regions_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.7):  # sparse specks, sprawling regions, one region filling the frame
        mask = rng.random((3, 17, 23)) < density
        expected = np.full(mask.shape, -1)
        for start in np.flatnonzero(mask):  # in flat order, so each region is labelled by its first pixel
            if expected.flat[start] >= 0:
                continue
            stack = [np.unravel_index(start, mask.shape)]
            expected[stack[0]] = start
            while stack:
                b, y, x = stack.pop()
                for yy in range(max(y - 1, 0), min(y + 2, mask.shape[1])):
                    for xx in range(max(x - 1, 0), min(x + 2, mask.shape[2])):
                        if mask[b, yy, xx] and expected[b, yy, xx] < 0:
                            expected[b, yy, xx] = start
                            stack.append((b, yy, xx))
        assert np.array_equal(label_regions(mask), expected)


def test_blank_images_have_no_words():
    for shape in ((8, 8), (64, 64), (128, 96), (256, 256)):
        for level in (0, 128, 255):
            assert count(np.full((*shape, 3), level, dtype=np.uint8)) == 0


def test_smooth_gradients_and_soft_shapes_have_at_most_one_word():
    for size in (64, 128, 256):
        ramp = np.linspace(0, 255, size).astype(np.uint8)
        gradient = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                             np.full((size, size), 90, np.uint8)], axis=-1)
        assert count(gradient) <= 1
        for seed in range(3):
            assert count(photo_like(size, seed)) <= 1


@pytest.mark.parametrize("size,font_size", [(128, None), (128, 14), (256, None), (256, 14), (256, 20)])
@pytest.mark.parametrize("on_photo", [False, True])
def test_text_covered_images_count_most_of_their_words(size, font_size, on_photo):
    background = photo_like(size, seed=1) if on_photo else plain(size)
    fill = (255, 255, 255) if on_photo else (0, 0, 0)  # light text on the photo, dark on the plain page
    image, drawn = with_text(background, 100, font_size, fill)
    n = count(image)
    assert drawn >= 20
    # the default 10 px font sets words so tightly that some neighbours merge (see the docstring)
    assert n >= 8 and 0.6 * drawn <= n <= 1.2 * drawn, (n, drawn)


@pytest.mark.parametrize("size,font_size", [(64, None), (128, None), (128, 14), (256, 14), (256, 20)])
def test_count_grows_with_the_words_drawn(size, font_size):
    few, _ = with_text(plain(size), 3, font_size)
    many, drawn = with_text(plain(size), 20, font_size)
    assert 1 <= count(few) <= 4
    assert count(few) < count(many)
    assert count(many) >= 0.5 * drawn  # 64 px holds only 8 words of the 10 px font, and finds 5 of them


def test_outlined_caption_counts_as_text():
    # meme-style overlay: white letters with a black outline on a photo; 7 words of two letters or more.
    # Fill plus outline is about as thick as the top-hat window, so some words are lost (see the docstring).
    for size in (128, 256):
        for seed in range(2, 6):
            im = Image.fromarray(photo_like(size, seed))
            draw, font = ImageDraw.Draw(im), ImageFont.load_default(size=size // 8)
            draw.text((4, 4), "WHEN YOU SEE", font=font, fill="white", stroke_width=2, stroke_fill="black")
            draw.text((4, size // 2), "the cat at 3 am", font=font, fill="white", stroke_width=2, stroke_fill="black")
            assert 4 <= count(np.array(im)) <= 8


def test_noise_and_grain_are_not_text():
    rng = np.random.default_rng(0)
    for size in (64, 128, 256):
        text, _ = with_text(plain(size), 100, None if size < 256 else 14)
        noises = [rng.integers(0, 256, (size, size, 3)),  # uniform noise
                  np.clip(128 + rng.normal(0, 20, (size, size, 3)), 0, 255),  # grey with grain
                  np.clip(128 + rng.normal(0, 50, (size, size, 3)), 0, 255),
                  np.clip(photo_like(size, seed=3) + rng.normal(0, 25, (size, size, 3)), 0, 255)]  # a grainy photo
        for noise in noises:
            noise = noise.astype(np.uint8)
            assert count(noise) <= 3
            assert count(noise) < count(text)
        texture = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
        assert count(np.array(texture)) <= 3  # blurred noise: foliage-like texture


def test_batch_shape_dtype_and_independence():
    images = np.stack([plain(64), with_text(plain(64), 20)[0], photo_like(64),
                       with_text(photo_like(64, 1), 20, fill=(255, 255, 255))[0],
                       np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    counts = text_word_count(images)
    assert counts.shape == (5,) and np.issubdtype(counts.dtype, np.integer)
    # each image is measured on its own: the batch does not change the counts
    assert [count(im) for im in images] == counts.tolist()
    assert counts[0] == 0 and counts[1] >= 5 and counts[3] >= 5


def test_rejects_wrong_input():
    with pytest.raises(ValueError):
        text_word_count(np.zeros((2, 64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        text_word_count(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        text_word_count(np.zeros((1, 4, 64, 3), dtype=np.uint8))


# -----------------------------------------------------------------------------
# kmeans and balance_clusters


def blobs(seed=0, per_group=30, groups=3, dim=16):
    """`groups` random directions, each repeated `per_group` times with tiny noise, shuffled -> (x, true group)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, dim, generator=g)
    truth = torch.arange(groups).repeat_interleave(per_group)
    x = centres[truth] + 1e-3 * torch.randn(len(truth), dim, generator=g)
    order = torch.randperm(len(truth), generator=g)
    return x[order], truth[order]


def same_partition(a, b):
    """Whether two labelings group the items the same way, whatever the label names."""
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_well_separated_blobs():
    for seed in range(5):
        x, truth = blobs(seed)
        centroids, assignments = kmeans(x, 3, seed=seed)
        assert centroids.shape == (3, 16) and assignments.shape == (90,) and assignments.dtype == torch.long
        assert same_partition(assignments, truth)
        assert torch.allclose(centroids.norm(dim=1), torch.ones(3), atol=1e-5)


def test_kmeans_is_deterministic_for_a_seed_and_ignores_row_length():
    x, _ = blobs(0, per_group=20, groups=5)
    c1, a1 = kmeans(x, 4, seed=7)
    c2, a2 = kmeans(x, 4, seed=7)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    # cosine geometry: scaling a row does not move it
    scale = torch.rand(len(x), 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    _, a3 = kmeans(x * scale, 4, seed=7)
    assert same_partition(a1, a3)


def test_kmeans_with_more_clusters_than_points():
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    centroids, assignments = kmeans(x, 8)
    assert torch.equal(assignments, torch.arange(5))
    assert torch.allclose(centroids, x / x.norm(dim=1, keepdim=True))


def test_kmeans_on_duplicates_gives_no_nans():
    x = torch.cat([torch.ones(20, 4), -torch.ones(20, 4), torch.zeros(2, 4)])  # two distinct directions and zero rows
    centroids, assignments = kmeans(x, 4, seed=0)
    assert torch.isfinite(centroids).all()
    assert len(set(assignments[:20].tolist())) == 1 and len(set(assignments[20:40].tolist())) == 1
    assert assignments[0] != assignments[20]


def test_balance_clusters_keeps_the_top_scores_of_each_cluster():
    assignments = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.3, 0.7, 0.2, 0.3])
    # cluster 0 = items 0, 1, 2, 6: keep 1 (0.9) and 0 (0.5, the lower index of the tie with 2)
    # cluster 1 = items 3, 4, 7: keep 4 and 7 (0.3 each); cluster 2 = item 5: smaller than the cap, kept
    keep = balance_clusters(assignments, scores, cap=2)
    assert keep.tolist() == [True, True, False, False, True, True, False, True]
    assert balance_clusters(assignments, scores, cap=1).tolist() == [False, True, False, False, True, True, False, False]
    assert balance_clusters(assignments.numpy(), scores.numpy(), cap=10).all()
    assert not balance_clusters(assignments, scores, cap=0).any()
