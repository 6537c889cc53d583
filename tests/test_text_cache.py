import importlib.util
import json
import os
from dataclasses import fields

import pytest
import torch

import pretrain
from emu import EmuError
from emu.datasets import toyworld
from emu.models.autoencoder import PRESETS as AE_PRESETS
from emu.models.autoencoder import Autoencoder
from emu.models.first_stage import save_autoencoder
from emu.datasets.folders import read_prompts
from emu.text.encoder import MultilingualTextEncoder, TextEmbedding, TextEncoder, make_toy_towers
from emu.text.cache import TextEmbeddingCache, load_text_cache, write_text_cache
from emu.models.unet import PRESETS, UNet
from launch import script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_PROMPTS = os.path.join(ROOT, "data", "prompts", "toy.tsv")
CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle at the top on a grey background",
            "three yellow circles", "a purple square in the centre", "one red triangle", "blue",
            "two orange diamonds at the bottom on a teal background"]


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


embed_captions = load_script("data/embed_captions.py")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    clip_dir, t5_dir, _ = make_toy_towers(CAPTIONS, tmp_path_factory.mktemp("towers"), seed=0)
    return clip_dir, t5_dir, TextEncoder.load(clip_dir, t5_dir)


def assert_equal(a, b):
    for f in fields(TextEmbedding):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name


def t5_padding_zeroed(text):
    """What the cache returns for an embedding: the same, but zeros at T5's (masked) padding positions."""
    return TextEmbedding(clip=text.clip, clip_mask=text.clip_mask, t5=text.t5 * text.t5_mask[..., None],
                         t5_mask=text.t5_mask, pooled=text.pooled)


def test_cache_returns_what_the_towers_computed(towers, tmp_path):
    clip_dir, t5_dir, encoder = towers
    assert write_text_cache(tmp_path, CAPTIONS, clip_dir, t5_dir, batch_size=64) == len(CAPTIONS) + 1  # and ""
    empty, text = encoder.encode([""]), encoder.encode(CAPTIONS)  # the batches the cache computed
    assert (text.t5[~text.t5_mask] != 0).any()  # the tower's padding outputs are not zero; the cache stores zeros
    cache = TextEmbeddingCache(tmp_path)
    assert (cache.clip_dim, cache.t5_dim, cache.pooled_dim) == (encoder.clip_dim, encoder.t5_dim, encoder.pooled_dim)
    assert_equal(cache.encode(CAPTIONS), t5_padding_zeroed(text))
    assert_equal(cache.encode([""]), t5_padding_zeroed(empty))
    # any mix of lengths, order and repeats, from a cache opened again from disk
    mixed = [CAPTIONS[2], "", CAPTIONS[6], CAPTIONS[2], CAPTIONS[0]]
    expected = TextEmbedding.cat([text[2], empty, text[6], text[2], text[0]])
    assert_equal(TextEmbeddingCache(tmp_path).encode(mixed), t5_padding_zeroed(expected))
    # the zeros change nothing downstream: masked keys get exactly zero attention weight
    torch.manual_seed(0)
    unet = UNet(PRESETS["toy"]).eval()
    torch.nn.init.normal_(unet.conv_out.weight)  # the output layer starts at zero
    x, t = torch.randn(len(mixed), 16, 8, 8), torch.tensor([10, 200, 400, 600, 990])
    with torch.no_grad():
        assert torch.equal(unet(x, t, cache.encode(mixed)), unet(x, t, expected))


def test_a_cache_with_the_multilingual_tower_returns_what_it_computed(towers, tmp_path):
    clip_dir, t5_dir, encoder = towers
    xlmr_dir = clip_dir.parent / "xlmr"  # make_toy_towers writes Kandinsky's XLM-R beside the other two
    captions = CAPTIONS + ["два красных круга слева на бирюзовом фоне"]
    assert write_text_cache(tmp_path / "multi", captions, clip_dir, t5_dir, xlmr_dir=xlmr_dir) == len(captions) + 1
    xlmr = MultilingualTextEncoder.load(xlmr_dir)
    states, mask, vector = xlmr.encode(captions)  # the batch the cache computed
    assert (states[~mask] != 0).any()  # the tower's padding outputs are not zero; the cache stores zeros there
    cache = load_text_cache(tmp_path / "multi", clip_dir, t5_dir, torch.bfloat16, xlmr_dir)
    got = cache.encode_multilingual(captions[::-1])
    assert torch.equal(got[0], (states * mask[..., None]).flip(0)) and torch.equal(got[1], mask.flip(0))
    assert torch.equal(got[2], vector.flip(0))
    assert_equal(cache.encode(captions), t5_padding_zeroed(encoder.encode(captions)))  # CLIP's and T5's as before
    view = cache.multilingual()
    assert (view.dim, view.vector_dim) == (xlmr.dim, xlmr.vector_dim) and torch.equal(view.encode([""])[2], xlmr.encode([""])[2])
    # asked for a tower it lacks, or checked against another XLM-R: one-line errors
    write_text_cache(tmp_path / "plain", CAPTIONS[:2], clip_dir, t5_dir)
    with pytest.raises(EmuError, match="holds no multilingual tower's embeddings; make the cache with data/embed_captions.py --xlmr"):
        load_text_cache(tmp_path / "plain", clip_dir, t5_dir, torch.bfloat16, xlmr_dir)
    with pytest.raises(EmuError, match="made without a multilingual tower"):
        TextEmbeddingCache(tmp_path / "plain").encode_multilingual(CAPTIONS[:1])
    _, _, other = make_toy_towers(CAPTIONS, tmp_path / "other", seed=1)
    with pytest.raises(EmuError, match="made with other towers"):
        load_text_cache(tmp_path / "multi", clip_dir, t5_dir, torch.bfloat16, other)
    with pytest.raises(EmuError, match="made with other towers"):
        write_text_cache(tmp_path / "multi", ["new"], clip_dir, t5_dir, xlmr_dir=other)


class Interrupted(Exception):
    pass


def test_interrupted_cache_resumes_and_computes_each_caption_once(towers, tmp_path, monkeypatch):
    clip_dir, t5_dir, _ = towers
    encode, computed = TextEncoder.encode, []

    def encode_until_a_shard_is_written(self, captions):
        if (tmp_path / "split" / "shard-00000.safetensors").exists():
            raise Interrupted
        computed.extend(captions)
        return encode(self, captions)

    with monkeypatch.context() as m:
        m.setattr(TextEncoder, "encode", encode_until_a_shard_is_written)
        with pytest.raises(Interrupted):
            write_text_cache(tmp_path / "split", CAPTIONS, clip_dir, t5_dir, batch_size=2, shard_size=3)
    assert computed == ["", CAPTIONS[0], CAPTIONS[1]] and len(TextEmbeddingCache(tmp_path / "split")) == 3

    monkeypatch.setattr(TextEncoder, "encode", lambda self, captions: computed.extend(captions) or encode(self, captions))
    assert write_text_cache(tmp_path / "split", CAPTIONS, clip_dir, t5_dir, batch_size=2, shard_size=3) == 6
    assert sorted(computed) == sorted(["", *CAPTIONS])  # each caption once, over both runs
    assert write_text_cache(tmp_path / "split", CAPTIONS[::-1], clip_dir, t5_dir, batch_size=2, shard_size=3) == 0
    assert len(computed) == len(CAPTIONS) + 1

    write_text_cache(tmp_path / "straight", CAPTIONS, clip_dir, t5_dir, batch_size=2, shard_size=3)
    split, straight = TextEmbeddingCache(tmp_path / "split"), TextEmbeddingCache(tmp_path / "straight")
    assert len(split.shards) == len(straight.shards) == 3
    assert_equal(split.encode(["", *CAPTIONS]), straight.encode(["", *CAPTIONS]))


def test_other_towers_and_missing_captions_are_one_line_errors(towers, tmp_path):
    clip_dir, t5_dir, _ = towers
    other_clip, other_t5, _ = make_toy_towers(CAPTIONS, tmp_path / "other", seed=1)
    write_text_cache(tmp_path / "cache", CAPTIONS[:2], clip_dir, t5_dir)
    for make in (lambda: write_text_cache(tmp_path / "cache", CAPTIONS, other_clip, other_t5),
                 lambda: write_text_cache(tmp_path / "cache", CAPTIONS, clip_dir, t5_dir, dtype=torch.float32),
                 lambda: load_text_cache(tmp_path / "cache", clip_dir, other_t5, torch.bfloat16),
                 lambda: load_text_cache(tmp_path / "cache", clip_dir, t5_dir, torch.float32)):
        with pytest.raises(EmuError, match="made with other towers") as e:
            make()
        assert str(e.value).startswith(str(tmp_path / "cache" / "manifest.json")) and "\n" not in str(e.value)
    assert len(load_text_cache(tmp_path / "cache", clip_dir, t5_dir, torch.bfloat16)) == 3

    cache = TextEmbeddingCache(tmp_path / "cache")
    with pytest.raises(EmuError, match="caption not in the cache") as e:
        cache.encode([CAPTIONS[0], "a caption nobody embedded " * 20])
    message = str(e.value)
    assert message.startswith(str(tmp_path / "cache")) and "a caption nobody embedded" in message
    assert len(message) < 250 and "\n" not in message
    with pytest.raises(EmuError, match="not a text-embedding cache"):
        TextEmbeddingCache(tmp_path / "other")

    # the script, pointed at other towers than its --out was made with
    toyworld.write_folder(tmp_path / "data", toyworld.make_haystack(2, seed=0, size=8))
    proc = script("data/embed_captions.py", "--data", str(tmp_path / "data"), "--clip", str(other_clip),
                  "--t5", str(other_t5), "--out", str(tmp_path / "cache"), "--device", "cpu")
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path / 'cache' / 'manifest.json'}: made with other towers"), err


def test_pretrain_from_the_cache_matches_pretrain_from_the_towers(tmp_path):
    examples = toyworld.make_haystack(16, seed=0, size=32)
    toyworld.write_folder(tmp_path / "haystack", examples)
    make_toy_towers([text for _, text, _ in examples] + [m["true_caption"] for _, _, m in examples], tmp_path / "towers")
    torch.manual_seed(0)
    save_autoencoder(Autoencoder(AE_PRESETS["toy"]), tmp_path / "ae")
    frozen = ["--ae", f"{tmp_path}/ae", "--clip", f"{tmp_path}/towers/clip", "--t5", f"{tmp_path}/towers/t5"]
    embed_captions.main(embed_captions.parse_args(["--data", f"{tmp_path}/haystack", "--out", f"{tmp_path}/cache",
                                                   "--prompts", TOY_PROMPTS, "--device", "cpu", *frozen[2:]]))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    prompts = {p for p, _ in read_prompts(TOY_PROMPTS)}  # for pretrain.py's sample grids
    assert manifest["captions"] == len({"", *prompts, *(t for _, t, _ in examples), *(m["true_caption"] for _, _, m in examples)})

    # a high caption dropout, so the empty caption's embedding is used too
    common = ["--data", f"{tmp_path}/haystack", "--steps", "2", "--bs", "4", "--caption-dropout", "0.5", "--device", "cpu", *frozen]
    pretrain.main(pretrain.parse_args([*common, "--out", f"{tmp_path}/towers-run"]))
    pretrain.main(pretrain.parse_args([*common, "--out", f"{tmp_path}/cache-run", "--text-cache", f"{tmp_path}/cache"]))
    a = torch.load(f"{tmp_path}/towers-run/ckpt.pt", weights_only=True)
    b = torch.load(f"{tmp_path}/cache-run/ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (b["args"]["clip"], b["args"]["t5"]) == (f"{tmp_path}/towers/clip", f"{tmp_path}/towers/t5")  # for sampling
