"""The curation funnel: a few thousand photogenic needles from a haystack, with provenance.

The paper (emu_paper.txt, section 3.3) narrows billions of images to 2000 in stages. Automatic
filters come first, in this order:

    offensive    captions with a blocklisted word; optionally images an unsafe-content head flags
    aesthetic    an aesthetic score (a small head on CLIP image embeddings) below a threshold
    text         too much text in the image (a word-count proxy for OCR, emu/curation/filters.py)
    clip         a CLIP image-text score below a threshold (the caption does not describe the image)
    size         a short side below the minimum, or an aspect ratio beyond the maximum
    balance      visual-concept balancing: cluster the CLIP image embeddings, cap each cluster
    popularity   fewer likes than a threshold, read from the image's metadata when it has some

which took the paper from billions to 200K. Then people: generalists for recall (20K), specialists
for precision (2000), who also write the captions. Each stage is on only when its flag is given.

Everything is kept in `curation.sqlite` in the output folder:

    images      every image of the haystack: key, file, caption, size, likes, or why it is unusable
    scores      every measurement made (aesthetic, text words, CLIP score...), one row per image and name
    embeddings  CLIP image embeddings, float32
    decisions   for every image and every stage it reached: kept or not, and why

The measurements are the slow part and are stored as they are made, a chunk per transaction, so an
interrupted run continues where it stopped and never measures an image twice. The decisions are cheap
and are made again from the stored scores on every run, so a threshold can change between runs.
`why(key)` answers "why was this image dropped?" from the decisions.
"""
import hashlib
import json
import os
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from emu import EmuError
from emu.curation.filters import balance_clusters, kmeans, text_word_count
from emu.curation.heads import load_head
from emu.datasets.folders import (IMAGE_EXTENSIONS, BadCaption, BadImage, open_rgb, read_caption, read_metadata,
                                  square_tensor)
from emu.text.cache import hash_tower
from emu.text.clip import clip_clean, clip_preprocess, load_clip_text, load_clip_vision
from emu.text.hf import tokenize

STORE_FILE = "curation.sqlite"
AUTOMATIC_STAGES = ("offensive", "aesthetic", "text", "clip", "size", "balance", "popularity")
HUMAN_STAGES = ("generalists", "specialists", "captions")  # emu/curation/people.py
FUNNEL_ORDER = ("usable", *AUTOMATIC_STAGES, *HUMAN_STAGES)
CHUNK = 256  # images measured per transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (key TEXT PRIMARY KEY, file TEXT NOT NULL, stamp TEXT NOT NULL, caption TEXT, width INTEGER,
                                   height INTEGER, likes INTEGER, unusable TEXT);
CREATE TABLE IF NOT EXISTS scores (key TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (key, name));
CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (key TEXT NOT NULL, stage TEXT NOT NULL, kept INTEGER NOT NULL, why TEXT NOT NULL,
                                      PRIMARY KEY (key, stage));
"""


@dataclass
class FunnelConfig:
    """The automatic stages' thresholds; None turns a stage off."""
    blocklist: tuple = None         # offensive: lower-case words; a caption holding one is dropped
    unsafe_head: str = None         # offensive: a head (safetensors) on CLIP image embeddings, probability of unsafe
    unsafe_max: float = 0.5
    aesthetic_head: str = None      # aesthetic: a head trained by train_aesthetic_head
    aesthetic_min: float = None
    text_max_words: float = None    # text: the most words the proxy may find
    clip_min: float = None          # clip: the least cosine between image and caption embeddings
    min_size: int = None            # size: the shorter side, pixels
    max_aspect: float = None        # size: the longer side over the shorter
    clusters: int = None            # balance: k-means clusters of the image embeddings...
    per_cluster: int = None         # ...and how many (the most aesthetic) each may keep
    min_likes: int = None           # popularity
    seed: int = 0

    def enabled(self, stage):
        return {"offensive": self.blocklist is not None or self.unsafe_head is not None,
                "aesthetic": self.aesthetic_min is not None, "text": self.text_max_words is not None,
                "clip": self.clip_min is not None, "size": self.min_size is not None or self.max_aspect is not None,
                "balance": self.clusters is not None, "popularity": self.min_likes is not None}[stage]


# -----------------------------------------------------------------------------
# the store

def open_store(folder):
    os.makedirs(folder, exist_ok=True)
    conn = sqlite3.connect(os.path.join(folder, STORE_FILE), timeout=30.0)
    conn.executescript(SCHEMA)
    return conn


def register_images(conn, data_dir):
    """Enter every image of a folder (key.png + key.txt [+ key.json]) that the store does not yet hold.

    Only the header of each image is read here (its size); an image that cannot be used is entered
    with the reason, so the funnel accounts for every file. An image whose file changed (size or
    modification time) since it was entered is entered afresh: its measurements are forgotten.
    """
    if not os.path.isdir(data_dir):
        raise EmuError(f"{data_dir}: data folder not found")
    known = dict(conn.execute("SELECT key, stamp FROM images"))
    rows = []
    for name in sorted(os.listdir(data_dir)):
        key, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        path, stem = os.path.abspath(os.path.join(data_dir, name)), os.path.join(data_dir, key)
        stat = os.stat(path)
        stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        if known.get(key) == stamp:
            continue
        caption = width = height = likes = unusable = None
        try:
            meta = read_metadata(stem + ".json")
            caption = read_caption(stem + ".txt")
            likes = meta.get("likes") if isinstance(meta.get("likes"), int) else None
            with Image.open(path) as im:
                width, height = im.size
        except BadCaption as e:
            unusable = f"caption: {e.reason}"
        except Exception as e:  # an unreadable image header; decoding would fail too
            unusable = f"image: {type(e).__name__}"
        rows.append((key, path, stamp, caption, width, height, likes, unusable))
    with conn:
        for table in ("scores", "embeddings"):
            conn.executemany(f"DELETE FROM {table} WHERE key = ?", [(r[0],) for r in rows if r[0] in known])
        conn.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def head_fingerprint(path):
    """A short hash of a head file's bytes (or of a safety checker's folder): scores made by one head
    are never read as another's."""
    if os.path.isdir(path):
        digest = hashlib.sha256(b"emu curation: safety checker\n")
        hash_tower(digest, path, tokenizer=False)
        return digest.hexdigest()[:16]
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except FileNotFoundError:
        raise EmuError(f"{path}: head not found") from None


def check_clip(conn, clip_dir):
    """Forget the embeddings and CLIP-based scores made with another CLIP than `clip_dir`."""
    digest = hashlib.sha256(b"emu curation: CLIP image and text towers\n")
    hash_tower(digest, clip_dir, tokenizer=False)  # an image tower alone (a safety checker's) has none
    fingerprint = digest.hexdigest()
    row = conn.execute("SELECT value FROM meta WHERE key = 'clip'").fetchone()
    if row is not None and row[0] != fingerprint:
        print(f"{clip_dir}: a different CLIP from the one the store's embeddings came from; measuring again")
        with conn:
            conn.execute("DELETE FROM embeddings")
            conn.execute("DELETE FROM scores WHERE name = 'clip' OR name LIKE 'aesthetic %' OR name LIKE 'unsafe %'")
    with conn:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('clip', ?)", (fingerprint,))


def cached_scores(conn, name, keys):
    """{key: value} of one measurement for those keys that have it."""
    want = set(keys)
    return {k: v for k, v in conn.execute("SELECT key, value FROM scores WHERE name = ?", (name,)) if k in want}


def cached_embeddings(conn, keys):
    want = set(keys)
    return {k: np.frombuffer(v, dtype=np.float32).copy() for k, v in conn.execute("SELECT key, vector FROM embeddings") if k in want}


# -----------------------------------------------------------------------------
# measurements: made once per image, stored a chunk at a time

class Measurer:
    """Loads the images and the towers on first need and fills the store's scores and embeddings."""

    def __init__(self, conn, clip_dir, image_size=224, device="cpu"):
        self.conn, self.clip_dir, self.image_size, self.device = conn, clip_dir, image_size, device
        self.vision = self.text = self.tokenizer = None
        self.clip_checked = False
        self.files = dict(conn.execute("SELECT key, file FROM images"))
        self.measured = 0  # images measured in this run (the rest came from the store)

    def load_images(self, keys):
        """(RGB PIL images, keys) for the images that decode; the others are marked unusable."""
        images, good = [], []
        for key in keys:
            try:
                images.append(open_rgb(self.files[key]))
                good.append(key)
            except BadImage as e:
                with self.conn:
                    self.conn.execute("UPDATE images SET unusable = ? WHERE key = ?", (f"image: {e.reason}", key))
        return images, good

    def ensure_clip(self):
        """Before reading anything made with CLIP: forget it if it was made with another CLIP."""
        if not self.clip_checked:
            check_clip(self.conn, self.clip_dir)
            self.clip_checked = True

    @torch.no_grad()
    def embed(self, keys):
        """CLIP image embeddings for every key, computing the missing ones."""
        self.ensure_clip()
        have = cached_embeddings(self.conn, keys)
        missing = [k for k in keys if k not in have]
        for i in range(0, len(missing), CHUNK):
            if self.vision is None:
                self.vision = load_clip_vision(self.clip_dir, dtype=torch.float32, device=self.device)
            images, good = self.load_images(missing[i:i + CHUNK])
            if not good:
                continue
            size = self.vision.config.image_size
            pixels = torch.stack([square_tensor(im, size) for im in images]).to(self.device)
            _, emb = self.vision(clip_preprocess(pixels, size))  # (B, projection_dim)
            with self.conn:
                self.conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                                      [(k, e.astype(np.float32).tobytes()) for k, e in zip(good, emb.float().cpu().numpy())])
            self.measured += len(good)
            have.update(cached_embeddings(self.conn, good))
        return have

    def score(self, name, keys, measure):
        """{key: value} of one measurement, computing the missing ones with measure(keys) -> {key: value}."""
        have = cached_scores(self.conn, name, keys)
        missing = [k for k in keys if k not in have]
        for i in range(0, len(missing), CHUNK):
            values = measure(missing[i:i + CHUNK])
            with self.conn:
                self.conn.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)",
                                      [(k, name, float(v)) for k, v in values.items()])
            have.update(values)
        return have

    def head_scores(self, name, keys, head, squash=False):
        self.ensure_clip()
        def measure(chunk):
            emb = self.embed(chunk)
            good = [k for k in chunk if k in emb]
            if not good:
                return {}
            out = head(torch.from_numpy(np.stack([emb[k] for k in good])))
            return dict(zip(good, (torch.sigmoid(out) if squash else out).tolist()))
        return self.score(name, keys, measure)

    def text_words(self, keys):
        def measure(chunk):
            images, good = self.load_images(chunk)
            for im in images:  # the proxy looks for glyph-sized marks: measure at most 512 px on the long side
                im.thumbnail((512, 512))
            return {k: float(text_word_count(np.asarray(im)[None])[0]) for k, im in zip(good, images)}
        return self.score("text_words", keys, measure)

    @torch.no_grad()
    def clip_scores(self, keys):
        """Cosine similarity of each image's CLIP embedding with its caption's."""
        self.ensure_clip()
        captions = dict(self.conn.execute("SELECT key, caption FROM images"))

        def measure(chunk):
            emb = self.embed(chunk)
            good = [k for k in chunk if k in emb]
            if not good:
                return {}
            if self.text is None:
                self.text, self.tokenizer = load_clip_text(self.clip_dir, dtype=torch.float32, device=self.device)
            ids, _ = tokenize(self.tokenizer, [captions[k] for k in good], self.device, clean=clip_clean)
            _, text_emb = self.text(ids)  # (B, projection_dim)
            image_emb = torch.from_numpy(np.stack([emb[k] for k in good]))
            cos = nn.functional.cosine_similarity(image_emb, text_emb.float().cpu(), dim=-1)
            return dict(zip(good, cos.tolist()))
        return self.score("clip", keys, measure)


# -----------------------------------------------------------------------------
# the automatic stages: each takes the keys that reached it and returns {key: (kept, why)}

def decide_offensive(keys, cfg, m, captions):
    words = {w.lower() for w in (cfg.blocklist or ())}
    head = load_head(cfg.unsafe_head) if cfg.unsafe_head else None
    checker = getattr(head, "gives_probability", False)  # Stable Diffusion's safety checker: a verdict, not a logit
    unsafe = (m.head_scores(f"unsafe {head_fingerprint(cfg.unsafe_head)}", keys, head, squash=not checker)
              if head is not None else {})
    out = {}
    for k in keys:
        hit = sorted(words & set(clip_clean(captions[k]).lower().replace(",", " ").replace(".", " ").split()))
        if hit:
            out[k] = (False, f"caption has blocklisted word {hit[0]!r}")
        elif cfg.unsafe_head and k in unsafe and unsafe[k] > cfg.unsafe_max:
            out[k] = (False, "flagged by the safety checker's concepts" if checker
                      else f"unsafe probability {unsafe[k]:.2f} > {cfg.unsafe_max}")
        else:
            out[k] = (True, "caption clean" + (f", unsafe probability {unsafe[k]:.2f}" if k in unsafe else ""))
    return out


def decide_threshold(scores, keys, threshold, name, keep_above=True):
    """Keep an image whose score is on the right side of the threshold; one without a score failed to decode."""
    out = {}
    for k in keys:
        if k not in scores:
            out[k] = (False, f"{name}: image could not be measured")
        elif (scores[k] >= threshold) if keep_above else (scores[k] <= threshold):
            out[k] = (True, f"{name} {scores[k]:.3f} {'>=' if keep_above else '<='} {threshold}")
        else:
            out[k] = (False, f"{name} {scores[k]:.3f} {'<' if keep_above else '>'} {threshold}")
    return out


def decide_size(keys, cfg, sizes):
    out = {}
    for k in keys:
        w, h = sizes[k]
        short, aspect = min(w, h), max(w, h) / max(1, min(w, h))
        if cfg.min_size is not None and short < cfg.min_size:
            out[k] = (False, f"{w}x{h}: shorter side {short} < {cfg.min_size}")
        elif cfg.max_aspect is not None and aspect > cfg.max_aspect:
            out[k] = (False, f"{w}x{h}: aspect ratio {aspect:.2f} > {cfg.max_aspect}")
        else:
            out[k] = (True, f"{w}x{h}")
    return out


def decide_balance(keys, cfg, m, aesthetic):
    """k-means on the image embeddings; each cluster keeps its `per_cluster` most aesthetic images
    (by the aesthetic head when there is one, otherwise in key order)."""
    emb = m.embed(keys)
    good = [k for k in keys if k in emb]
    out = {k: (False, "balance: image could not be embedded") for k in keys if k not in emb}
    if not good:
        return out
    _, assignment = kmeans(torch.from_numpy(np.stack([emb[k] for k in good])), cfg.clusters, seed=cfg.seed)
    score = torch.tensor([aesthetic.get(k, 0.0) for k in good])
    keep = balance_clusters(assignment, score, cfg.per_cluster)
    sizes = torch.bincount(assignment, minlength=cfg.clusters)
    for k, c, kept in zip(good, assignment.tolist(), keep.tolist()):
        out[k] = (bool(kept), f"cluster {c} of {cfg.clusters} ({sizes[c]} images): "
                              + ("within" if kept else "beyond") + f" its cap of {cfg.per_cluster}")
    return out


def decide_popularity(keys, cfg, likes):
    out = {}
    for k in keys:
        if likes[k] is None:
            out[k] = (True, "no likes in its metadata")
        else:
            out[k] = (likes[k] >= cfg.min_likes, f"{likes[k]} likes {'>=' if likes[k] >= cfg.min_likes else '<'} {cfg.min_likes}")
    return out


def run_automatic(conn, cfg, clip_dir, device="cpu"):
    """Run every enabled automatic stage in the paper's order; returns the keys that passed them all."""
    m = Measurer(conn, clip_dir, device=device)
    rows = conn.execute("SELECT key, caption, width, height, likes, unusable FROM images ORDER BY key").fetchall()
    captions = {k: c for k, c, *_ in rows}
    sizes = {k: (w, h) for k, _, w, h, _, _ in rows}
    likes = {k: n for k, _, _, _, n, _ in rows}
    with conn:
        conn.execute("DELETE FROM decisions WHERE stage IN (%s)" % ",".join("?" * (len(AUTOMATIC_STAGES) + 1)),
                     ("usable", *AUTOMATIC_STAGES))
        conn.executemany("INSERT INTO decisions VALUES (?, 'usable', ?, ?)",
                         [(k, int(u is None), u or "readable") for k, *_, u in rows])
    survivors = [k for k, *_, u in rows if u is None]
    aesthetic = {}
    for stage in AUTOMATIC_STAGES:
        if not cfg.enabled(stage):
            continue
        if stage == "offensive":
            out = decide_offensive(survivors, cfg, m, captions)
        elif stage == "aesthetic":
            if cfg.aesthetic_head is None:
                raise EmuError("the aesthetic stage needs --aesthetic-head (train one with `data/curate.py train-aesthetic`)")
            aesthetic = m.head_scores(f"aesthetic {head_fingerprint(cfg.aesthetic_head)}", survivors, load_head(cfg.aesthetic_head))
            out = decide_threshold(aesthetic, survivors, cfg.aesthetic_min, "aesthetic score")
        elif stage == "text":
            out = decide_threshold(m.text_words(survivors), survivors, cfg.text_max_words, "text words", keep_above=False)
        elif stage == "clip":
            out = decide_threshold(m.clip_scores(survivors), survivors, cfg.clip_min, "CLIP score")
        elif stage == "size":
            out = decide_size(survivors, cfg, sizes)
        elif stage == "balance":
            out = decide_balance(survivors, cfg, m, aesthetic)
        else:
            out = decide_popularity(survivors, cfg, likes)
        with conn:
            conn.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?)", [(k, stage, int(kept), why) for k, (kept, why) in out.items()])
        survivors = [k for k in survivors if out[k][0]]
    return survivors, m.measured


# -----------------------------------------------------------------------------
# reading the funnel back

def stage_order(conn):
    """The stages that made decisions, in funnel order."""
    present = {s for (s,) in conn.execute("SELECT DISTINCT stage FROM decisions")}
    return [s for s in FUNNEL_ORDER if s in present]


def why(conn, key):
    """Every decision about one image, in funnel order: [(stage, kept, why)], and a one-line verdict."""
    if conn.execute("SELECT 1 FROM images WHERE key = ?", (key,)).fetchone() is None:
        raise EmuError(f"{key}: not in the curation store")
    decided = {s: (bool(k), w) for s, k, w in conn.execute("SELECT stage, kept, why FROM decisions WHERE key = ?", (key,))}
    path = [(s, *decided[s]) for s in stage_order(conn) if s in decided]
    dropped = [p for p in path if not p[1]]
    verdict = f"dropped at {dropped[0][0]}: {dropped[0][2]}" if dropped else "kept by every stage it reached"
    return path, verdict


def summary(conn):
    """[(stage, images in, images kept)] in funnel order: each stage's input is the previous one's output."""
    rows = []
    for stage in stage_order(conn):
        n_in, n_kept = conn.execute("SELECT COUNT(*), COALESCE(SUM(kept), 0) FROM decisions WHERE stage = ?", (stage,)).fetchone()
        rows.append((stage, n_in, n_kept))
    return rows


def bicubic(image, size, caption):
    """The plain way to enlarge an image (the caption is not needed)."""
    return image.resize(size, Image.BICUBIC)


bicubic.description = "bicubic"


def export_curated(conn, keys, out_dir, captions=None, target_size=None, upsampler=bicubic):
    """Write the kept images with their captions and provenance into a folder qtune.py reads.

    :param captions: {key: caption} written by people; the others keep the haystack's caption.
    :param target_size: an image whose shorter side is below it is upsampled to it and marked so in
        its key.json.
    :param upsampler: upsampler(PIL image, (width, height), caption) -> PIL image of that size, with a
        `description` for the record: bicubic, or the pixel diffusion upsampler the paper used
        (emu.pipeline.DiffusionUpsampler).
    The folder is written beside the old one and swapped in, so it never holds a mix of two runs.
    """
    captions = captions or {}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for key in keys:
        file, caption = conn.execute("SELECT file, caption FROM images WHERE key = ?", (key,)).fetchone()
        path, _ = why(conn, key)
        record = {"source": file, "caption_by": "person" if key in captions else "haystack",
                  "funnel": [{"stage": s, "kept": k, "why": w} for s, k, w in path]}
        with Image.open(file) as im:
            short = min(im.size)
            if target_size and short < target_size:
                scale = target_size / short
                size = (round(im.width * scale), round(im.height * scale))
                upsampler(open_rgb(file), size, captions.get(key, caption)).save(os.path.join(tmp, key + ".png"))
                record["upsampled"] = f"{upsampler.description} from {im.width}x{im.height} to {size[0]}x{size[1]}"
            else:
                shutil.copyfile(file, os.path.join(tmp, key + os.path.splitext(file)[1].lower()))
        with open(os.path.join(tmp, key + ".txt"), "w", encoding="utf-8") as f:
            f.write(captions.get(key, caption) + "\n")
        with open(os.path.join(tmp, key + ".json"), "w") as f:
            json.dump(record, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def read_store(folder):
    path = os.path.join(folder, STORE_FILE)
    if not os.path.isfile(path):
        raise EmuError(f"{path}: no curation store here")
    return closing(open_store(folder))
