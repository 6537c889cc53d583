"""Caption embeddings computed once and read back, so training can run without the text towers.

The towers are frozen, so a caption's embedding never changes, and T5-XXL (4.8B parameters) is the
costliest part of a training step that encodes its captions. data/embed_captions.py runs the towers
over every caption of a dataset once and writes the results here; pretrain.py and qtune.py take
`--text-cache DIR` and read them through the same encode() a TextEncoder offers.

A cache directory holds:

    manifest.json             the towers' fingerprint and directories, dims, sequence lengths, dtype,
                              and the shard files in the order they were written
    shard-00000.safetensors   N captions, row i of every tensor belonging to caption i:
                                keys       (N, 32) uint8: sha256 of (fingerprint, caption)
                                clip       (N, Lc, Dc) all of CLIP's positions (it runs unmasked)
                                clip_mask  (N, Lc) bool
                                t5         (T, Dt) T5's real tokens only, caption after caption
                                t5_mask    (N, Lt) bool; caption i owns t5_mask[i].sum() rows of t5
                                pooled     (N, P)
                              and, in a cache made with Kandinsky 2.1's multilingual tower (--xlmr):
                                xlmr         (X, Dx) XLM-R's real tokens only, caption after caption
                                xlmr_mask    (N, Lx) bool
                                xlmr_vector  (N, Px) M-CLIP's projected vector

Tensors are stored in the dtype the towers ran in: the float32 that encode() returns for a bfloat16
tower holds bfloat16 values, so nothing is lost. encode() gives back exactly what TextEncoder.encode
gave (float32; same shapes, masks, CLIP padding and pooled vector) except at T5's padding positions,
which hold zeros instead of the tower's output there. Those positions are masked keys in every
cross-attention, so they get exactly zero weight and the U-Net's output is the same to the last bit;
storing them would cost all 77 of T5's positions per caption (T5-XXL: 4096 numbers each) for nothing.
XLM-R's tokens are stored, and read back, the same way.

A caption's embedding is the one it got in the batch it was computed in. Matrix kernels may round
differently for another batch size (on a CPU, e.g. CLIP's pooled vector for a batch of one or two), so
a fresh encode in another batch can differ in the last bits. The empty caption is computed alone, as
training asks for it (encode([""])).

Reading keeps an index in memory (a few hundred bytes per caption) and reads each caption's rows from
disk when asked, so the cache can be far larger than memory.
"""
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from emu import EmuError
from emu.checkpoint import SafetensorsFile, atomic_write, save_weights
from emu.text.encoder import TEXT_DTYPES, MultilingualTextEncoder, TextEmbedding, TextEncoder
from emu.text.hf import find_weight_files
from emu.text.t5 import T5_LENGTH
from emu.text.xlmr import XLMR_LENGTH

MANIFEST = "manifest.json"
KEY_BYTES = 32  # a sha256 digest
SAMPLES, SAMPLE_BYTES = 16, 2**16  # the pieces of each weight file a fingerprint reads

# ----------------------------------------------------------------------------------------------------
# Which towers, which caption


def tower_fingerprint(clip_dir, t5_dir, dtype=torch.bfloat16, t5_max_length=T5_LENGTH, xlmr_dir=None):
    """A sha256 hex digest naming these exact towers and how their embeddings were computed.

    It hashes each tower's config.json and tokenizer.json, every weight file's name, size and header
    (each tensor's name, dtype, shape and place), SAMPLES evenly spaced pieces of its data, plus the
    dtype and T5's padded length. Two different checkpoints of the same shapes differ in every
    sampled piece, so this tells them apart while reading about 1 MB per file, where hashing the
    published T5-XXL checkpoint whole (45 GB) would take minutes at every start. File names, not
    directories, go in, so a moved tower keeps its fingerprint. With `xlmr_dir` the multilingual tower
    is hashed after the other two.
    """
    digest = hashlib.sha256(f"emu text cache; dtype {str(dtype).removeprefix('torch.')}; "
                            f"t5 length {t5_max_length}\n".encode())
    for tower in (Path(clip_dir), Path(t5_dir)) + ((Path(xlmr_dir),) if xlmr_dir else ()):
        hash_tower(digest, tower)
    return digest.hexdigest()


def hash_tower(digest, tower, tokenizer=True):
    """Feed one Hugging Face model directory into `digest` (see tower_fingerprint for what is read).
    tokenizer=False: a tower without tokenizer.json (an image tower) is hashed without it."""
    tower = Path(tower)
    if not tower.is_dir():
        raise EmuError(f"{tower}: text tower directory not found")
    files, source = find_weight_files(tower)  # the single file, or the index and its shards
    hashed = [tower / "config.json", source]
    if tokenizer or (tower / "tokenizer.json").is_file():
        hashed.insert(1, tower / "tokenizer.json")
    for path in hashed:
        if not path.is_file():
            raise EmuError(f"{path}: not found")
        digest.update(f"{path.name} ".encode() + path.read_bytes())
    for weights in sorted({file.path: file for file in files.values()}.values(), key=lambda file: file.path.name):
        digest.update(f"{weights.path.name} {weights.size} {sorted(weights.entries.items())}\n".encode())
        with open(weights.path, "rb") as f:
            for i in range(SAMPLES):
                f.seek(weights.data_start + (weights.size - weights.data_start) * i // SAMPLES)
                digest.update(f.read(SAMPLE_BYTES))


def caption_key(fingerprint, caption):
    """The 32 bytes a caption's embedding is stored under."""
    return hashlib.sha256(f"{fingerprint}\n{caption}".encode()).digest()


# ----------------------------------------------------------------------------------------------------
# Reading


def read_manifest(path):
    """The parsed `path`/manifest.json, checked to have every entry the reader uses."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise EmuError(f"{path}: not a text-embedding cache (no {MANIFEST}; make one with data/embed_captions.py)")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EmuError(f"{file}: not valid JSON ({str(e)[:120]})") from None
    needed = ("fingerprint", "clip", "t5", "dtype", "clip_dim", "t5_dim", "pooled_dim", "clip_length",
              "t5_length", "captions", "shards")
    missing = [k for k in needed if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise EmuError(f"{file}: missing entries {missing}")
    if manifest["dtype"] not in TEXT_DTYPES:
        raise EmuError(f"{file}: dtype {manifest['dtype']!r} is not one of {sorted(TEXT_DTYPES)}")
    return manifest


class TextEmbeddingCache:
    """A cache directory, read like a TextEncoder: encode(captions) -> TextEmbedding, and the dims
    build_unet reads. Every shard's header is checked on opening; rows are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.fingerprint = m["fingerprint"]
        self.clip_dim, self.t5_dim, self.pooled_dim = m["clip_dim"], m["t5_dim"], m["pooled_dim"]
        self.has_xlmr = "xlmr" in m
        self.packed = ("t5", "xlmr") if self.has_xlmr else ("t5",)  # the towers stored by their real tokens alone
        self.shards = [SafetensorsFile(self.path / name) for name in m["shards"]]
        self.index = {}  # caption key -> (shard, row, {tower: (first row in its tokens, number of rows)})
        for shard in self.shards:
            self._check_shard(shard)
            keys = shard.read("keys").numpy().tobytes()
            spans = []
            for tower in self.packed:
                lengths = shard.read(tower + "_mask").sum(dim=1)  # (N,)
                spans.append(zip((lengths.cumsum(0) - lengths).tolist(), lengths.tolist()))
            for row, tokens in enumerate(zip(*spans)):
                self.index[keys[row * KEY_BYTES:(row + 1) * KEY_BYTES]] = (shard, row, dict(zip(self.packed, tokens)))

    def _check_shard(self, shard):
        """Check that a shard holds the six tensors (nine with XLM-R), shaped as the manifest says."""
        m = self.manifest
        names = {"keys", "clip", "clip_mask", "t5", "t5_mask", "pooled"}
        if self.has_xlmr:
            names |= {"xlmr", "xlmr_mask", "xlmr_vector"}
        if set(shard.entries) != names:
            raise shard.error(f"not a cache shard (tensors {sorted(shard.entries)})")
        n = shard.entries["keys"][1][0]
        expected = {"keys": (n, KEY_BYTES), "clip": (n, m["clip_length"], m["clip_dim"]), "clip_mask": (n, m["clip_length"]),
                    "t5_mask": (n, m["t5_length"]), "pooled": (n, m["pooled_dim"])}
        if self.has_xlmr:
            expected.update(xlmr_mask=(n, m["xlmr_length"]), xlmr_vector=(n, m["xlmr_vector_dim"]))
        for name, shape in expected.items():
            if shard.entries[name][1] != shape:
                raise shard.error(f"{name} has shape {list(shard.entries[name][1])}, expected {list(shape)} "
                                  f"(from {MANIFEST})")
        for tower in self.packed:
            if shard.entries[tower][1][1:] != (m[tower + "_dim"],):
                raise shard.error(f"{tower} has shape {list(shard.entries[tower][1])}, expected [tokens, {m[tower + '_dim']}]")

    def __len__(self):
        return len(self.index)

    def __contains__(self, caption):
        return caption_key(self.fingerprint, caption) in self.index

    def encode(self, captions):
        """The cached embeddings of a list of captions as a float32 TextEmbedding on the CPU, shaped
        and masked as TextEncoder.encode's (T5's padding positions hold zeros)."""
        rows = self._rows(captions)
        t5, t5_mask = self._unpack(rows, "t5")
        return TextEmbedding(clip=torch.stack([r["clip"] for r in rows]).float(), clip_mask=torch.stack([r["clip_mask"] for r in rows]),
                             t5=t5, t5_mask=t5_mask, pooled=torch.stack([r["pooled"] for r in rows]).float())

    def encode_multilingual(self, captions):
        """The cached XLM-R outputs of a list of captions, as emu.text.encoder.MultilingualTextEncoder.encode
        gives them: float32 states (B, Lx, Dx) (zeros at the padding), mask (B, Lx), vector (B, Px)."""
        if not self.has_xlmr:
            raise EmuError(f"{self.path}: made without a multilingual tower; make one with data/embed_captions.py --xlmr")
        rows = self._rows(captions)
        states, mask = self._unpack(rows, "xlmr")
        return states, mask, torch.stack([r["xlmr_vector"] for r in rows]).float()

    def multilingual(self):
        """This cache read like a MultilingualTextEncoder (what Kandinsky's decoder reads with --xlmr)."""
        return SimpleNamespace(encode=self.encode_multilingual, dim=self.manifest.get("xlmr_dim"),
                               vector_dim=self.manifest.get("xlmr_vector_dim"))

    def _rows(self, captions):
        if isinstance(captions, str) or len(captions) == 0:
            raise EmuError(f"captions must be a non-empty list of strings, got {captions!r:.80}")
        return [self._read(caption) for caption in captions]

    def _unpack(self, rows, tower):
        """A tower's stored real tokens back in place: (B, L, D) float32 with zeros at the padding, and the mask."""
        mask = torch.stack([r[tower + "_mask"] for r in rows])
        states = torch.zeros(len(rows), self.manifest[tower + "_length"], self.manifest[tower + "_dim"])
        states[mask] = torch.cat([r[tower] for r in rows]).float()  # row-major: caption after caption, as stored
        return states, mask

    def _read(self, caption):
        """One caption's stored rows: {clip (Lc, Dc), clip_mask (Lc,), t5 (n, Dt), t5_mask (Lt,), pooled (P,)}, and
        with XLM-R {xlmr (m, Dx), xlmr_mask (Lx,), xlmr_vector (Px,)}."""
        found = self.index.get(caption_key(self.fingerprint, caption))
        if found is None:
            raise EmuError(f"{self.path}: caption not in the cache: {caption!r:.80}; add it with data/embed_captions.py")
        shard, row, spans = found
        per_row = ["clip", "clip_mask", "t5_mask", "pooled"] + (["xlmr_mask", "xlmr_vector"] if self.has_xlmr else [])
        with open(shard.path, "rb", buffering=0) as f:  # one open for every read
            out = {name: shard.read_rows(name, row, row + 1, f)[0] for name in per_row}
            for tower, (start, length) in spans.items():
                out[tower] = shard.read_rows(tower, start, start + length, f)
        return out


def load_text_cache(path, clip_dir, t5_dir, dtype, xlmr_dir=None):
    """The cache in `path`, checked to have been made with the towers in clip_dir and t5_dir (and xlmr_dir,
    if given: Kandinsky's multilingual tower) (the ones a checkpoint records, which sampling will run)
    running in `dtype`. Fingerprinting reads about 1 MB per weight file."""
    cache = TextEmbeddingCache(path)
    m = cache.manifest
    if xlmr_dir and not cache.has_xlmr:
        raise EmuError(f"{Path(path) / MANIFEST}: holds no multilingual tower's embeddings; make the cache with "
                       f"data/embed_captions.py --xlmr {xlmr_dir}")
    if tower_fingerprint(clip_dir, t5_dir, dtype, m["t5_length"], xlmr_dir if cache.has_xlmr else None) != cache.fingerprint:
        towers = ", ".join(m[k] for k in ("clip", "t5", "xlmr") if k in m)
        given = ", ".join(str(d) for d in (clip_dir, t5_dir, xlmr_dir) if d)
        raise EmuError(f"{Path(path) / MANIFEST}: made with other towers or another dtype ({towers} in "
                       f"{m['dtype']}) than {given} in {str(dtype).removeprefix('torch.')}; use the "
                       f"towers and --text-dtype it was made with, or make a new cache")
    return cache


# ----------------------------------------------------------------------------------------------------
# Writing


def write_text_cache(path, captions, clip_dir, t5_dir, dtype=torch.bfloat16, device="cpu", batch_size=64,
                     shard_size=1024, xlmr_dir=None):
    """Add to the cache in `path` (made if absent) the embeddings of the captions it lacks; with `xlmr_dir`,
    Kandinsky's multilingual tower's too.

    The empty caption is always included. Captions are encoded `batch_size` at a time and written
    `shard_size` per shard; each shard is written atomically, then listed in the manifest, so an
    interrupted run loses at most the shard in progress and a rerun computes only what is missing.
    The towers are loaded only when something is missing.
    :return: how many captions were computed.
    """
    path = Path(path)
    if batch_size < 1 or shard_size < 1:
        raise EmuError(f"{path}: batch size {batch_size} and shard size {shard_size} must be at least 1")
    fingerprint = tower_fingerprint(clip_dir, t5_dir, dtype, xlmr_dir=xlmr_dir)
    cache = TextEmbeddingCache(path) if (path / MANIFEST).exists() else None
    if cache is not None and cache.fingerprint != fingerprint:
        m = cache.manifest
        towers = ", ".join(m[k] for k in ("clip", "t5", "xlmr") if k in m)
        given = ", ".join(str(d) for d in (clip_dir, t5_dir, xlmr_dir) if d)
        raise EmuError(f"{path / MANIFEST}: made with other towers or another dtype ({towers} in "
                       f"{m['dtype']}), not {given} in {str(dtype).removeprefix('torch.')}; "
                       f"write to a new directory")
    todo = [c for c in dict.fromkeys(["", *captions]) if cache is None or c not in cache]  # distinct, in order
    if not todo:
        return 0
    encoder = TextEncoder.load(clip_dir, t5_dir, dtype=dtype, device=device)
    xlmr = MultilingualTextEncoder.load(xlmr_dir, dtype=dtype, device=device) if xlmr_dir else None
    manifest = cache.manifest if cache is not None else {
        "fingerprint": fingerprint, "clip": str(clip_dir), "t5": str(t5_dir),
        "dtype": str(dtype).removeprefix("torch."), "clip_dim": encoder.clip_dim, "t5_dim": encoder.t5_dim,
        "pooled_dim": encoder.pooled_dim, "clip_length": encoder.clip.config.max_position_embeddings,
        "t5_length": T5_LENGTH, "captions": 0, "shards": [],
        **({"xlmr": str(xlmr_dir), "xlmr_dim": xlmr.dim, "xlmr_vector_dim": xlmr.vector_dim,
            "xlmr_length": XLMR_LENGTH} if xlmr else {})}
    with tqdm(total=len(todo), unit="caption", desc="embedding captions") as bar:
        for first in range(0, len(todo), shard_size):
            chunk = todo[first:first + shard_size]
            # the empty caption alone, as training encodes it, so its embedding is bitwise the same
            rest = [c for c in chunk if c]
            batches = [[c] for c in chunk if c == ""] + [rest[i:i + batch_size] for i in range(0, len(rest), batch_size)]
            parts = []
            for batch in batches:
                parts.append(_stored_tensors(encoder.encode(batch), dtype, xlmr.encode(batch) if xlmr else None))
                bar.update(len(batch))
            tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            tensors["keys"] = torch.tensor([list(caption_key(fingerprint, c)) for b in batches for c in b], dtype=torch.uint8)
            name = f"shard-{len(manifest['shards']):05d}.safetensors"
            save_weights(path / name, tensors)
            manifest["shards"].append(name)
            manifest["captions"] += len(chunk)
            atomic_write(path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return len(todo)


def _stored_tensors(emb, dtype, multilingual=None):
    """A batch's embedding as it is stored: in the towers' dtype, T5 (and XLM-R: `multilingual` is its
    (states, mask, vector)) cut to its real tokens, on the CPU."""
    out = {"clip": emb.clip.to(dtype).cpu(), "clip_mask": emb.clip_mask.cpu(),
           "t5": emb.t5[emb.t5_mask].to(dtype).cpu(),  # (real tokens of the batch, Dt)
           "t5_mask": emb.t5_mask.cpu(), "pooled": emb.pooled.to(dtype).cpu()}
    if multilingual is not None:
        states, mask, vector = multilingual
        out.update(xlmr=states[mask].to(dtype).cpu(), xlmr_mask=mask.cpu(), xlmr_vector=vector.to(dtype).cpu())
    return out
