"""Tests for emu/datasets/shards.py: tar shards read in memory, hostile members refused, every sample once
per epoch across ranks and workers, a resumed stream that continues where it stopped, and the same for
streams in aspect-ratio buckets."""
import copy
import io
import itertools
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from emu import EmuError
from emu.datasets import shards as shards_module
from emu.datasets.buckets import make_buckets, nearest_bucket
from emu.datasets.folders import Skipped, load_image
from emu.datasets.shards import BucketedShards, ShardDataset, collate_stream, decode_sample, read_shard
from emu.training.loop import ShardBatches


def png_bytes(seed, size=(12, 12)):
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def add(tar, name, data=b"", **info):
    member = tarfile.TarInfo(name)
    member.size = len(data)
    for k, v in info.items():
        setattr(member, k, v)
    tar.addfile(member, io.BytesIO(data) if member.isreg() else None)


def write_shard(path, keys):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            add(tar, f"{key}.png", png_bytes(int(key)))
            add(tar, f"{key}.txt", f"caption {key}".encode())
            add(tar, f"{key}.json", b'{"width": 12}')
    return path


@pytest.fixture
def five_shards(tmp_path):
    """5 shards of 7 samples: keys 0..34, captions "caption <key>"."""
    return [write_shard(tmp_path / f"shard-{i}.tar", [f"{i * 7 + j:06d}" for j in range(7)]) for i in range(5)]


def captions_of(batches):
    return [c for batch in batches for c in batch[1]]


def test_shard_samples_decode_like_image_files(tmp_path):
    shard = write_shard(tmp_path / "s.tar", ["000001", "000002"])
    samples = list(read_shard(shard))
    assert [s.name for s in samples] == [f"{shard}:000001", f"{shard}:000002"]
    image, caption = decode_sample(samples[1], 8)
    (tmp_path / "x.png").write_bytes(png_bytes(2))
    assert caption == "caption 000002" and torch.equal(image, load_image(tmp_path / "x.png", 8))


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(five_shards):
    seen = []
    for rank in (0, 1):
        data = ShardDataset(five_shards, 8, shuffle_buffer=4, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate_stream)
        seen += captions_of(loader)
    assert sorted(seen) == sorted(f"caption {k:06d}" for k in range(35))
    data = ShardDataset(five_shards, 8, shuffle_buffer=4)
    first = captions_of(torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate_stream))
    data.epoch = 1
    second = captions_of(torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate_stream))
    assert sorted(first) == sorted(second) and first != second  # each epoch in another order


@pytest.mark.parametrize("stop", [3, 11])  # mid-epoch, and after one worker's stream has run out
def test_resumed_streams_continue_exactly_where_they_stopped(five_shards, stop):
    def loader(data):
        return torch.utils.data.DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate_stream)
    unbroken = [(b.source[0], b[1]) for b in loader(ShardDataset(five_shards, 8, shuffle_buffer=5))]
    position = {}
    for stream, captions in unbroken[:stop]:
        position[stream] = position.get(stream, 0) + len(captions)
    resumed = ShardDataset(five_shards, 8, shuffle_buffer=5)
    resumed.position, resumed.rotation = position, (unbroken[stop - 1][0] + 1) % 2
    assert [(b.source[0], b[1]) for b in loader(resumed)] == unbroken[stop:]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def test_hostile_members_are_skipped_and_nothing_is_written_or_unpickled(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "MAX_MEMBER_BYTES", 10_000)
    marker = tmp_path / "unpickled"
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "000001.png", png_bytes(1))
        add(tar, "000001.txt", b"a good sample")
        add(tar, "../000002.png", png_bytes(2))
        add(tar, "../000002.txt", b"climbs out")
        add(tar, "/tmp/000003.png", png_bytes(3))
        add(tar, "000004.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "000004.txt", b"a link")
        add(tar, "000005.png", type=tarfile.LNKTYPE, linkname="000001.png")
        add(tar, "000006.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add(tar, "000007.png", b"\0" * 20_000)
        add(tar, "000007.txt", b"huge")
        add(tar, "000008.png", png_bytes(8))
        add(tar, "000008.txt", b"with a pickle beside it")
        add(tar, "000008.pth", pickle.dumps(Evil(str(marker))))
        add(tar, "000009.pkl", pickle.dumps(Evil(str(marker))))
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(tmp_path.parent))
    results = {raw.name.split(":")[-1]: decode_sample(raw, 8) for raw in read_shard(shard)}
    reasons = {key: r.reason for key, r in results.items() if isinstance(r, Skipped)}
    assert reasons == {"../000002": "unsafe member name", "/tmp/000003": "unsafe member name",
                       "000004": "member is a link", "000005": "member is a link",
                       "000006": "member is not a regular file", "000007": "member too large",
                       "000009": "no image member"}
    assert results["000001"][1] == "a good sample" and results["000008"][1] == "with a pickle beside it"
    assert not marker.exists() and (sorted(os.listdir(tmp_path)), sorted(os.listdir(tmp_path.parent))) == before


def test_truncated_or_foreign_shard_ends_with_one_skipped_entry(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [f"{k:06d}" for k in range(6)])
    with tarfile.open(shard) as tar:
        middle = tar.getmember("000003.png").offset_data + 100  # inside a member's data
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:middle])
    samples = list(read_shard(cut))
    assert [s.problem for s in samples[:-1]] == [None] * 3
    assert samples[-1].name == str(cut) and samples[-1].problem.startswith("truncated or corrupt shard")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    (only,) = read_shard(junk)
    assert only.name == str(junk) and only.problem.startswith("not a readable tar shard")


def test_size_and_aspect_filters(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, size in [("000001", (12, 12)), ("000002", (6, 6)), ("000003", (40, 10))]:
            add(tar, f"{key}.png", png_bytes(int(key), size))
            add(tar, f"{key}.txt", b"x")
    got = [decode_sample(raw, 8, min_size=8, max_aspect=2.0) for raw in read_shard(shard)]
    assert got[0][0].shape == (3, 8, 8)
    assert [g.reason for g in got[1:]] == ["image too small", "extreme aspect ratio"]


# ----------------------------------------------------------------------------------------------------
# Aspect-ratio buckets over streamed shards (BucketedShards)

BUCKETS = make_buckets(64, 8)  # five sizes: 9:16 48x88, 2:3 56x80, 1:1 64x64, 3:2 80x56, 16:9 88x48
SHAPES = [(64, 36), (36, 64), (48, 48), (60, 40), (40, 60)]  # (width, height): one of each ratio


def size_of(key):
    """The image size of sample `key`: every ratio, 16:9 most often, so the buckets fill unevenly."""
    return SHAPES[key % 5] if key % 3 else SHAPES[0]


@pytest.fixture
def mixed_shards(tmp_path):
    """5 shards of 9 samples, keys 0..44 at the sizes of size_of; sample 13 has no caption."""
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"shard-{i}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for key in range(i * 9, i * 9 + 9):
                add(tar, f"{key:06d}.png", png_bytes(key, size_of(key)))
                if key != 13:
                    add(tar, f"{key:06d}.txt", f"caption {key:06d}".encode())
    return paths


def test_bucketed_streams_give_batches_of_one_bucket_and_every_usable_sample_once_an_epoch(mixed_shards):
    """Two ranks of two workers each: every batch holds images of one bucket, the one nearest each image's
    ratio; the usable samples are seen once an epoch; a stream's only short batches are its buckets' last."""
    batches = []
    for rank in (0, 1):
        data = ShardDataset(mixed_shards, 64, shuffle_buffer=4, rank=rank, world_size=2)
        batches += list(torch.utils.data.DataLoader(BucketedShards(data, BUCKETS, batch_size=3), batch_size=None,
                                                    num_workers=2, collate_fn=collate_stream))
    keys = [int(c.split()[1]) for b in batches for c in b[1]]
    assert sorted(keys) == [k for k in range(45) if k != 13]
    assert [s.reason for b in batches for s in b.skipped] == ["caption file not found"]
    last = {}
    for images, captions, stream in ((b[0], b[1], b.source[0]) for b in batches if b[1]):
        for caption in captions:
            bucket = BUCKETS[nearest_bucket(*size_of(int(caption.split()[1])), BUCKETS)]
            assert images.shape[1:] == (3, bucket.height, bucket.width)
        group = (stream, tuple(images.shape[2:]))
        assert last.get(group, 3) == 3  # a short batch is the last of its stream's bucket
        last[group] = len(captions)
    assert {s for s, _ in last} == {0, 1, 2, 3} and len({shape for _, shape in last}) == 5


class Identity(torch.nn.Module):
    """The first stage and the text towers as identities, so that ShardBatches gives the batches as read:
    (images, the captions' keys)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("device_probe", torch.zeros(()))

    def encode(self, x):
        if isinstance(x, list):  # captions: "caption 000012" -> 12, the empty caption -> -1
            return torch.tensor([int(c.split()[1]) if c else -1 for c in x])
        return x


@pytest.mark.parametrize("stop", [4, 11, 15, 21])
def test_bucketed_shard_batches_resume_exactly_where_they_stopped(mixed_shards, stop):
    """ShardBatches built with the position after `stop` batches (samples still waiting in buckets among
    it) gives what an unbroken one gives from there, across the epoch's end, with two workers. The stops:
    early; while one stream gives its partly filled buckets at its end; once it has run out; in the
    second epoch. A bucketed position does not resume a run without --buckets."""
    def batches(n, position=None):
        data = ShardDataset(mixed_shards, 64, shuffle_buffer=4)
        shard_batches = ShardBatches(data, Identity(), Identity(), 3, workers=2, position=position, buckets=BUCKETS)
        got, positions = [], []
        for batch in itertools.islice(shard_batches, n):
            got.append(batch)
            positions.append(copy.deepcopy(shard_batches.position()))
        return got, positions
    unbroken, positions = batches(28)
    assert positions[-1]["epoch"] == 1 and positions[stop - 1]["epoch"] == (stop > 18)
    assert any(where["waiting"] for where in positions[stop - 1]["consumed"].values())
    resumed, _ = batches(28 - stop, positions[stop - 1])
    for (images_a, keys_a), (images_b, keys_b) in zip(unbroken[stop:], resumed, strict=True):
        assert torch.equal(keys_a, keys_b) and torch.equal(images_a, images_b)
    with pytest.raises(EmuError, match="written with --buckets; resume with the flags it was written with"):
        ShardBatches(ShardDataset(mixed_shards, 64), Identity(), Identity(), 3, position=positions[stop - 1])
