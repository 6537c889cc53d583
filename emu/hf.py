"""The Hugging Face on-disk layout that the public text towers are published in.

A model directory holds config.json, the weights as safetensors (one model.safetensors, or shards
named in model.safetensors.index.json) and tokenizer.json. This file reads and writes that layout for
any of our models through an explicit key map: published name -> our parameter name.

The safetensors reader is our own, a few dozen lines over the documented format, for two reasons.
It reads one tensor at a time with plain file reads instead of a memory map, so loading T5-XXL's
encoder in bfloat16 peaks at the bf16 weights plus one tensor in the file's dtype (bench/load_t5.py
measures it). And it checks the whole header before reading anything, so every way a file can be
broken (truncated, malformed, a wrong shape or dtype, a missing key) is a one-line EmuError naming the
file and the key. Pickled checkpoints (pytorch_model.bin) are refused: unpickling can run code.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from emu import EmuError

# ----------------------------------------------------------------------------------------------------
# Reading safetensors

# The format's dtype names. Tensors are stored little-endian, as torch holds them on every machine we run on.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too
SCRATCH_BYTES = 16 * 2**20  # the chunk load_hf_weights reads at a time


class SafetensorsFile:
    """One .safetensors file: the header is read and checked on opening, tensors are read on demand.

    The layout is an 8-byte little-endian header length, a JSON header mapping each tensor name to
    {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows the header),
    then the data. `entries[name]` is (dtype, shape, begin, end).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little") if self.size >= 8 else -1
                if not 0 < n <= min(MAX_HEADER_BYTES, self.size - 8):
                    raise self.error(f"not a safetensors file (header length {n}, file of {self.size} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise EmuError(f"{self.path}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise self.error("not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise self.error("not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {key: self._check_entry(key, entry) for key, entry in header.items()}
        spans = sorted((begin, end, key) for key, (_, _, begin, end) in self.entries.items() if end > begin)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self.error(f"{second}: its bytes overlap those of {first}")

    def error(self, message):
        return EmuError(f"{self.path}: {message}")

    def _check_entry(self, key, entry):
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise self.error(f"{key}: malformed header entry {str(entry)[:80]}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise self.error(f"{key}: data_offsets [{begin}, {end}] do not fit a {entry['dtype']} tensor of shape "
                             f"{list(shape)} ({nbytes} bytes)")
        if self.data_start + end > self.size:
            raise self.error(f"{key}: data ends at byte {self.data_start + end} but the file has {self.size}; "
                             f"truncated?")
        return dtype, shape, begin, end

    def read(self, key):
        """Tensor `key` on the CPU in the file's dtype."""
        return self.read_rows(key, 0, None)

    def read_rows(self, key, start, stop, file=None):
        """Rows start..stop (along the first dimension; stop None: to the end) of tensor `key`, on the
        CPU in the file's dtype, with one seek and one read. `file`: this file already open, to reuse."""
        dtype, shape, begin, end = self.entries[key]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        stop = (shape[0] if shape else 1) if stop is None else stop
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        data = out.view(-1).view(torch.uint8)  # the same memory, as bytes for the read to fill
        with (open(self.path, "rb", buffering=0) if file is None else nullcontext(file)) as f:
            self._read_exactly(f, self.data_start + begin + start * row_bytes, memoryview(data.numpy()), key)
        return out

    def copy_into(self, key, out, scratch):
        """Copy tensor `key` into `out` (a contiguous tensor of the same shape, any dtype, any device),
        converting as it goes, one chunk of the file at a time.

        :param scratch: a reusable uint8 CPU buffer; each chunk is its size. Reusing one buffer for a
            whole checkpoint keeps the extra memory to that buffer and spares the kernel from handing
            out (and zeroing) fresh pages for every tensor.
        """
        dtype, shape, begin, end = self.entries[key]
        if out.shape != shape:
            raise ValueError(f"{key}: cannot copy {list(shape)} into {list(out.shape)}")
        chunk = len(scratch) - len(scratch) % dtype.itemsize  # whole elements per chunk
        flat = out.view(-1)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, end - begin, chunk):
                n = min(chunk, end - begin - start)
                self._read_exactly(f, self.data_start + begin + start, memoryview(scratch.numpy())[:n], key)
                first = start // dtype.itemsize
                flat[first:first + n // dtype.itemsize].copy_(scratch[:n].view(dtype))

    def _read_exactly(self, f, offset, buffer, key):
        """Fill `buffer` from byte `offset` of the open file `f`."""
        f.seek(offset)
        got = 0
        while got < len(buffer):  # a read may return less than asked; only 0 means the file ended
            n = f.readinto(buffer[got:])
            if not n:
                raise self.error(f"{key}: file ended while reading; truncated?")
            got += n


def read_safetensors(path):
    """Every tensor of a .safetensors file as a {name: CPU tensor} dict (small files: checkpoints, caches)."""
    file = SafetensorsFile(path)
    return {key: file.read(key) for key in file.entries}


# ----------------------------------------------------------------------------------------------------
# Loading a model through a key map


def _key_list(keys):
    """Up to five keys for a one-line error message."""
    keys = sorted(keys)
    return str(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def find_weight_files(path):
    """Where each published key lives: ({key: SafetensorsFile}, the file to name in errors).

    Reads the single-file layout (model.safetensors) or the sharded one (model.safetensors.index.json
    whose "weight_map" names a shard per key). Every header is checked here, before any tensor is read.
    """
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        file = SafetensorsFile(single)
        return {key: file for key in file.entries}, single
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise EmuError(f"{index}: not a safetensors index (no \"weight_map\" object)") from None
        absent = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if absent:
            raise EmuError(f"{index}: shard files not found: {absent}")
        shards = {name: SafetensorsFile(path / name) for name in sorted(set(weight_map.values()))}
        for key, name in weight_map.items():
            if key not in shards[name].entries:
                raise EmuError(f"{path / name}: {key} is listed in {index.name} but not in this shard")
        return {key: shards[name] for key, name in weight_map.items()}, index
    pickles = sorted(p for p in path.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl"))
    if pickles:
        raise EmuError(f"{pickles[0]}: pickled checkpoints are not loaded (unpickling can run code); convert it "
                       f"to safetensors (model.safetensors) first")
    raise EmuError(f"{path}: no model.safetensors or model.safetensors.index.json")


@torch.no_grad()
def load_hf_weights(model, path, key_map, skipped=()):
    """Fill every parameter of `model` from the checkpoint in `path`, one tensor at a time.

    Each tensor is read from disk and copied straight into the parameter, which converts it to the
    parameter's dtype and device: allocate the model in the dtype you want (empty_model) and no full
    copy in the file's dtype ever exists. All keys, shapes and dtypes are checked before any tensor is
    read: a published key that is neither mapped nor in `skipped` (name prefixes), a parameter no key
    fills, a wrong shape or a non-float tensor is an EmuError naming the file and the key.
    """
    files, source = find_weight_files(path)
    unexpected = [k for k in files if k not in key_map and not k.startswith(tuple(skipped))]
    if unexpected:
        raise EmuError(f"{files[unexpected[0]].path}: unexpected keys {_key_list(unexpected)}")
    params = dict(model.named_parameters())
    plan = {}  # our name -> its first published name present (the T5 embedding has two)
    for theirs, ours in key_map.items():
        if theirs in files and ours not in plan:
            plan[ours] = theirs
    missing = [theirs for theirs, ours in key_map.items() if ours not in plan]
    if missing:
        raise EmuError(f"{source}: missing keys {_key_list(missing)}")
    for ours, theirs in plan.items():
        file, (dtype, shape, _, _) = files[theirs], files[theirs].entries[theirs]
        if shape != tuple(params[ours].shape):
            raise file.error(f"{theirs} has shape {list(shape)}, expected {list(params[ours].shape)}")
        if not dtype.is_floating_point:
            raise file.error(f"{theirs} is {str(dtype).removeprefix('torch.')}, expected a floating-point tensor")
    in_file_order = sorted(plan.items(), key=lambda item: (str(files[item[1]].path), files[item[1]].entries[item[1]][2]))
    scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)
    for ours, theirs in in_file_order:  # sequential reads, shard after shard
        files[theirs].copy_into(theirs, params[ours], scratch)


def empty_model(cls, config, dtype, device):
    """Our model with uninitialised parameters of the given dtype on `device` (no random init)."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    return model.to_empty(device=device)


def save_pretrained(path, config_dict, parts, tokenizer):
    """Write config.json, model.safetensors and tokenizer.json.

    :param parts: (model, key_map) pairs written into one file under the published names; a weight
        that several names map to (a tied embedding) is written once, under its first name.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict["torch_dtype"] = str(next(parts[0][0].parameters()).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    tensors = {}
    for model, key_map in parts:
        state, written = model.state_dict(), set()
        for theirs, ours in key_map.items():
            if ours not in written:
                tensors[theirs] = state[ours].detach().cpu().contiguous()
                written.add(ours)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(path / "tokenizer.json"))


def read_config(path):
    """The parsed `path`/config.json and its file name."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise EmuError(f"{path}: directory not found")
    if not file.is_file():
        raise EmuError(f"{file}: config not found")
    try:
        return json.loads(file.read_text()), file
    except ValueError as e:
        raise EmuError(f"{file}: not valid JSON ({e})") from None


def config_from_dict(cls, values, file):
    """Build the dataclass `cls` from the config.json entries named like its fields; ignore the rest."""
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
    if missing:
        raise EmuError(f"{file}: missing config keys {missing}")
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


# ----------------------------------------------------------------------------------------------------
# Tokenizers (tokenizer.json through the `tokenizers` library)


def load_tokenizer(path, special_tokens, vocab_size):
    """Read `path`/tokenizer.json; check it knows the tokens we rely on and fits the embedding table."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise EmuError(f"{file}: tokenizer not found")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:
        raise EmuError(f"{file}: not a readable tokenizer ({str(e).splitlines()[0][:200]})") from None
    unknown = [t for t in special_tokens if tokenizer.token_to_id(t) is None]
    if unknown:
        raise EmuError(f"{file}: tokenizer lacks the special tokens {unknown}")
    if tokenizer.get_vocab_size() > vocab_size:
        raise EmuError(f"{file}: {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size {vocab_size}")
    return tokenizer


def set_fixed_length(tokenizer, length, pad_token):
    """Make every encoding exactly `length` ids: truncate (keeping the appended end token), then pad."""
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)


def tokenize(tokenizer, captions, device="cpu", clean=None):
    """Encode a list of captions to fixed-length ids (B, L) long and a real-token mask (B, L) bool.

    :param clean: optional str -> str applied to each caption first: the part of a tokenizer's
        original text cleanup that its tokenizer.json cannot express (CLIP's is emu.clip.clip_clean).
    """
    if isinstance(captions, str) or len(captions) == 0:
        raise EmuError(f"captions must be a non-empty list of strings, got {captions!r:.80}")
    captions = [clean(caption) for caption in captions] if clean else list(captions)
    encodings = tokenizer.encode_batch(captions)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool, device=device)
    return ids, mask
