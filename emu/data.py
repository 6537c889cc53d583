"""Image-caption data: a folder of `key.<image>` + `key.txt` (+ optional `key.json`) pairs.

This is the img2dataset / WebDataset naming, unpacked into a folder; the toy world is written in
the same layout, so the toy pipeline and a real one read data through the same code.
Images come out as float tensors in [-1, 1], resized on the short side and centre-cropped.
"""
import json
import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from emu import EmuError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


# Larger images are refused from their header, before any pixel is decoded: a few-kB PNG can claim
# 100000 x 100000 pixels (a "decompression bomb") and would take tens of GB to decode. 2**26 pixels is
# 8192 x 8192, above any photo a text-to-image dataset keeps.
MAX_PIXELS = 2 ** 26


class BadImage(EmuError):
    """An image file that cannot be used. `reason` is a short category, for counting skipped files."""

    def __init__(self, path, reason, detail=""):
        unreadable = reason in ("empty file", "unknown format", "truncated or corrupt")
        super().__init__(f"{path}: {'not a readable image: ' if unreadable else ''}{reason}" + (f" ({detail})" if detail else ""))
        self.path, self.reason = path, reason


def open_rgb(path, max_pixels=MAX_PIXELS):
    """Decode an image file to an 8-bit RGB PIL image, whatever it holds.

    - EXIF orientation is applied, so a photo taken sideways comes out upright;
    - transparency (RGBA, LA, palette with a transparent colour) is laid over white;
    - 16-bit images are scaled to 8 bits, not clipped;
    - CMYK, grayscale and palette images are converted; an animated image gives its first frame.
    Raises BadImage for a missing, empty, truncated or unknown file, or one over `max_pixels`.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage(path, "empty file")
        with Image.open(path) as im:
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


def load_image(path, size, max_pixels=MAX_PIXELS):
    """Read an image file as a (3, size, size) float tensor in [-1, 1] (see open_rgb for the formats).

    Resizes the shorter side to `size` (bicubic) and crops the centre square.
    Raises BadImage naming the file if it cannot be used.
    """
    im = open_rgb(path, max_pixels)
    w, h = im.size
    scale = size / min(w, h)
    if scale != 1.0:
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def to_uint8(images):
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8 numpy array."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def read_caption(path):
    """Read a caption file; EmuError naming the file if it is missing, undecodable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = " ".join(f.read().split())
    except FileNotFoundError:
        raise EmuError(f"{path}: caption file not found") from None
    except UnicodeDecodeError:
        raise EmuError(f"{path}: caption is not valid UTF-8 text") from None
    if not text:
        raise EmuError(f"{path}: caption is empty")
    return text


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Every `key.<image ext>` in `root`, each with its caption in `key.txt` beside it.

    Captions (and metadata, when `key.json` exists) are read when the dataset is built, so an empty
    or missing caption is reported before training starts; images are decoded on access.

    :param root: the folder.
    :param image_size: side of the square crops returned.
    :param keys: optional subset (and order) of keys to use.
    :param caption_field: read the caption from this metadata field instead of `key.txt`
        (quality-tuning uses the curated, accurate captions).
    :param skip_bad: an image that cannot be used (see open_rgb) comes back as a Skipped item,
        which `collate` leaves out of the batch and lists in `batch.skipped`, instead of raising
        BadImage. Training on web data wants this: one broken file in a billion must not stop it.
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
        self.meta = [self._read_meta(k) for k in self.keys]
        if caption_field is None:
            self.captions = [read_caption(os.path.join(root, k + ".txt")) for k in self.keys]
        else:
            self.captions = [self._caption_from_meta(k, m, caption_field) for k, m in zip(self.keys, self.meta)]

    def _read_meta(self, key):
        path = os.path.join(self.root, key + ".json")
        if not os.path.exists(path):
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise EmuError(f"{path}: metadata is not valid JSON ({str(e)[:120]})") from None

    def _caption_from_meta(self, key, meta, field):
        text = " ".join(str(meta.get(field, "")).split())
        if not text:
            raise EmuError(f"{os.path.join(self.root, key + '.json')}: no '{field}' caption in metadata")
        return text

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        try:
            return load_image(self.files[i], self.image_size), self.captions[i]
        except BadImage as e:
            if not self.skip_bad:
                raise
            return Skipped(e.path, e.reason)

    def load_all(self, start=0, stop=None):
        """Images start..stop (default: all) as one (N, 3, H, W) tensor, for small sets and filters."""
        return torch.stack([load_image(f, self.image_size) for f in self.files[start:stop]])


class Skipped(NamedTuple):
    """What ImageCaptionFolder(skip_bad=True) returns for an image it cannot use."""
    path: str
    reason: str


class Batch(tuple):
    """(images (B, 3, H, W), captions) and, as `.skipped`, the Skipped items left out of it."""

    def __new__(cls, images, captions, skipped=()):
        batch = super().__new__(cls, (images, captions))
        batch.skipped = list(skipped)
        return batch

    def __reduce__(self):  # keeps .skipped when a loader worker sends the batch to the main process
        return Batch, (self[0], self[1], self.skipped)


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
    """

    def __init__(self, n, batch_size, seed, start_step=0):
        if n < batch_size:
            raise EmuError(f"only {n} examples for batch size {batch_size}: lower --bs or add data")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.per_epoch = n // batch_size

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, i = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            step += 1


def read_prompts(path):
    """Prompts from a file, as (prompt, category) pairs.

    A `.tsv` file is read in PartiPrompts' format: a header row naming a `Prompt` column (and
    optionally `Category`); any other file is one prompt per line, blank lines skipped.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
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
