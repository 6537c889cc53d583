"""Aspect-ratio buckets: training on images of several shapes without cropping them all square.

A model trained on centre-cropped squares draws squares well and anything else badly: asked for a
16:9 picture, it has never seen one. SDXL and Kandinsky 2.2 train on buckets instead. Each image goes to
the bucket whose aspect ratio is nearest its own; a bucket is one size (width x height) with about as
many pixels as the square training size, each side a multiple of what the model needs (the
autoencoder's downsampling times the U-Net's). Every batch is drawn from one bucket, so its images
stack into one tensor, and the batches of all buckets are interleaved in a seeded order, so training
sees every shape throughout an epoch.

The ratios are the five the Kandinsky demo offers (kandinsky_paper.txt, "Demo System"), width:height.

BucketBatches keeps EpochBatches' promise (emu/datasets/folders.py): epoch e's batches depend only on
(seed, e), so a run resumed at step s reads exactly the batches an unbroken run reads from step s on,
and the checkpoint needs no more than the step. Every image is seen once an epoch: a bucket's last
batch, when its images do not fill it, is completed with the first images of that bucket's order, the
only ones seen twice.
"""
import math
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from emu import EmuError
from emu.datasets.folders import BadImage, Skipped, crop_tensor, open_rgb

RATIOS = (("9:16", 9, 16), ("2:3", 2, 3), ("1:1", 1, 1), ("3:2", 3, 2), ("16:9", 16, 9))


@dataclass(frozen=True)
class Bucket:
    name: str  # the ratio, "16:9"
    width: int
    height: int


def make_buckets(image_size, multiple, ratios=RATIOS):
    """One Bucket per (name, width ratio, height ratio), with about image_size**2 pixels and each side
    a multiple of `multiple` (the nearest one, at least `multiple`). At small sizes two ratios can come
    out the same size (3:2 and 16:9 are both 40 x 24 at 32 pixels in steps of 8)."""
    if image_size % multiple:
        raise EmuError(f"image size {image_size} is not a multiple of {multiple}")
    snap = lambda side: max(multiple, round(side / multiple) * multiple)
    return [Bucket(name, snap(image_size * math.sqrt(w / h)), snap(image_size * math.sqrt(h / w))) for name, w, h in ratios]


def nearest_bucket(width, height, buckets):
    """The index of the bucket whose aspect ratio is nearest width / height, measured in log ratio
    (so 2:1 is as far from 1:1 as 1:2 is)."""
    return min(range(len(buckets)), key=lambda i: abs(math.log(width / height) - math.log(buckets[i].width / buckets[i].height)))


def fit_to_bucket(im, buckets):
    """An RGB PIL image resized and centre-cropped (crop_tensor) to the bucket nearest its aspect ratio:
    (3, height, width) in [-1, 1]."""
    bucket = buckets[nearest_bucket(*im.size, buckets)]
    return crop_tensor(im, bucket.width, bucket.height)


def bucket_by_name(name, buckets):
    """The bucket called `name` ("16:9"), or a one-line EmuError listing the others."""
    for bucket in buckets:
        if bucket.name == name:
            return bucket
    raise EmuError(f"aspect ratio {name!r} is not one of {', '.join(b.name for b in buckets)}")


class BucketedFolder(torch.utils.data.Dataset):
    """An ImageCaptionFolder whose every image is resized and centre-cropped to its bucket's size.

    The images' sizes are read from their headers once, when it is built (no pixels decoded); an image
    whose header cannot be read goes to the square bucket and is reported as a Skipped item when it is
    loaded, as ImageCaptionFolder reports it. `bucket_of[i]` is the index of image i's bucket.
    """

    def __init__(self, folder, buckets):
        self.folder, self.buckets = folder, buckets
        square = nearest_bucket(1, 1, buckets)
        self.bucket_of = []
        for path in folder.files:
            try:
                with Image.open(path) as im:
                    width, height = im.size
                self.bucket_of.append(nearest_bucket(width, height, buckets) if width and height else square)
            except (OSError, UnidentifiedImageError):
                self.bucket_of.append(square)

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        folder = self.folder
        if folder.captions[i] is None:  # its caption or metadata is bad (skip_bad)
            return folder.skipped[i]
        bucket = self.buckets[self.bucket_of[i]]
        try:
            return crop_tensor(open_rgb(folder.files[i]), bucket.width, bucket.height), folder.captions[i]
        except BadImage as e:
            if not folder.skip_bad:
                raise
            return Skipped(e.path, e.reason)


class BucketBatches(torch.utils.data.Sampler):
    """Batches of indices, each from one bucket, in a seeded order per epoch, from any step on.

    `bucket_of[i]` is example i's bucket. Epoch e shuffles each bucket's examples and the list of all
    buckets' batches with a generator seeded by (seed, e). In a world of several ranks `batch_size` is
    the global batch and rank r reads every world_size-th index of it, from the r-th on, as EpochBatches does.
    """

    def __init__(self, bucket_of, batch_size, seed, start_step=0, rank=0, world_size=1):
        if batch_size % world_size:
            raise EmuError(f"batch size {batch_size} does not split over {world_size} ranks")
        if not len(bucket_of):
            raise EmuError("no examples to make batches of")
        self.bucket_of, self.batch_size, self.seed, self.start_step = list(bucket_of), batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.members = {}  # bucket -> its examples, in index order
        for i, b in enumerate(self.bucket_of):
            self.members.setdefault(b, []).append(i)
        self.per_epoch = sum(-(-len(m) // batch_size) for m in self.members.values())

    def epoch(self, e):
        """Epoch e's global batches: [(bucket, [indices])], every example in at least one."""
        gen = torch.Generator().manual_seed(self.seed * 100003 + e)
        batches = []
        for b in sorted(self.members):
            members = self.members[b]
            order = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                while len(batch) < self.batch_size:  # the last one, completed from the start of the same order
                    batch += order[:self.batch_size - len(batch)]
                batches.append((b, batch))
        return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]

    def __iter__(self):
        step = self.start_step
        epoch, batches = None, None
        while True:
            e, i = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, batches = e, self.epoch(e)
            yield batches[i][1][self.rank::self.world_size]
            step += 1
