"""Aspect-ratio buckets (emu/datasets/buckets.py): sizes, the nearest bucket, batches of one shape, every
image once an epoch, exact resume from any step, and ranks that split each batch."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from emu import EmuError
from emu.datasets.buckets import (RATIOS, BucketBatches, BucketedFolder, bucket_by_name, make_buckets,
                                  nearest_bucket)
from emu.datasets.folders import ImageCaptionFolder, Skipped, collate, crop_tensor, square_tensor


def test_buckets_have_their_ratio_about_the_square_area_and_sides_the_model_can_halve():
    for size, multiple in [(32, 8), (64, 32), (512, 64), (1024, 64)]:
        buckets = make_buckets(size, multiple)
        assert [b.name for b in buckets] == [name for name, _, _ in RATIOS]
        assert bucket_by_name("1:1", buckets).width == bucket_by_name("1:1", buckets).height == size
        for bucket, (_, w, h) in zip(buckets, RATIOS):
            assert bucket.width % multiple == 0 and bucket.height % multiple == 0
            if size >= 8 * multiple:  # fine enough steps to land near the ratio and the area
                assert abs(bucket.width / bucket.height - w / h) < 0.1 * w / h, bucket
                assert abs(bucket.width * bucket.height / size ** 2 - 1) < 0.1, bucket
    assert make_buckets(1024, 64)[-1] == make_buckets(1024, 64)[-1].__class__("16:9", 1344, 768)  # SDXL's own bucket
    toy = make_buckets(32, 8)  # too coarse to tell 3:2 from 16:9: both are 40 x 24, and an image goes to the first
    assert bucket_by_name("3:2", toy) == bucket_by_name("16:9", toy).__class__("3:2", 40, 24)
    assert toy[nearest_bucket(16, 9, toy)].name == "3:2"
    with pytest.raises(EmuError, match="not one of 9:16, 2:3, 1:1, 3:2, 16:9"):
        bucket_by_name("4:3", make_buckets(64, 8))
    with pytest.raises(EmuError, match="not a multiple of 8"):
        make_buckets(60, 8)


def test_each_image_goes_to_the_nearest_ratio_in_log_ratio():
    buckets = make_buckets(64, 8)
    name = lambda w, h: buckets[nearest_bucket(w, h, buckets)].name
    assert [name(1920, 1080), name(1080, 1920), name(640, 640), name(600, 400), name(400, 600)] == \
           ["16:9", "9:16", "1:1", "3:2", "2:3"]
    assert name(1000, 10) == "16:9" and name(10, 1000) == "9:16"  # the extremes go to the widest and tallest
    wide = bucket_by_name("3:2", buckets)  # 80 x 56 at this size: a ratio of 1.43, the nearest multiples of 8
    middle = 1000 * (wide.width / wide.height) ** 0.5  # between 1:1 and it, in log ratio
    assert name(middle - 1, 1000) == "1:1" and name(middle + 1, 1000) == "3:2"


def test_a_crop_keeps_the_aspect_and_the_centre_and_a_square_crop_is_what_it_was():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8))  # 160 x 90: 16:9
    assert crop_tensor(im, 64, 36).shape == (3, 36, 64)
    assert torch.equal(crop_tensor(im, 160, 90), torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    tall = crop_tensor(im, 36, 64)  # a 9:16 crop of a 16:9 image: the middle of it, scaled up to cover
    assert tall.shape == (3, 64, 36)
    assert torch.equal(square_tensor(im, 48), crop_tensor(im, 48, 48))


def sizes_folder(tmp_path, sizes):
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 7 * i, dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
        (tmp_path / f"{i:03d}.txt").write_text(f"picture {i}")
    return ImageCaptionFolder(str(tmp_path), 32, skip_bad=True)


SHAPES = [(64, 36), (36, 64), (48, 48), (60, 40), (40, 60)]


def test_every_batch_has_one_shape_and_every_image_is_seen_once_an_epoch(tmp_path):
    sizes = [SHAPES[i % 5] for i in range(23)] + [SHAPES[0]] * 6  # uneven buckets: 11, 5, 5, 4, 4
    data = BucketedFolder(sizes_folder(tmp_path, sizes), make_buckets(64, 8))
    assert [data.buckets[b].name for b in data.bucket_of[:5]] == ["16:9", "9:16", "1:1", "3:2", "2:3"]
    sampler = BucketBatches(data.bucket_of, batch_size=4, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    batches = list(itertools.islice(loader, sampler.per_epoch))
    assert sampler.per_epoch == 3 + 2 + 2 + 1 + 1
    shapes = {tuple(images.shape[2:]) for images, _ in batches}
    assert shapes == {(48, 88), (88, 48), (64, 64), (56, 80), (80, 56)}  # (height, width) of each bucket
    seen = [int(c.split()[1]) for _, captions in batches for c in captions]
    assert sorted(set(seen)) == list(range(len(sizes)))  # every image, in one epoch
    counts = np.bincount(seen)
    assert counts.max() == 2 and (counts == 2).sum() == len(seen) - len(sizes)  # repeats only to fill last batches
    assert sampler.epoch(0) != sampler.epoch(1)  # a new order each epoch


def test_a_resumed_sampler_reads_the_batches_an_unbroken_one_reads_and_ranks_split_them():
    bucket_of = [i % 3 for i in range(20)] + [4] * 7
    straight = list(itertools.islice(iter(BucketBatches(bucket_of, 4, seed=1)), 25))
    for start in (0, 3, 9, 17):  # within the first epoch, at its end, within the third
        resumed = list(itertools.islice(iter(BucketBatches(bucket_of, 4, seed=1, start_step=start)), 25 - start))
        assert resumed == straight[start:]
    for batch in straight:
        assert len({bucket_of[i] for i in batch}) == 1
    ranks = [list(itertools.islice(iter(BucketBatches(bucket_of, 4, seed=1, rank=r, world_size=2)), 25)) for r in (0, 1)]
    for whole, a, b in zip(straight, *ranks):
        assert len(a) == len(b) == 2 and sorted(a + b) == sorted(whole)
    with pytest.raises(EmuError, match="does not split over 3 ranks"):
        BucketBatches(bucket_of, 4, seed=1, world_size=3)


def test_an_unreadable_image_goes_to_the_square_bucket_and_is_skipped_when_loaded(tmp_path):
    folder = sizes_folder(tmp_path, SHAPES)
    (tmp_path / "001.png").write_bytes(b"not a png")
    data = BucketedFolder(ImageCaptionFolder(str(tmp_path), 64, skip_bad=True), make_buckets(64, 8))
    assert data.buckets[data.bucket_of[1]].name == "1:1" and len(folder) == 5
    assert isinstance(data[1], Skipped) and "001.png" in data[1].path
    images, captions = data[0]
    assert images.shape == (3, 48, 88) and captions == "picture 0"
