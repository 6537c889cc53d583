"""Bad captions and metadata, case by case: each is cleaned and kept, or skipped with a counted reason
(skip_bad=True), or a one-line EmuError naming the file (skip_bad=False). Also load_all's bad images."""
import json
import math
import re

import pytest
import torch

import train_ae
from emu import EmuError
from emu.datasets import toyworld
from emu.models.autoencoder import PRESETS, Autoencoder
from emu.text.clip import CLIP_EOS
from emu.datasets.folders import (MAX_CAPTION_BYTES, BadCaption, BadImage, ImageCaptionFolder, Skipped, collate,
                                  read_caption)
from emu.text.hf import tokenize
from emu.text.t5 import T5_EOS
from emu.text.encoder import TextEncoder, make_toy_towers
from emu.training.loop import LatentBatches

WORLD = toyworld.make_haystack(8, seed=0)


@pytest.fixture
def folder(tmp_path):
    """Eight good toy samples: 000000.png/.txt/.json ... 000007.*"""
    toyworld.write_folder(tmp_path / "data", WORLD)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    clip_dir, t5_dir, _ = make_toy_towers([c for _, c, _ in WORLD], tmp_path_factory.mktemp("towers"), seed=0)
    return TextEncoder.load(clip_dir, t5_dir)


def assert_one_line_error(make, path, reason):
    with pytest.raises(EmuError) as info:
        make()
    assert re.match(re.escape(f"{path}: {reason}"), str(info.value)), str(info.value)
    assert len(str(info.value).splitlines()) == 1


def assert_only_sample_2_skipped(data, path, reason):
    assert data[2] == Skipped(str(path), reason)
    assert data.skipped == {2: Skipped(str(path), reason)} and data.captions[2] is None
    batch = collate([data[i] for i in range(len(data))])
    assert batch[0].shape == (7, 3, 32, 32) and len(batch[1]) == 7 and batch.skipped == [Skipped(str(path), reason)]


CAPTION_CASES = {  # name: (what key.txt holds; None = no file, "dir" = a folder of that name), reason
    "missing": (None, "caption file not found"),
    "empty": (b"", "caption is empty"),
    "whitespace only": (" \t\r\n\u00a0\u3000\u2028\n".encode(), "caption is empty"),
    "control characters only": ("\x00\x07\u200b\ufeff\x1b\x9b".encode(), "caption is empty"),
    "invalid UTF-8": (b"a caf\xe9 on the left", "caption is not valid UTF-8 text"),
    "UTF-16": ("a red circle".encode("utf-16"), "caption is not valid UTF-8 text"),
    "UTF-8-encoded surrogate": (b"a red \xed\xa0\x80 circle", "caption is not valid UTF-8 text"),
    "a folder, not a file": ("dir", "caption file unreadable"),
}


@pytest.mark.parametrize("case", CAPTION_CASES)
def test_bad_caption_file_is_skipped_with_its_reason_or_a_one_line_error(folder, case):
    content, reason = CAPTION_CASES[case]
    path = folder / "000002.txt"
    path.unlink()
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert_one_line_error(lambda: ImageCaptionFolder(str(folder), 32), path, reason)
    assert_only_sample_2_skipped(ImageCaptionFolder(str(folder), 32, skip_bad=True), path, reason)


METADATA_CASES = {  # name: (what key.json holds), reason; the caption comes from its "true_caption"
    "not JSON": (b'{"true_caption": "a red', "metadata is not valid JSON"),
    "not an object": (b'["a red circle"]', "metadata is not valid JSON"),
    "invalid UTF-8": (b'{"true_caption": "a caf\xe9"}', "metadata is not valid JSON"),
    "nested too deep": (b"[" * 100_000, "metadata is not valid JSON"),
    "over 1 MiB": (b'{"true_caption": "' + b"a " * 2**19 + b'"}', "metadata is not valid JSON"),
    "no caption field": (b'{"likes": 3}', "no 'true_caption' caption in metadata"),
    "null caption": (b'{"true_caption": null}', "no 'true_caption' caption in metadata"),
    "a number, not text": (b'{"true_caption": 3}', "no 'true_caption' caption in metadata"),
    "empty caption": (b'{"true_caption": " \\n\\u200b\\u0000 "}', "caption is empty"),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_bad_metadata_caption_is_skipped_with_its_reason_or_a_one_line_error(folder, case):
    content, reason = METADATA_CASES[case]
    path = folder / "000002.json"
    path.write_bytes(content)
    assert_one_line_error(lambda: ImageCaptionFolder(str(folder), 32, caption_field="true_caption"), path, reason)
    data = ImageCaptionFolder(str(folder), 32, caption_field="true_caption", skip_bad=True)
    assert_only_sample_2_skipped(data, path, reason)
    if reason == "metadata is not valid JSON":  # a malformed key.json is a bad sample even with key.txt captions
        assert_one_line_error(lambda: ImageCaptionFolder(str(folder), 32), path, reason)
        assert_only_sample_2_skipped(ImageCaptionFolder(str(folder), 32, skip_bad=True), path, reason)
    else:  # key.txt captions do not need the field
        assert ImageCaptionFolder(str(folder), 32).captions[2] == WORLD[2][1]


def test_control_and_formatting_characters_are_removed_and_the_caption_kept(folder):
    dirty = "\ufeff a\x00 r\u200bed\u200d\tcir\u00adcle\x7f\u202e\r\non\u2066 the\x9b\x01 \u3000left\x85\x1c "
    (folder / "000002.txt").write_bytes(dirty.encode())
    # the JSON escapes hold a lone surrogate, which no tokenizer accepts, and a bidi override
    (folder / "000003.json").write_text('{"true_caption": "a red\\ud800 circle \\u202eon the\\u0007 left"}')
    data = ImageCaptionFolder(str(folder), 32)
    assert data.captions[2] == "a red circle on the left" and data[2][1] == "a red circle on the left"
    meta = ImageCaptionFolder(str(folder), 32, caption_field="true_caption", keys=["000003"])
    assert meta.captions == ["a red circle on the left"]
    # printable text of any script stays as it is, combining accents and emoji included
    kept = "un cercle rouge\u0301 一只红色的圆 \U0001f534 دائرة حمراء"
    (folder / "000004.txt").write_text(kept + "\n")
    assert read_caption(str(folder / "000004.txt")) == kept


def test_overlong_caption_is_read_up_to_the_bound_and_tokenized_to_full_length(tmp_path, towers):
    # a 2 GiB caption file (sparse: text, then zero bytes); only MAX_CAPTION_BYTES of it are read
    path = tmp_path / "huge.txt"
    text = "a red circle on the left of two blue squares " * 4000  # 180 kB of text
    with open(path, "wb") as f:
        f.write(text.encode())
        f.truncate(2**31)
    caption = read_caption(str(path))
    assert caption == " ".join(text[:MAX_CAPTION_BYTES].split())
    # a cut inside a character leaves the unfinished character out; bad bytes before the cut still count
    (tmp_path / "accents.txt").write_text("ééé")  # 6 bytes
    assert read_caption(str(tmp_path / "accents.txt"), max_bytes=5) == "éé"
    (tmp_path / "bad.txt").write_bytes(b"\xff" + "ééé".encode())
    with pytest.raises(BadCaption, match="not valid UTF-8"):
        read_caption(str(tmp_path / "bad.txt"), max_bytes=5)
    # both tokenizers cut it to their full length and keep the end token last
    for tokenizer, eos in ((towers.clip_tokenizer, CLIP_EOS), (towers.t5_tokenizer, T5_EOS)):
        ids, mask = tokenize(tokenizer, [caption, "a red circle"])
        assert mask[0].all() and not mask[1].all()
        assert ids[0, -1] == tokenizer.token_to_id(eos)
    emb = towers.encode([caption, "a red circle"])
    assert emb.clip_mask[0].all() and emb.t5_mask[0].all() and emb.clip.shape[1] == 77
    assert all(torch.isfinite(t).all() for t in (emb.clip, emb.t5, emb.pooled))


def test_skipped_captions_are_counted_with_bad_images_in_training(folder, towers, capsys):
    (folder / "000001.txt").unlink()
    (folder / "000002.txt").write_text("  \n")
    (folder / "000003.txt").write_bytes(b"caf\xe9")
    (folder / "000004.json").write_text("{")
    png = (folder / "000005.png").read_bytes()
    (folder / "000005.png").write_bytes(png[:len(png) // 2])
    data = ImageCaptionFolder(str(folder), 32, skip_bad=True)
    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["toy"]).eval().requires_grad_(False)
    batches = LatentBatches(data, ae, towers, batch_size=2, seed=0)
    assert len(batches.cache[0]) == 3  # samples 0, 6 and 7
    assert batches.skipped == {
        str(folder / "000001.txt"): "caption file not found", str(folder / "000002.txt"): "caption is empty",
        str(folder / "000003.txt"): "caption is not valid UTF-8 text",
        str(folder / "000004.json"): "metadata is not valid JSON", str(folder / "000005.png"): "truncated or corrupt"}
    assert batches.skipped.summary() == (
        "skipped 5 unusable samples (caption file not found: 1, caption is empty: 1, caption is not valid UTF-8 "
        "text: 1, metadata is not valid JSON: 1, truncated or corrupt: 1)")
    assert f"skipping {folder / '000002.txt'}: caption is empty" in capsys.readouterr().out


def test_load_all_leaves_out_bad_samples_and_records_them(folder):
    png = (folder / "000005.png").read_bytes()
    (folder / "000005.png").write_bytes(png[:len(png) // 2])
    strict = ImageCaptionFolder(str(folder), 32)
    assert strict.load_all(0, 5).shape == (5, 3, 32, 32)
    with pytest.raises(BadImage, match=r"000005\.png: not a readable image"):
        strict.load_all(4)
    (folder / "000006.txt").write_text("")
    data = ImageCaptionFolder(str(folder), 32, skip_bad=True)
    images = data.load_all(4)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images[0], data[4][0]) and torch.equal(images[1], data[7][0])
    assert data.skipped == {5: Skipped(str(folder / "000005.png"), "truncated or corrupt"),
                            6: Skipped(str(folder / "000006.txt"), "caption is empty")}
    assert data.load_all(5, 7).shape == (0, 3, 32, 32)


def test_train_ae_skips_and_reports_bad_heldout_images(folder, tmp_path, capsys):
    toyworld.write_folder(folder, WORLD + toyworld.make_haystack(4, seed=1))  # 12 samples; the last 4 held out
    (folder / "000009.png").write_bytes(b"")
    (folder / "000011.txt").unlink()
    argv = ["--data", str(folder), "--out", str(tmp_path / "ae"), "--steps", "1", "--bs", "4", "--holdout", "4",
            "--device", "cpu"]
    with torch.random.fork_rng(devices=[]):  # main() seeds the global generator
        train_ae.main(train_ae.build_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert (f"held-out set of 4: skipped 2 unusable samples (empty file: 1, caption file not found: 1), "
            f"e.g. {folder / '000009.png'}") in out
    metrics = json.loads((tmp_path / "ae" / "metrics.json").read_text())
    assert math.isfinite(metrics["psnr"]) and math.isfinite(metrics["scale_factor"])
    for name in ("000008.png", "000010.png"):
        (folder / name).write_bytes(b"")
    with pytest.raises(EmuError, match=r"none of the 4 held-out samples could be used, e\.g\. .*000008\.png: empty file"):
        train_ae.main(train_ae.build_parser().parse_args(argv))
