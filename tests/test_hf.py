"""Tests for emu/text/hf.py: our safetensors reader and loading a model through a key map."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from emu import EmuError
from emu.checkpoint import SafetensorsFile, read_safetensors
from emu.text.hf import empty_model, load_hf_weights


class Tiny(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


KEY_MAP = {"model.proj.weight": "proj.weight", "model.proj.bias": "proj.bias",
           "model.norm.weight": "norm.weight", "model.norm.bias": "norm.bias"}


def published(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"model.proj.weight": torch.randn(3, 4, generator=gen), "model.proj.bias": torch.randn(3, generator=gen),
            "model.norm.weight": torch.randn(3, generator=gen), "model.norm.bias": torch.randn(3, generator=gen)}


def write(directory, tensors):
    directory.mkdir(exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory / "model.safetensors"


def rewrite_header(file, edit):
    """Apply edit(header dict) to a safetensors file's JSON header, keeping the data as it is."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_reader_matches_the_safetensors_library_for_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(2, 3), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(1, 1, 2).half(),
               "f64": torch.randn(2).double(), "i64": torch.arange(4), "u8": torch.arange(6, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "all.safetensors"))
    ours, library = read_safetensors(tmp_path / "all.safetensors"), load_file(str(tmp_path / "all.safetensors"))
    assert ours.keys() == library.keys()
    for key in library:
        assert ours[key].dtype == library[key].dtype and torch.equal(ours[key], library[key]), key


def test_load_weights_converts_to_the_model_dtype(tmp_path):
    write(tmp_path / "m", published())
    model = empty_model(Tiny, None, torch.bfloat16, "cpu")
    load_hf_weights(model, tmp_path / "m", KEY_MAP)
    assert model.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.proj.weight, published()["model.proj.weight"].bfloat16())


def error_of(call):
    with pytest.raises(EmuError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["model.safetensors", "truncated"]),
    ("empty", ["model.safetensors", "not a safetensors file"]),
    ("huge header length", ["model.safetensors", "header length"]),
    ("junk header", ["model.safetensors", "header is not JSON"]),
    ("unknown dtype", ["model.safetensors", "model.proj.weight", "malformed header entry"]),
    ("offsets too short", ["model.safetensors", "model.proj.weight", "data_offsets"]),
    ("overlap", ["model.safetensors", "overlap"]),
])
def test_broken_file_is_one_line_naming_file_and_key(tmp_path, damage, words):
    file = write(tmp_path / "m", published())
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:-5])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "huge header length":
        file.write_bytes((2**40).to_bytes(8, "little") + file.read_bytes()[8:])
    elif damage == "junk header":
        raw = file.read_bytes()
        file.write_bytes(raw[:8] + b"\xff" * int.from_bytes(raw[:8], "little") + raw[8 + int.from_bytes(raw[:8], "little"):])
    elif damage == "unknown dtype":
        rewrite_header(file, lambda h: h["model.proj.weight"].update(dtype="F7"))
    elif damage == "offsets too short":
        rewrite_header(file, lambda h: h["model.proj.weight"].update(shape=[4, 4]))
    else:
        def overlap(h):
            h["model.norm.bias"]["data_offsets"] = h["model.norm.weight"]["data_offsets"]
        rewrite_header(file, overlap)
    message = error_of(lambda: load_hf_weights(Tiny(), tmp_path / "m", KEY_MAP))
    assert all(word in message for word in words), message


@pytest.mark.parametrize("edit, words", [
    ("drop", ["missing keys", "model.norm.bias"]),
    ("extra", ["unexpected keys", "model.extra"]),
    ("shape", ["model.proj.weight", "has shape [4, 3], expected [3, 4]"]),
    ("dtype", ["model.proj.bias", "is int64, expected a floating-point tensor"]),
])
def test_wrong_key_shape_or_dtype_names_file_and_key(tmp_path, edit, words):
    tensors = published()
    if edit == "drop":
        del tensors["model.norm.bias"]
    elif edit == "extra":
        tensors["model.extra"] = torch.zeros(1)
    elif edit == "shape":
        tensors["model.proj.weight"] = tensors["model.proj.weight"].T.contiguous()
    else:
        tensors["model.proj.bias"] = torch.arange(3)
    write(tmp_path / "m", tensors)
    message = error_of(lambda: load_hf_weights(Tiny(), tmp_path / "m", KEY_MAP))
    assert "model.safetensors" in message and all(word in message for word in words), message


def test_skipped_prefixes_are_read_past(tmp_path):
    write(tmp_path / "m", {**published(), "decoder.anything": torch.zeros(7)})
    model = Tiny()
    load_hf_weights(model, tmp_path / "m", KEY_MAP, skipped=("decoder.",))
    assert torch.equal(model.norm.bias, published()["model.norm.bias"])


def test_nothing_is_read_when_any_check_fails(tmp_path):
    """All keys, shapes and dtypes are checked before the first tensor is copied in."""
    tensors = published(seed=1)
    tensors["model.norm.bias"] = torch.zeros(5)  # wrong shape, sorted after the others
    write(tmp_path / "m", tensors)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error_of(lambda: load_hf_weights(model, tmp_path / "m", KEY_MAP))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shard_index_naming_a_key_its_shard_lacks(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    tensors = published()
    save_file({k: v for k, v in tensors.items() if "proj" in k}, str(directory / "a.safetensors"))
    save_file({k: v for k, v in tensors.items() if "norm" in k}, str(directory / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in tensors}  # wrong: the norm tensors are in b
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = error_of(lambda: load_hf_weights(Tiny(), directory, KEY_MAP))
    assert "a.safetensors" in message and "model.norm" in message and "not in this shard" in message


def test_reader_lists_entries_and_reads_one_tensor(tmp_path):
    file = write(tmp_path / "m", published())
    opened = SafetensorsFile(file)
    assert opened.entries["model.proj.weight"][:2] == (torch.float32, (3, 4))
    assert torch.equal(opened.read("model.proj.bias"), published()["model.proj.bias"])
