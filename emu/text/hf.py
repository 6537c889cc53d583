"""The Hugging Face on-disk layout that the public text towers are published in.

A model directory holds config.json, the weights as safetensors (one model.safetensors, or shards
named in model.safetensors.index.json) and tokenizer.json. This file reads and writes that layout for
any of our models through an explicit key map: published name -> our parameter name.

The safetensors reader is our own (emu/checkpoint.py), a few dozen lines over the documented format, for two reasons.
It reads one tensor at a time with plain file reads instead of a memory map, so loading T5-XXL's
encoder in bfloat16 peaks at the bf16 weights plus one tensor in the file's dtype (bench/load_tower.py
measures it). And it checks the whole header before reading anything, so every way a file can be
broken (truncated, malformed, a wrong shape or dtype, a missing key) is a one-line EmuError naming the
file and the key. Pickled checkpoints (pytorch_model.bin) are refused: unpickling can run code.
"""
import json
import math
from collections import Counter
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import models as tokenizer_models

from emu import EmuError
from emu.checkpoint import SafetensorsFile

SCRATCH_BYTES = 16 * 2**20  # the chunk load_hf_weights reads at a time


# ----------------------------------------------------------------------------------------------------
# Loading a model through a key map


def _key_list(keys):
    """Up to five keys for a one-line error message."""
    keys = sorted(keys)
    return str(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def find_weight_files(path, stems=("model",)):
    """Where each published key lives: ({key: SafetensorsFile}, the file to name in errors).

    Reads the single-file layout (model.safetensors) or the sharded one (model.safetensors.index.json
    whose "weight_map" names a shard per key). Every header is checked here, before any tensor is read.
    :param stems: the file names to look for, in order of preference: transformers' "model", diffusers'
        "diffusion_pytorch_model" (and its half-precision copy "diffusion_pytorch_model.fp16").
    """
    path = Path(path)
    for stem in stems:
        single, index = path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json"
        if single.is_file() or index.is_file():
            break
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
    raise EmuError(f"{path}: no {stems[0]}.safetensors or {stems[0]}.safetensors.index.json")


@torch.no_grad()
def load_hf_weights(model, path, key_map, skipped=(), stems=("model",)):
    """Fill every parameter of `model` from the checkpoint in `path`, one tensor at a time.

    Each tensor is read from disk and copied straight into the parameter, which converts it to the
    parameter's dtype and device: allocate the model in the dtype you want (empty_model) and no full
    copy in the file's dtype ever exists. All keys, shapes and dtypes are checked before any tensor is
    read: a published key that is neither mapped nor in `skipped` (name prefixes), a parameter no key
    fills, a wrong shape or a non-float tensor is an EmuError naming the file and the key. A 1x1
    convolution's weight (C_out, C_in, 1, 1) fills a linear layer's (C_out, C_in): the same numbers.
    `stems`: the weight files' names (find_weight_files).
    """
    files, source = find_weight_files(path, stems)
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
        if shape != tuple(params[ours].shape) and shape != tuple(params[ours].shape) + (1, 1):
            raise file.error(f"{theirs} has shape {list(shape)}, expected {list(params[ours].shape)}")
        if not dtype.is_floating_point:
            raise file.error(f"{theirs} is {str(dtype).removeprefix('torch.')}, expected a floating-point tensor")
    in_file_order = sorted(plan.items(), key=lambda item: (str(files[item[1]].path), files[item[1]].entries[item[1]][2]))
    scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)
    for ours, theirs in in_file_order:  # sequential reads, shard after shard
        shape = files[theirs].entries[theirs][1]
        files[theirs].copy_into(theirs, params[ours].view(shape), scratch)


def empty_model(cls, config, dtype, device, **kwargs):
    """Our model with uninitialised parameters of the given dtype on `device` (no random init)."""
    with torch.device("meta"):
        model = cls(config, **kwargs).to(dtype)
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


def read_config(path, name="config.json"):
    """The parsed `path`/config.json (or another `name`) and its file name."""
    file = Path(path) / name
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


def build_toy_unigram(captions, head, tail, vocab_size, unk_token):
    """A small Unigram tokenizer laid out as a SentencePiece vocabulary is published: the special
    tokens `head` first, then the pieces, then the special tokens `tail`, `vocab_size` ids in all.
    The caller adds the post-processor (which tokens go around a caption) and the fixed length.

    The real vocabularies (T5's, XLM-R's) were fitted with EM. Here the pieces are every character
    seen plus the substrings covering the most text (count x length), scored by log frequency. That
    favours short pieces more than EM would, but it is reproducible, where the library's
    UnigramTrainer picks different pieces run to run. Segmentation is the same Viterbi search over
    piece scores as SentencePiece's.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Strip()])
    pre_tokenizer = pre_tokenizers.Metaspace()  # words become "▁word", as in SentencePiece
    counts = Counter()
    for caption in captions:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)):
            for start in range(len(word)):
                for end in range(start + 1, min(len(word), start + 16) + 1):  # SentencePiece caps pieces at 16
                    counts[word[start:end]] += 1
    chars = sorted(p for p in counts if len(p) == 1)
    longer = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p] * len(p), p))  # ties: a-z
    pieces = chars + longer[:max(vocab_size - len(head) - len(tail) - len(chars), 0)]
    total = sum(counts.values())
    vocab = [(token, 0.0) for token in head] + [(p, math.log(counts[p] / total)) for p in pieces]
    tokenizer = Tokenizer(tokenizer_models.Unigram(vocab, unk_id=head.index(unk_token)))
    tokenizer.add_special_tokens(head)
    tokenizer.add_special_tokens(tail)  # not in the Unigram vocabulary: their ids follow the pieces
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.Metaspace()
    return tokenizer


def set_fixed_length(tokenizer, length, pad_token):
    """Make every encoding exactly `length` ids: truncate (keeping the appended end token), then pad."""
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)


def tokenize(tokenizer, captions, device="cpu", clean=None, trim=False):
    """Encode a list of captions to fixed-length ids (B, L) long and a real-token mask (B, L) bool.

    :param clean: optional str -> str applied to each caption first: the part of a tokenizer's
        original text cleanup that its tokenizer.json cannot express (CLIP's is emu.text.clip.clip_clean).
    :param trim: cut both to the longest caption's real tokens instead of the fixed length. A tower
        gives the same vectors either way (T5 and XLM-R mask the padding, a causal CLIP never sees it
        before its end token), at a fraction of the cost: for training and measuring on many captions.
    """
    if isinstance(captions, str) or len(captions) == 0:
        raise EmuError(f"captions must be a non-empty list of strings, got {captions!r:.80}")
    captions = [clean(caption) for caption in captions] if clean else list(captions)
    encodings = tokenizer.encode_batch(captions)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool, device=device)
    if trim:
        length = int(mask.sum(dim=1).max())
        ids, mask = ids[:, :length], mask[:, :length]
    return ids, mask
