"""Seeded fuzzing of the two paths every web file takes: image decoding and caption reading.

A mutator breaks valid files the way failed downloads, bad disks and odd servers do. Whatever comes in,
load_image gives a (3, S, S) tensor in [-1, 1] or raises BadImage, and the caption path gives clean text
that the toy towers tokenize and encode, or raises BadCaption. Nothing else may escape. The seed is
fixed and every case has its own generator, so a failure names a case that `case_rng` rebuilds.
"""
import io
import json
import random
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from emu.datasets import toyworld
from emu.text.clip import CLIP_EOS
from emu.datasets.folders import (MAX_CAPTION_BYTES, BadCaption, BadImage, ImageCaptionFolder, Skipped,
                                  caption_from_metadata, load_image, read_caption, read_metadata)
from emu.text.hf import tokenize
from emu.text.t5 import T5_EOS
from emu.text.encoder import TextEncoder, make_toy_towers

SEED = 1234
IMAGE_CASES = 800  # about a second on one core
CAPTION_CASES = 300
WORLD = toyworld.make_haystack(3, seed=SEED)


def case_rng(kind, i):
    """The generator of case i: each case can be rebuilt alone."""
    return random.Random(f"{SEED}:{kind}:{i}")


# ----------------------------------------------------------------------------------------------------
# The mutator: one broken copy of a file


def flip_bits(data, rng, donors):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8) if data else 0):
        pos = rng.randrange(min(len(data), 128) if rng.random() < 0.5 else len(data))  # headers matter most
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(data, rng, donors):
    return data[:rng.randrange(len(data) + 1)]


def duplicate_chunk(data, rng, donors):
    start = rng.randrange(len(data) + 1)
    chunk = data[start:start + rng.randint(1, 512)]
    at = rng.randrange(len(data) + 1)
    return data[:at] + chunk + data[at:]


def delete_chunk(data, rng, donors):
    start = rng.randrange(len(data) + 1)
    return data[:start] + data[start + rng.randint(1, 512):]


def splice_header(data, rng, donors):
    """Another file's first bytes over this one's body, or this one's header over another body."""
    donor = rng.choice(donors)
    n = rng.randint(1, 64)
    return donor[:n] + data[n:] if rng.random() < 0.5 else data[:n] + donor[n:]


def random_junk(data, rng, donors):
    """Random bytes over a part of the file, or in place of everything after the first few bytes."""
    if rng.random() < 0.2:
        return data[:rng.randint(0, 16)] + rng.randbytes(rng.randint(0, 2048))
    start, n = rng.randrange(len(data) + 1), rng.randint(1, 256)
    return data[:start] + rng.randbytes(n) + data[start + n:]


MUTATIONS = [flip_bits, truncate, duplicate_chunk, delete_chunk, splice_header, random_junk]


def mutate(data, rng, donors):
    """1 to 3 mutations in a row: (the broken bytes, their names)."""
    names = []
    for _ in range(rng.randint(1, 3)):
        mutation = rng.choice(MUTATIONS)
        data = mutation(data, rng, donors)
        names.append(mutation.__name__)
    return data, " + ".join(names)


# ----------------------------------------------------------------------------------------------------
# Images


def valid_image_files():
    """{name: bytes} of good files of each format, made from toy images."""
    rgb = Image.fromarray(WORLD[0][0])
    wide = Image.fromarray(WORLD[1][0]).resize((48, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF path runs too
    frames = [Image.fromarray(im) for im, _, _ in WORLD]
    files = {
        "png": dict(img=rgb, format="PNG"),
        "png-palette-transparent": dict(img=rgb.quantize(16), format="PNG", transparency=0),
        "png-rgba": dict(img=wide.convert("RGBA"), format="PNG"),
        "jpeg": dict(img=rgb, format="JPEG", quality=90),
        "jpeg-progressive-exif": dict(img=wide, format="JPEG", progressive=True, exif=exif.tobytes()),
        "gif-animated": dict(img=frames[0], format="GIF", save_all=True, append_images=frames[1:], duration=50),
        "webp-lossy": dict(img=rgb, format="WEBP", quality=80),
        "webp-lossless": dict(img=wide, format="WEBP", lossless=True),
    }
    out = {}
    for name, options in files.items():
        buffer = io.BytesIO()
        options.pop("img").save(buffer, **options)
        out[name] = buffer.getvalue()
    return out


def check_image(path, size):
    """"ok" if load_image gives a good tensor, "refused" if it raises BadImage, else what went wrong."""
    try:
        x = load_image(str(path), size)
    except BadImage:
        return "refused"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if x.shape != (3, size, size) or x.dtype != torch.float32 or not torch.isfinite(x).all():
        return f"bad tensor {tuple(x.shape)} {x.dtype}"
    if x.min() < -1 or x.max() > 1:
        return f"values outside [-1, 1]: {x.min():.3f}..{x.max():.3f}"
    return "ok"


def test_fuzzed_images_decode_or_raise_bad_image(tmp_path):
    files = valid_image_files()
    donors = list(files.values())
    for name, data in files.items():  # the unbroken files load
        (tmp_path / name).write_bytes(data)
        assert check_image(tmp_path / name, 16) == "ok", name
    outcomes = []
    for i in range(IMAGE_CASES):
        rng = case_rng("image", i)
        kind = rng.choice(sorted(files))
        data, how = mutate(files[kind], rng, donors)
        path = tmp_path / f"case{i}"
        path.write_bytes(data)
        outcome = check_image(path, 16)
        assert outcome in ("ok", "refused"), f"image case {i} ({kind}, {how}): {outcome}"
        outcomes.append(outcome)
        path.unlink()
    # the mutator exercises both outcomes: broken files that still decode, and refused ones
    assert outcomes.count("ok") > IMAGE_CASES // 20 and outcomes.count("refused") > IMAGE_CASES // 20


# ----------------------------------------------------------------------------------------------------
# Captions

TEXTS = [c for _, c, _ in WORLD] + ["un cercle rouge à gauche", "一只红色的圆", "\U0001f534 on the left", "دائرة حمراء"]
# code points that captions hold and tokenizers may choke on: controls, formatting, surrogates,
# private use, non-characters, combining marks, the last code point
ODD_CHARS = ("\x00\x01\x07\x08\x0b\x1b\x1f\x7f\x85\x9b\xa0\xad\u0301\u061c\u200b\u200d\u200e\u202e"
             "\u2028\u2066\u3000\ud800\udfff\ue000\ufeff\ufffe\uffff\U000e0001\U0010ffff")


def unicode_soup(rng):
    pieces = []
    for _ in range(rng.randint(0, 60)):
        r = rng.random()
        if r < 0.4:
            pieces.append(rng.choice(ODD_CHARS))
        elif r < 0.7:
            pieces.append(rng.choice(rng.choice(TEXTS)))
        else:
            pieces.append(chr(rng.randrange(0x110000)))
    return "".join(pieces)


def caption_text(rng):
    """A caption as a (maybe broken) str: clean, sprinkled with odd characters, random, or huge."""
    r = rng.random()
    if r < 0.3:
        text = rng.choice(TEXTS)
        return "".join(c + (rng.choice(ODD_CHARS) if rng.random() < 0.2 else "") for c in text)
    if r < 0.98:
        return unicode_soup(rng)
    char = rng.choice("aé一\U0001f534")  # 1 to 4 bytes: a cut at MAX_CAPTION_BYTES may fall inside one
    return char * (rng.randint(MAX_CAPTION_BYTES - 8, MAX_CAPTION_BYTES + 4096) // len(char.encode()))


def caption_file(rng):
    """The bytes of a key.txt: encoded text, mutated text, random bytes, other encodings."""
    text = caption_text(rng)
    r = rng.random()
    if r < 0.5:
        return text.encode("utf-8", "ignore"), "text"  # valid UTF-8: lone surrogates cannot be encoded
    if r < 0.8:
        return mutate(text.encode("utf-8", "surrogatepass"), rng, [t.encode() for t in TEXTS])
    if r < 0.9:
        return rng.randbytes(rng.randint(0, 300)), "random bytes"
    return text.encode(rng.choice(["utf-16", "utf-32", "latin-1"]), "replace"), "other encoding"


def metadata_file(rng):
    """The bytes of a key.json: escaped or raw text in the caption field, other types, broken JSON."""
    value = rng.choice([caption_text(rng)] * 6 + [None, 3, ["a red circle"], {"text": "a"}, ""])
    data = json.dumps({"caption": value, "likes": 3}, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.6:
        return data, "json"
    if r < 0.9:
        return mutate(data, rng, [b"[" * 5000, b'{"caption": "a red circle"}', b"\xef\xbb\xbf{}"])
    return b"[" * rng.randint(1, 50_000) + data, "deep nesting"


def check_caption(caption):
    """What is wrong with a caption the reading path gave, or None."""
    if not isinstance(caption, str) or not caption:
        return f"not a non-empty string: {caption!r:.80}"
    if caption != " ".join(caption.split()):
        return "whitespace not collapsed"
    odd = [c for c in caption if unicodedata.category(c) in ("Cc", "Cf", "Cs")]  # controls, formatting, surrogates
    if odd:
        return f"kept {odd[0]!r}"
    if len(caption) > MAX_CAPTION_BYTES:
        return f"{len(caption)} characters"
    return None


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    clip_dir, t5_dir, _ = make_toy_towers(TEXTS, tmp_path_factory.mktemp("towers"), seed=0)
    return TextEncoder.load(clip_dir, t5_dir)


def read_case(stem):
    """Each way the dataset reads a sample's text, as {way: caption or BadCaption}."""
    out = {}
    for way, read in [("key.txt", lambda: read_caption(f"{stem}.txt")),
                      ("key.json", lambda: caption_from_metadata(read_metadata(f"{stem}.json"), "caption", f"{stem}.json"))]:
        try:
            out[way] = read()
        except BadCaption as e:
            out[way] = e
    return out


def test_fuzzed_captions_read_clean_or_raise_bad_caption_and_tokenize(tmp_path, towers):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
    names, results, captions = {}, {}, []
    for i in range(CAPTION_CASES):
        rng = case_rng("caption", i)
        (txt, txt_how), (meta, meta_how) = caption_file(rng), metadata_file(rng)
        stem = tmp_path / f"{i:04d}"
        stem.with_suffix(".png").write_bytes(png.getvalue())
        stem.with_suffix(".txt").write_bytes(txt)
        stem.with_suffix(".json").write_bytes(meta)
        names[i] = f"caption case {i} (key.txt: {txt_how}, key.json: {meta_how})"
        try:
            results[i] = read_case(stem)
        except Exception as e:
            pytest.fail(f"{names[i]}: {type(e).__name__}: {e}")
        for way, caption in results[i].items():
            if not isinstance(caption, BadCaption):
                assert check_caption(caption) is None, f"{names[i]}, {way}: {check_caption(caption)}"
                captions.append((i, caption))
    # the dataset reads the same captions, and skips exactly the failed cases with their reasons
    for field in (None, "caption"):
        data = ImageCaptionFolder(str(tmp_path), 8, caption_field=field, skip_bad=True)
        for i in range(CAPTION_CASES):
            txt, meta = results[i]["key.txt"], results[i]["key.json"]
            bad_json = isinstance(meta, BadCaption) and meta.reason == "metadata is not valid JSON"
            failed = meta if field or bad_json else txt
            expected = Skipped(failed.path, failed.reason) if isinstance(failed, BadCaption) else failed
            got = data[i] if isinstance(data[i], Skipped) else data[i][1]
            assert got == expected, f"{names[i]}, field {field}: {got!r:.200}"
    # every caption that came through tokenizes: real tokens, the end token last
    for i, caption in captions:
        for tokenizer, eos in ((towers.clip_tokenizer, CLIP_EOS), (towers.t5_tokenizer, T5_EOS)):
            try:
                ids, mask = tokenize(tokenizer, [caption])
            except Exception as e:
                pytest.fail(f"{names[i]}: tokenizing {caption!r:.80}: {type(e).__name__}: {e}")
            n = int(mask[0].sum())
            assert n >= 2 and ids[0, n - 1] == tokenizer.token_to_id(eos), f"{names[i]}: {ids[0, :n].tolist()}"
    emb = towers.encode([c for _, c in captions[:47]] + [max((c for _, c in captions), key=len)])
    assert all(torch.isfinite(t).all() for t in (emb.clip, emb.t5, emb.pooled))
    # both ways yield text in many cases, so the cleaning and tokenizing above saw plenty
    for way in ("key.txt", "key.json"):
        assert sum(isinstance(r[way], str) for r in results.values()) > CAPTION_CASES // 4, way


# ----------------------------------------------------------------------------------------------------
# Tar shards

SHARD_CASES = 200


def test_fuzzed_tar_shards_give_samples_or_skipped_entries(tmp_path):
    """A broken shard yields RawSamples; each decodes to (image, caption) or Skipped. Nothing escapes."""
    from emu.datasets.shards import decode_sample, pack_folder, read_shard
    toyworld.write_folder(tmp_path / "folder", WORLD)
    (shard,) = pack_folder(tmp_path / "folder", tmp_path / "shards")
    valid = shard.read_bytes()
    kinds = {"sample": 0, "skipped": 0}
    for i in range(SHARD_CASES):
        rng = case_rng("shard", i)
        data, how = mutate(valid, rng, [valid])
        broken = tmp_path / f"case-{i}.tar"
        broken.write_bytes(data)
        try:
            for raw in read_shard(broken):
                result = decode_sample(raw, 16)
                if isinstance(result, Skipped):
                    kinds["skipped"] += 1
                else:
                    image, caption = result
                    assert image.shape == (3, 16, 16) and -1 <= image.min() <= image.max() <= 1 and caption, (i, how)
                    kinds["sample"] += 1
        except Exception as e:  # noqa: BLE001 - the point: nothing may escape
            pytest.fail(f"shard case {i} ({how}): {type(e).__name__}: {e}")
        broken.unlink()
    assert min(kinds.values()) > SHARD_CASES // 10, kinds  # both outcomes are exercised
