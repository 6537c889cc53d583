"""Image-caption data: a folder of `key.<image>` + `key.txt` (+ optional `key.json`) pairs.

This is the img2dataset / WebDataset naming, unpacked into a folder; the toy world is written in
the same layout, so the toy pipeline and a real one read data through the same code.
Images come out as float tensors in [-1, 1], resized on the short side and centre-cropped.

A web crawl holds every kind of broken file. What happens to each, case by case: "skipped" means that
ImageCaptionFolder(skip_bad=True) gives Skipped(file, reason) for the sample, which batches list and
training counts by reason; with skip_bad=False the same case is a one-line EmuError naming the file.
- image missing, empty, truncated, of an unknown format or over MAX_PIXELS: skipped (see open_rgb);
- caption file missing: skipped, "caption file not found";
- caption empty, whitespace-only, or nothing left once cleaned: skipped, "caption is empty"
  (not kept as the unconditional prompt: see read_caption);
- caption not valid UTF-8: skipped, "caption is not valid UTF-8 text" (guessing the encoding
  would turn the text into nonsense the model learns from);
- control characters in a caption (C0 and C1 controls, DEL, NUL), zero-width and bidi formatting
  characters, the byte-order mark: removed, the caption is kept (see clean_caption);
- runs of whitespace (newlines, tabs, no-break spaces...): one space;
- overlong caption: kept; only its first MAX_CAPTION_BYTES are read (a 2 GB file is not loaded),
  and the tokenizers cut it to their length, keeping the end token;
- key.json malformed (not JSON, not an object, over MAX_METADATA_BYTES): skipped, "metadata is not
  valid JSON", whether or not the caption comes from it;
- caption taken from key.json (caption_field): the same cleaning and cases as key.txt; a field that
  is absent or not a string is skipped, "no '<field>' caption in metadata".
"""
import codecs
import io
import json
import os
import unicodedata
import warnings
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from emu import EmuError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


# ----------------------------------------------------------------------------------------------------
# Images

# Larger images are refused from their header, before any pixel is decoded: a few-kB PNG can claim
# 100000 x 100000 pixels (a "decompression bomb") and would take tens of GB to decode. 2**26 pixels is
# 8192 x 8192, above any photo a text-to-image dataset keeps.
MAX_PIXELS = 2 ** 26


class BadFile(EmuError):
    """A file of a sample that cannot be used. `reason` is a short category, for counting skipped files."""

    def __init__(self, path, reason, detail="", message=None):
        super().__init__(f"{path}: {message or reason}" + (f" ({detail})" if detail else ""))
        self.path, self.reason = path, reason


class BadImage(BadFile):
    """An image file that cannot be used (see open_rgb)."""

    def __init__(self, path, reason, detail=""):
        unreadable = reason in ("empty file", "unknown format", "truncated or corrupt")
        super().__init__(path, reason, detail, f"not a readable image: {reason}" if unreadable else reason)


class BadCaption(BadFile):
    """A caption file (key.txt) or metadata file (key.json) that cannot be used (see read_caption)."""


def open_rgb(path, max_pixels=MAX_PIXELS, data=None):
    """Decode an image file (or `data`, its bytes, named `path` in errors, e.g. a tar shard's member)
    to an 8-bit RGB PIL image, whatever it holds.

    - EXIF orientation is applied, so a photo taken sideways comes out upright;
    - transparency (RGBA, LA, palette with a transparent colour) is laid over white;
    - 16-bit images are scaled to 8 bits, not clipped;
    - CMYK, grayscale and palette images are converted; an animated image gives its first frame.
    Raises BadImage for a missing, empty, truncated or unknown file, or one over `max_pixels`.
    """
    try:
        if (os.path.getsize(path) if data is None else len(data)) == 0:
            raise BadImage(path, "empty file")
        with warnings.catch_warnings():
            # Pillow warns of damage it reads past (a corrupt EXIF block...): a log line per broken web file.
            warnings.simplefilter("ignore")
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise BadImage(path, "too many pixels", f"{w}x{h} is over {max_pixels}; refused before decoding")
                im.load()  # the first frame of an animation
                if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation tag; 1 = upright
                    im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except Image.DecompressionBombError as e:
        raise BadImage(path, "too many pixels", f"{str(e)[:120]}; refused before decoding") from None
    except UnidentifiedImageError:
        raise BadImage(path, "unknown format") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise BadImage(path, "truncated or corrupt", f"{type(e).__name__}: {str(e)[:120]}") from None


def _to_rgb(im):
    if im.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit grayscale: 0..65535
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return im.convert("RGB")


def load_image(path, size, max_pixels=MAX_PIXELS, data=None):
    """Read an image file (or its bytes, `data`) as a (3, size, size) float tensor in [-1, 1] (see
    open_rgb for the formats).

    Resizes the shorter side to `size` (bicubic) and crops the centre square.
    Raises BadImage naming the file if it cannot be used.
    """
    return square_tensor(open_rgb(path, max_pixels, data), size)


def square_tensor(im, size):
    """An RGB PIL image -> (3, size, size) float tensor in [-1, 1]: the shorter side resized to `size`
    (bicubic), the centre square cropped."""
    return crop_tensor(im, size, size)


def crop_tensor(im, width, height):
    """An RGB PIL image -> (3, height, width) float tensor in [-1, 1]: resized (bicubic) just enough to
    cover width x height, keeping its aspect ratio, and the centre cropped to that size."""
    w, h = im.size
    scale = max(width / w, height / h)
    if scale != 1.0:
        im = im.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - width) // 2, (h - height) // 2
    return from_pil(im.crop((left, top, left + width, top + height)))


def from_pil(im):
    """An RGB PIL image -> (3, H, W) float tensor in [-1, 1] (the inverse of to_uint8, one image)."""
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def from_uint8(images):
    """(N, H, W, 3) uint8 images (an array, or a sequence of them) -> (N, 3, H, W) floats in [-1, 1]; the
    inverse of to_uint8."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images):
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8 numpy array."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Captions and metadata

# A caption file is read no further than this: a few hundred bytes is a long caption, and both
# tokenizers keep 77 tokens of it. A metadata file larger than the bound is refused instead, since
# cut JSON does not parse.
MAX_CAPTION_BYTES = 64 * 2**10
MAX_METADATA_BYTES = 2**20

# What clean_caption removes: control characters (Cc: C0, DEL, C1; NUL among them), formatting
# characters (Cf: zero-width spaces and joiners, bidi marks, embeddings, overrides and isolates, the
# byte-order mark, soft hyphens) and lone surrogates (Cs: JSON's \ud800 escapes make them, and no
# tokenizer accepts them). Whitespace among the controls (tab, newline...) counts as whitespace.
REMOVED_CATEGORIES = ("Cc", "Cf", "Cs")


def clean_caption(text):
    """Caption text as the tokenizers get it: control and formatting characters removed (see
    REMOVED_CATEGORIES), every run of whitespace made one space, none at the ends."""
    text = " ".join(text.split())
    if not text.isprintable():  # most captions are; only the others are looked at character by character
        text = " ".join("".join(c for c in text if unicodedata.category(c) not in REMOVED_CATEGORIES).split())
    return text


def read_caption(path, max_bytes=MAX_CAPTION_BYTES):
    """Read a caption file as one clean line of text (see clean_caption).

    Only the first `max_bytes` are read; the tokenizers cut a long caption to their length anyway.
    Raises BadCaption naming the file if it is missing, unreadable, not UTF-8, or empty once cleaned.
    An empty caption is not taken as the unconditional prompt: the model learns that one from caption
    dropout, at the rate --caption-dropout sets. On the web an empty caption is a failed scrape, and
    keeping those would raise the unconditional rate by an unknown and unseen amount.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise BadCaption(path, "caption file not found") from None
    except OSError as e:
        raise BadCaption(path, "caption file unreadable", e.strerror) from None
    return decode_caption(data, path, max_bytes)


def decode_caption(data, path, max_bytes=MAX_CAPTION_BYTES):
    """A caption from its bytes (of which only the first `max_bytes` count), as read_caption gives it;
    `path` names the file in errors."""
    try:
        # The cut may fall inside a character: the incremental decoder leaves an unfinished last one out.
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:max_bytes], final=len(data) <= max_bytes)
    except UnicodeDecodeError as e:
        raise BadCaption(path, "caption is not valid UTF-8 text", f"byte {e.start}") from None
    caption = clean_caption(text)
    if not caption:
        raise BadCaption(path, "caption is empty", "only whitespace or control characters" if data else "")
    return caption


def read_metadata(path, max_bytes=MAX_METADATA_BYTES):
    """A sample's metadata (key.json) as a dict, {} when there is no such file.

    Raises BadCaption naming the file if it cannot be read, is over `max_bytes`, or is not a JSON object.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise BadCaption(path, "metadata file unreadable", e.strerror) from None
    return decode_metadata(data, path, max_bytes)


def decode_metadata(data, path, max_bytes=MAX_METADATA_BYTES):
    """Metadata from its bytes, as read_metadata gives it; `path` names the file in errors."""
    if len(data) > max_bytes:
        raise BadCaption(path, "metadata is not valid JSON", f"over {max_bytes} bytes")
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8; RecursionError, deep nesting
        raise BadCaption(path, "metadata is not valid JSON", str(e)[:120]) from None
    if not isinstance(meta, dict):
        raise BadCaption(path, "metadata is not valid JSON", f"a {type(meta).__name__}, not an object")
    return meta


def caption_from_metadata(meta, field, path):
    """The caption in metadata field `field` (of the file `path`), cut and cleaned as read_caption does.

    Raises BadCaption naming the file if the field is absent or not a string, or empty once cleaned.
    """
    value = meta.get(field)
    if not isinstance(value, str):
        detail = "" if value is None else f"a {type(value).__name__}, not a string"
        raise BadCaption(path, f"no '{field}' caption in metadata", detail)
    caption = clean_caption(value[:MAX_CAPTION_BYTES])
    if not caption:
        raise BadCaption(path, "caption is empty", f"in '{field}'")
    return caption


# ----------------------------------------------------------------------------------------------------
# The dataset and its batches


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Every `key.<image ext>` in `root`, each with its caption in `key.txt` beside it.

    Captions (and metadata, when `key.json` exists) are read when the dataset is built, so a bad
    caption is reported (or, with skip_bad, known) before training starts; images are decoded on
    access. The module docstring lists what happens to each kind of bad file.

    :param root: the folder.
    :param image_size: side of the square crops returned.
    :param keys: optional subset (and order) of keys to use.
    :param caption_field: read the caption from this metadata field instead of `key.txt`
        (quality-tuning uses the curated, accurate captions).
    :param skip_bad: a sample that cannot be used (its image, caption or metadata is bad) comes back
        as a Skipped item, which `collate` leaves out of the batch and lists in `batch.skipped`,
        instead of raising BadImage or BadCaption. Training on web data wants this: one broken file
        in a billion must not stop it.

    `skipped` maps the index of every sample known to be unusable to its Skipped item: the bad
    captions and metadata met when the dataset was built, and the bad images load_all met. (Images
    decoded by __getitem__, maybe in a loader worker, are not entered: batches report those.)
    """

    def __init__(self, root, image_size, keys=None, caption_field=None, skip_bad=False):
        if not os.path.isdir(root):
            raise EmuError(f"{root}: data folder not found")
        self.root, self.image_size, self.skip_bad = root, image_size, skip_bad
        images = {}
        for name in sorted(os.listdir(root)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                images[stem] = name
        self.keys = list(keys) if keys is not None else [k for k in images]
        if not self.keys:
            raise EmuError(f"{root}: no images found (expected key.png/.jpg with key.txt beside it)")
        missing = [k for k in self.keys if k not in images]
        if missing:
            raise EmuError(f"{os.path.join(root, missing[0])}: image file not found")
        self.files = [os.path.join(root, images[k]) for k in self.keys]
        self.captions, self.meta, self.skipped = [], [], {}  # a skipped sample's caption is None, its metadata {}
        for i, key in enumerate(self.keys):
            stem = os.path.join(root, key)
            try:
                meta = read_metadata(stem + ".json")
                if caption_field is None:
                    caption = read_caption(stem + ".txt")
                else:
                    caption = caption_from_metadata(meta, caption_field, stem + ".json")
            except BadCaption as e:
                if not skip_bad:
                    raise
                caption, meta, self.skipped[i] = None, {}, Skipped(e.path, e.reason)
            self.captions.append(caption)
            self.meta.append(meta)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if self.captions[i] is None:  # its caption or metadata is bad (skip_bad)
            return self.skipped[i % len(self)]
        try:
            return load_image(self.files[i], self.image_size), self.captions[i]
        except BadImage as e:
            if not self.skip_bad:
                raise
            return Skipped(e.path, e.reason)

    def load_all(self, start=0, stop=None):
        """Images start..stop (default: all) as one (N, 3, H, W) tensor, for small sets and filters.

        With skip_bad, unusable samples are left out, so N may be smaller (even 0), and entered in
        `skipped`: a caller counts them there, and lines the images up with keys and captions.
        """
        images = []
        for i in range(len(self))[start:stop]:
            item = self[i]
            if isinstance(item, Skipped):
                self.skipped[i] = item
            else:
                images.append(item[0])
        return torch.stack(images) if images else torch.empty(0, 3, self.image_size, self.image_size)


class Skipped(NamedTuple):
    """What ImageCaptionFolder(skip_bad=True) returns for a sample it cannot use: the bad file (its
    image, key.txt or key.json) and the reason, a short category such as "caption is empty"."""
    path: str
    reason: str


class Batch(tuple):
    """(images (B, 3, H, W), captions) and, as `.skipped`, the Skipped items left out of it; `.source`
    is (stream, where that stream stands after it) for a batch of a tar-shard stream (emu/datasets/shards.py),
    else None."""

    def __new__(cls, images, captions, skipped=(), source=None):
        batch = super().__new__(cls, (images, captions))
        batch.skipped, batch.source = list(skipped), source
        return batch

    def __reduce__(self):  # keeps the attributes when a loader worker sends the batch to the main process
        return Batch, (self[0], self[1], self.skipped, self.source)


class SkipLog(dict):
    """The unusable samples met so far, {file: reason}; the first `show` are printed as they are met.

    A plain dict to everything else: save dict(log) in a checkpoint, update() it on resume.
    """

    def __init__(self, show=10):
        super().__init__()
        self.show = show

    def note(self, skipped):
        """Enter Skipped items (a batch's .skipped), each file once."""
        for item in skipped:
            if item.path not in self:
                self[item.path] = item.reason
                if len(self) <= self.show:
                    print(f"skipping {item.path}: {item.reason}" + (" (further ones are only counted)" if len(self) == self.show else ""))

    def summary(self):
        """One line: how many unusable samples were left out, by reason."""
        if not self:
            return "no unusable samples"
        by_reason = Counter(self.values()).most_common()
        return f"skipped {len(self)} unusable samples (" + ", ".join(f"{r}: {n}" for r, n in by_reason) + ")"


def collate(items):
    """(image, caption) items -> Batch(images (B, 3, H, W), list of captions); Skipped items are
    left out and listed in `.skipped`, so a batch may be smaller than asked (or empty: B = 0)."""
    good = [item for item in items if not isinstance(item, Skipped)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    if not good:
        return Batch(torch.empty(0), [], skipped)
    images, captions = zip(*good)
    return Batch(torch.stack(images), list(captions), skipped)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of indices in a fresh seeded permutation each epoch, starting at any step.

    Epoch e's order depends only on (seed, e), so a run resumed at step s reads exactly the batches
    an uninterrupted run would have read from step s on. The last incomplete batch is dropped.
    In a world of several ranks, `batch_size` is the global batch and rank r reads every
    world_size-th index of it, from the r-th on.

    A set smaller than one batch is an error, unless `repeat=True` (quality-tuning on a handful of
    images keeps the paper's batch of 64): then batch s is ceil(batch_size / n) whole epochs'
    permutations, s * k to s * k + k - 1, joined and cut to batch_size, so every example appears
    floor or ceil(batch_size / n) times in it.
    """

    def __init__(self, n, batch_size, seed, start_step=0, rank=0, world_size=1, repeat=False):
        if n < batch_size and not (repeat and n > 0):
            raise EmuError(f"only {n} examples for batch size {batch_size}: lower --bs or add data")
        if batch_size % world_size:
            raise EmuError(f"batch size {batch_size} does not split over {world_size} ranks")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // batch_size

    def permutation(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __iter__(self):
        step = self.start_step
        while True:
            if self.per_epoch:
                epoch, i = divmod(step, self.per_epoch)
                batch = self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
            else:  # fewer examples than a batch: whole epochs, joined
                k = -(-self.batch_size // self.n)
                batch = torch.cat([self.permutation(step * k + j) for j in range(k)])[:self.batch_size]
            yield batch[self.rank::self.world_size].tolist()
            step += 1


# ----------------------------------------------------------------------------------------------------
# Prompts and image files


def read_prompts(path):
    """Prompts from a file, as (prompt, category) pairs.

    A `.tsv` file is read in PartiPrompts' format: a header row naming a `Prompt` column (and
    optionally `Category`; `Challenge` and `Note` are read past), fields split at tabs with no
    quoting, so a prompt may hold quotes; any other file is one prompt per line, blank lines skipped.
    A byte-order mark and Windows line ends are accepted.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise EmuError(f"{path}: prompt file not found") from None
    except UnicodeDecodeError:
        raise EmuError(f"{path}: prompt file is not valid UTF-8 text") from None
    if path.endswith(".tsv"):
        header = lines[0].split("\t") if lines else []
        if "Prompt" not in header:
            raise EmuError(f"{path}: TSV prompt file needs a header row with a 'Prompt' column")
        col, cat = header.index("Prompt"), header.index("Category") if "Category" in header else None
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        prompts = [(r[col].strip(), r[cat].strip() if cat is not None and cat < len(r) else "") for r in rows if col < len(r)]
    else:
        prompts = [(line.strip(), "") for line in lines if line.strip()]
    if not prompts or any(not p for p, _ in prompts):
        raise EmuError(f"{path}: no prompts, or an empty prompt")
    return prompts


def save_png(path, image, metadata=None):
    """Write an (H, W, 3) uint8 image as PNG, with `metadata` (str -> str) as PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, str(v))
    Image.fromarray(image).save(path, pnginfo=info)


def make_grid(images, ncol):
    """Tile (N, H, W, 3) uint8 images into one (rows*H, ncol*W, 3) image, padding with black."""
    n, h, w, c = images.shape
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * h, ncol * w, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncol)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
    return grid
