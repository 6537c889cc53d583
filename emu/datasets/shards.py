"""Image-text tar shards: the WebDataset / img2dataset layout, read in memory with `tarfile`.

A shard is a tar file whose members come in groups that share a key: `key.jpg` (or .png, .webp),
`key.txt` (the caption) and optionally `key.json` (metadata). Training on billions of web images
reads them as streams, without unpacking them to disk.

A shard is data from strangers, so reading one does nothing but read bytes:
- nothing is extracted: a member's bytes go to the image decoder, the caption reader or the JSON
  parser, in memory, and nowhere else;
- only regular files are read. A symlink, hardlink, device or fifo member, a name that is absolute
  or climbs out with `..`, and a member over MAX_MEMBER_BYTES make its sample skipped with a reason;
- members of other types (`.pth`, `.pkl`, `.npy`, ...) are never opened, so nothing is unpickled;
- a truncated or corrupt shard ends there: the samples read so far count, the rest is one skipped
  entry naming the shard.

ShardDataset splits the shards of an epoch over ranks and data-loader workers, so that every sample
is read exactly once per epoch, shuffles within each stream through a buffer, and can start each
stream at a saved position, so that a resumed run reads what an unbroken run would have.
BucketedShards makes each stream's samples into batches of one aspect-ratio bucket each, and resumes
as exactly.
"""
import posixpath
import random
import tarfile
from pathlib import Path
from typing import NamedTuple

import torch

from emu import EmuError
from emu.datasets.buckets import fit_to_bucket
from emu.datasets.folders import (BadFile, Skipped, caption_from_metadata, collate, decode_caption, decode_metadata,
                                  open_rgb, square_tensor)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 32 * 2**20  # larger than any image a text-to-image set keeps; a caption is far smaller


class RawSample(NamedTuple):
    """One key's members, still bytes. `name` is "shard.tar:key", for messages; `problem` is set when a
    member made the sample unusable (an unsafe name, a link, an oversized member)."""
    name: str
    image: bytes = None
    caption: bytes = None
    metadata: bytes = None
    problem: str = None


def _member_problem(member):
    """Why a tar member must not be read, or None."""
    parts = member.name.split("/")
    if member.name.startswith("/") or ".." in parts or "\\" in member.name or "\0" in member.name:
        return "unsafe member name"
    if member.issym() or member.islnk():
        return "member is a link"
    if not member.isreg():
        return "member is not a regular file"
    if member.size > MAX_MEMBER_BYTES:
        return "member too large"
    return None


def read_shard(path):
    """The samples of one tar shard as RawSamples, in member order (members of a key are adjacent).

    Never raises for a bad shard: a shard that cannot be opened, or breaks off, ends with a RawSample
    whose name is the shard and whose problem says so.
    """
    try:
        tar = tarfile.open(path, mode="r|*")  # a stream: members are read in order, once
    except (OSError, tarfile.TarError) as e:
        yield RawSample(str(path), problem=f"not a readable tar shard ({type(e).__name__})")
        return
    current, parts = None, {}
    try:
        with tar:
            for member in tar:
                if member.isdir():
                    continue
                directory, base = posixpath.split(member.name)
                key = posixpath.join(directory, base.split(".", 1)[0])
                extension = base.split(".", 1)[1].lower() if "." in base else ""
                if key != current:
                    if current is not None:
                        yield RawSample(f"{path}:{current}", **parts)
                    current, parts = key, {}
                problem = _member_problem(member)
                if problem:
                    parts["problem"] = parts.get("problem") or problem
                elif extension in IMAGE_EXTENSIONS or extension in ("txt", "json"):
                    field = {"txt": "caption", "json": "metadata"}.get(extension, "image")
                    parts[field] = tar.extractfile(member).read()  # regular files only, bounded in size
                # other members (.pth, .pkl, .npy, ...) are never opened
    except (OSError, EOFError, tarfile.TarError) as e:
        yield RawSample(str(path), problem=f"truncated or corrupt shard ({type(e).__name__})")
        return
    if current is not None:
        yield RawSample(f"{path}:{current}", **parts)


def decode_sample(raw, image_size, caption_field=None, min_size=0, max_aspect=0.0, buckets=None):
    """A RawSample -> (image (3, S, S) in [-1, 1], caption), or Skipped(name, reason).

    :param caption_field: take the caption from this metadata field instead of key.txt.
    :param min_size: skip images whose shorter side is below this many pixels (0: no limit).
    :param max_aspect: skip images whose long side exceeds max_aspect times the short one (0: no limit).
    :param buckets: aspect buckets (emu.datasets.buckets.make_buckets): the image is cropped to the size of
        the one nearest its aspect ratio, (3, its height, its width), instead of to a square of image_size.
    """
    if raw.problem:
        return Skipped(raw.name, raw.problem)
    if raw.image is None:
        return Skipped(raw.name, "no image member")
    try:
        meta = {} if raw.metadata is None else decode_metadata(raw.metadata, raw.name + ".json")
        if caption_field:
            caption = caption_from_metadata(meta, caption_field, raw.name + ".json")
        elif raw.caption is None:
            return Skipped(raw.name, "caption file not found")
        else:
            caption = decode_caption(raw.caption, raw.name + ".txt")
        im = open_rgb(raw.name, data=raw.image)  # decoded once, for the filters and the tensor
        w, h = im.size
        if min(w, h) < min_size:
            return Skipped(raw.name, "image too small")
        if max_aspect and max(w, h) > max_aspect * min(w, h):
            return Skipped(raw.name, "extreme aspect ratio")
        return (fit_to_bucket(im, buckets) if buckets else square_tensor(im, image_size)), caption
    except BadFile as e:
        return Skipped(raw.name, e.reason)


def shuffled(items, buffer_size, rng):
    """Items in a random order drawn through a buffer of `buffer_size`: each new item takes the place
    of a random one, which goes out. Memory stays at the buffer; an item can move far forward but at
    most buffer_size places back."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(torch.utils.data.IterableDataset):
    """The samples of a list of tar shards, one epoch per iteration, split over ranks and workers.

    Epoch e orders the shards by a permutation seeded with (seed, e) and deals them to
    world_size x num_workers streams; rank r's loader worker w reads stream r * num_workers + w.
    Every sample of the epoch is read by exactly one stream. Each stream shuffles its samples through
    a buffer seeded with (seed, e, stream) and yields (stream, read, item) triples, item being
    (image, caption) or Skipped and read the number of items the stream has given with this one:
    collate_stream makes them batches that remember where their stream stands.

    `exclude` names samples ("shard.tar:key") that are never read: a held-out set (first_samples).

    `position` maps a stream to where it stands this epoch, how many of its items were already
    consumed (BucketedShards keeps its own form of it here): a resumed run sets it (and `epoch`) from
    its checkpoint and each stream starts past them. `rotation` turns which worker reads which
    stream, so that a resumed loader's round robin over its workers continues at the stream the
    stopped run would have read next.
    """

    def __init__(self, shards, image_size, caption_field=None, seed=0, shuffle_buffer=1000, rank=0,
                 world_size=1, min_size=0, max_aspect=0.0, exclude=()):
        super().__init__()
        self.shards = sorted(str(s) for s in shards)
        self.image_size, self.caption_field = image_size, caption_field
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.min_size, self.max_aspect = min_size, max_aspect
        self.exclude = frozenset(exclude)
        self.epoch, self.position, self.rotation = 0, {}, 0

    def stream_shards(self, stream, num_streams):
        """The shards stream `stream` of `num_streams` reads in this epoch, in order."""
        order = list(self.shards)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order[stream::num_streams]

    def stream(self):
        """(stream, its RawSamples) for the loader worker that calls it: the stream's index, and its
        samples of this epoch in their shuffled order, read lazily."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = self.rank * workers + (worker + self.rotation) % workers
        raw = (sample for shard in self.stream_shards(stream, self.world_size * workers) for sample in read_shard(shard)
               if sample.name not in self.exclude)
        rng = random.Random(f"{self.seed}-{self.epoch}-{stream}")
        return stream, shuffled(raw, self.shuffle_buffer, rng)

    def decode(self, raw, buckets=None):
        """decode_sample with this set's size, caption field and filters."""
        return decode_sample(raw, self.image_size, self.caption_field, self.min_size, self.max_aspect, buckets)

    def __iter__(self):
        stream, samples = self.stream()
        start = self.position.get(stream, 0)
        for i, sample in enumerate(samples):
            if i >= start:  # the samples before `start` were trained on before a resume: read, not decoded
                yield stream, i + 1, self.decode(sample)


class BucketedShards(torch.utils.data.IterableDataset):
    """A ShardDataset's streams as batches of one aspect-ratio bucket each (emu/datasets/buckets.py), as
    SDXL and Kandinsky 2.2 train on web-scale sets: every image keeps about its own aspect ratio.

    Each stream crops every usable sample to the bucket nearest its aspect ratio and puts it in that
    bucket's buffer (one buffer per bucket size); a buffer that holds `batch_size` samples becomes a
    batch. When the stream ends (its share of the epoch is read), its partly filled buffers become
    batches as they are, smaller ones, in bucket order: every usable sample is trained on exactly once
    an epoch. (Filling them up would repeat samples that the stream has already let go.) Unusable
    samples travel in the `.skipped` of the stream's next batch, or of an empty batch at its end.

    Iterating gives, per batch, a list of (stream, where, item) triples that collate_stream makes a
    Batch (a DataLoader with batch_size=None). `where` is where the stream stands after the batch:
    {"read": how many items of its shuffled order were read, "waiting": the places in that order of the
    samples read but still in a buffer}. A checkpoint keeps it as the ShardDataset's `position` of the
    stream. A resumed stream reads its first `read` items again without decoding them, except the
    waiting ones, which go back into their buffers in the order they were first read: the buffers are
    what they were, and the stream goes on to give the batches an unbroken one gives. Fewer than
    batch_size samples wait per bucket, so the position stays small.
    """

    def __init__(self, data, buckets, batch_size):
        super().__init__()
        self.data, self.buckets, self.batch_size = data, buckets, batch_size

    def __iter__(self):
        stream, samples = self.data.stream()
        where = self.data.position.get(stream, {"read": 0, "waiting": []})
        start, waiting = where["read"], set(where["waiting"])
        buffers = {(b.height, b.width): [] for b in self.buckets}  # bucket size -> [(place, (image, caption))]
        skipped, read = [], 0  # the unusable samples not yet reported; the items read
        for i, raw in enumerate(samples):
            read = i + 1
            if i < start and i not in waiting:
                continue  # trained on before a resume: read, not decoded
            item = self.data.decode(raw, self.buckets)
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            buffer = buffers[tuple(item[0].shape[1:])]
            buffer.append((i, item))
            if len(buffer) == self.batch_size:  # never while the waiting samples are put back: each was short of it
                yield self.batch(stream, read, buffers, buffer, skipped)
        for buffer in buffers.values():  # the stream's end: what is left, bucket by bucket
            if buffer:
                yield self.batch(stream, read, buffers, buffer, skipped)
        if skipped:
            yield self.batch(stream, read, buffers, [], skipped)

    @staticmethod
    def batch(stream, read, buffers, buffer, skipped):
        """The (stream, where, item) triples of a batch of `buffer`'s samples, after the unusable ones met
        since the stream's last batch; empties both."""
        items = skipped + [item for _, item in buffer]
        buffer.clear()
        skipped.clear()
        where = {"read": read, "waiting": sorted(i for rest in buffers.values() for i, _ in rest)}
        return [(stream, where, item) for item in items]


def first_samples(shards, n, image_size, caption_field=None):
    """The first n usable samples of the shards (in sorted order, unshuffled), to hold out:
    (images (n, 3, S, S), captions, names); ShardDataset(exclude=names) then never trains on them."""
    images, captions, names = [], [], []
    for shard in sorted(str(s) for s in shards):
        for raw in read_shard(shard):
            item = decode_sample(raw, image_size, caption_field)
            if not isinstance(item, Skipped):
                images.append(item[0])
                captions.append(item[1])
                names.append(raw.name)
                if len(names) == n:
                    return torch.stack(images), captions, names
    raise EmuError(f"{shards[0]}: the shards hold {len(names)} usable samples, fewer than the {n} to hold out")


def collate_stream(triples):
    """(stream, where, item) triples from one stream of a ShardDataset or BucketedShards -> a Batch whose
    `.source` is (stream, where the stream stands after the batch: the last triple's `where`)."""
    batch = collate([item for _, _, item in triples])
    batch.source = triples[-1][:2]
    return batch


def pack_folder(root, out_dir, samples_per_shard=1000):
    """Write a folder of key.<image> + key.txt (+ key.json) files as tar shards of `samples_per_shard`
    samples, in key order: out_dir/shard-000000.tar, ... Returns the shard paths."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {}
    for file in sorted(root.iterdir()):
        if file.is_file():
            groups.setdefault(file.name.split(".", 1)[0], []).append(file)
    keys = sorted(groups)
    paths = []
    for first in range(0, len(keys), samples_per_shard):
        paths.append(out_dir / f"shard-{len(paths):06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for key in keys[first:first + samples_per_shard]:
                for file in groups[key]:
                    tar.add(file, arcname=file.name)
    return paths
