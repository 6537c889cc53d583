"""Tests for emu/text/encoder.py: the two frozen text towers, their tokenizers and the Hugging Face layout."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from emu import EmuError
from emu.text.clip import (CLIP_PRESETS, CLIPTextModel, build_toy_clip_tokenizer, clip_text_key_map, load_clip_text,
                           save_clip)
from emu.text.hf import tokenize
from emu.text.t5 import (T5_PRESETS, T5Encoder, build_toy_t5_tokenizer, load_t5_encoder, relative_position_bucket,
                         save_t5_encoder, t5_key_map)
from emu.text.encoder import TextEmbedding, TextEncoder, make_toy_towers

CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "A bowl of ramen with a soft boiled egg, studio lighting",
    "two dogs playing in the snow at sunset",
    "an oil painting of a lighthouse on a rocky coast",
    "portrait of an old fisherman, dramatic light",
    "a futuristic city skyline at night, neon reflections",
    "close-up of a hummingbird drinking nectar from a flower",
    "a cup of coffee next to an open book on a wooden table",
] * 4


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    clip_dir, t5_dir, _ = make_toy_towers(CAPTIONS, tmp_path_factory.mktemp("towers"), seed=0)
    return clip_dir, t5_dir


@pytest.fixture(scope="module")
def encoder(towers):
    return TextEncoder.load(*towers, dtype=torch.float32)


def copy_tower(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def t5_outputs(path, captions=("a cat on a sofa", "")):
    model, tokenizer = load_t5_encoder(path, dtype=torch.float32)
    ids, mask = tokenize(tokenizer, list(captions))
    return model(ids, mask)


def clip_outputs(path, captions=("a cat on a sofa", "")):
    model, tokenizer = load_clip_text(path, dtype=torch.float32)
    ids, _ = tokenize(tokenizer, list(captions))
    return model(ids)


# ----------------------------------------------------------------------------------------------------
# Tokenizers


def test_clip_tokens_start_end_and_pad_to_77_with_end_token():
    tokenizer = build_toy_clip_tokenizer(CAPTIONS)
    bos, eos = tokenizer.token_to_id("<|startoftext|>"), tokenizer.token_to_id("<|endoftext|>")
    short = tokenizer.encode("A Photo   of a CAT!")
    n = sum(short.attention_mask)
    assert len(short.ids) == 77 and short.ids[0] == bos and short.ids[n - 1] == eos
    assert short.ids[n:] == [eos] * (77 - n)  # CLIP pads with the end-of-text token
    long = tokenizer.encode("zebra " * 200)
    assert len(long.ids) == 77 and long.ids[0] == bos and long.ids[-1] == eos and all(long.attention_mask)
    empty = tokenizer.encode("")
    assert empty.ids[:2] == [bos, eos] and sum(empty.attention_mask) == 2


def test_clip_tokenizer_lowercases_and_collapses_whitespace():
    tokenizer = build_toy_clip_tokenizer(CAPTIONS)
    assert tokenizer.encode("  A  PHOTO of\ta cat ").ids == tokenizer.encode("a photo of a cat").ids


def test_t5_tokens_end_with_eos_and_pad_with_zero():
    tokenizer = build_toy_t5_tokenizer(CAPTIONS)
    assert [tokenizer.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    enc = tokenizer.encode("a photo of a cat")
    n = sum(enc.attention_mask)
    assert len(enc.ids) == 77 and enc.ids[n - 1] == 1 and enc.ids[n:] == [0] * (77 - n)
    assert 1 not in enc.ids[:n - 1]
    long = tokenizer.encode("lighthouse " * 200)
    assert len(long.ids) == 77 and long.ids[-1] == 1
    assert tokenizer.encode("").ids == [1] + [0] * 76


def test_saved_tokenizer_json_reloads_with_same_ids(towers):
    clip_dir, t5_dir = towers
    texts = ["a photo of a cat", "", "Neon CITY at night!!", "unseen wörds ünicode 日本"]
    for builder, directory in [(build_toy_clip_tokenizer, clip_dir), (build_toy_t5_tokenizer, t5_dir)]:
        fresh = builder(CAPTIONS)
        reloaded = Tokenizer.from_file(str(directory / "tokenizer.json"))
        for text in texts:
            assert reloaded.encode(text).ids == fresh.encode(text).ids


# ----------------------------------------------------------------------------------------------------
# Models


def reference_clip(sd, config, ids):
    """CLIP text forward written directly on the published weights, to check our model and key map."""
    B, L = ids.shape
    H, D = config.num_attention_heads, config.hidden_size
    w = lambda name: sd["text_model." + name]  # noqa: E731
    x = w("embeddings.token_embedding.weight")[ids] + w("embeddings.position_embedding.weight")[:L]
    future = torch.full((L, L), float("-inf")).triu(1)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        h = F.layer_norm(x, (D,), w(p + "layer_norm1.weight"), w(p + "layer_norm1.bias"), 1e-5)
        q, k, v = (F.linear(h, w(p + f"self_attn.{n}_proj.weight"), w(p + f"self_attn.{n}_proj.bias"))
                   .view(B, L, H, D // H).transpose(1, 2) for n in "qkv")
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(D // H) + future).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(B, L, D)
        x = x + F.linear(a, w(p + "self_attn.out_proj.weight"), w(p + "self_attn.out_proj.bias"))
        h = F.layer_norm(x, (D,), w(p + "layer_norm2.weight"), w(p + "layer_norm2.bias"), 1e-5)
        h = F.linear(h, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"))
        x = x + F.linear(h * torch.sigmoid(1.702 * h), w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"))
    x = F.layer_norm(x, (D,), w("final_layer_norm.weight"), w("final_layer_norm.bias"), 1e-5)
    eos = [row.index(config.eos_token_id) for row in ids.tolist()]
    return x, x[torch.arange(B), eos] @ sd["text_projection.weight"].T


def reference_t5(sd, config, ids, mask):
    """T5 encoder forward written directly on the published weights."""
    B, L = ids.shape
    H, Dh = config.num_heads, config.d_kv
    rms = lambda x, weight: weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    x = sd["shared.weight"][ids]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    bias = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][relative_position_bucket(rel)]
    bias = bias.permute(2, 0, 1) + torch.where(mask, 0.0, float("-inf"))[:, None, None, :]  # (B, H, L, L)
    for i in range(config.num_layers):
        w = lambda name: sd[f"encoder.block.{i}.layer.{name}.weight"]  # noqa: E731
        h = rms(x, w("0.layer_norm"))
        q, k, v = (F.linear(h, w(f"0.SelfAttention.{n}")).view(B, L, H, Dh).transpose(1, 2) for n in "qkv")
        a = ((q @ k.transpose(-1, -2)) + bias).softmax(-1) @ v  # no 1/sqrt(d)
        x = x + F.linear(a.transpose(1, 2).reshape(B, L, H * Dh), w("0.SelfAttention.o"))
        h = rms(x, w("1.layer_norm"))
        gate = F.gelu(F.linear(h, w("1.DenseReluDense.wi_0")), approximate="tanh")
        x = x + F.linear(gate * F.linear(h, w("1.DenseReluDense.wi_1")), w("1.DenseReluDense.wo"))
    return rms(x, sd["encoder.final_layer_norm.weight"])


def test_clip_matches_reference_on_published_weights(towers):
    model, tokenizer = load_clip_text(towers[0], dtype=torch.float32)
    ids, _ = tokenize(tokenizer, ["a photo of a cat", "", "two dogs playing in the snow at sunset"])
    hidden, pooled = model(ids)
    ref_hidden, ref_pooled = reference_clip(load_file(towers[0] / "model.safetensors"), model.config, ids)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)


def test_t5_matches_reference_on_published_weights(towers):
    model, tokenizer = load_t5_encoder(towers[1], dtype=torch.float32)
    ids, mask = tokenize(tokenizer, ["a photo of a cat", "", "two dogs playing in the snow at sunset"])
    ref = reference_t5(load_file(towers[1] / "model.safetensors"), model.config, ids, mask)
    torch.testing.assert_close(model(ids, mask), ref, atol=1e-5, rtol=1e-5)


def test_clip_is_causal(towers):
    model, tokenizer = load_clip_text(towers[0], dtype=torch.float32)
    ids, _ = tokenize(tokenizer, ["a photo of a cat sitting on a red sofa"])
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 7) % model.config.vocab_size
    before, after = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=0, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_clip_pooled_is_projection_at_first_end_of_text(towers):
    model, _ = load_clip_text(towers[0], dtype=torch.float32)
    eos = model.config.eos_token_id
    ids = torch.tensor([[0, 10, 11, eos, 12, 13, eos, eos], [0, 10, 11, 12, 13, 14, eos, eos]])
    hidden, pooled = model(ids)
    torch.testing.assert_close(pooled[0], model.text_projection(hidden[0, 3]))
    torch.testing.assert_close(pooled[1], model.text_projection(hidden[1, 6]))


def test_t5_padding_mask_makes_real_positions_independent_of_padding(towers):
    model, tokenizer = load_t5_encoder(towers[1], dtype=torch.float32)
    ids, mask = tokenize(tokenizer, ["a photo of a cat"])
    n = int(mask.sum())
    short = model(ids[:, :n + 3], mask[:, :n + 3])
    junk = ids.clone()
    junk[:, n:] = torch.randint(3, model.config.vocab_size, (1, 77 - n), generator=torch.Generator().manual_seed(0))
    long = model(junk, mask)
    torch.testing.assert_close(short[:, :n], long[:, :n], atol=1e-5, rtol=1e-5)


def test_t5_rms_norm_does_not_subtract_the_mean(towers):
    model, _ = load_t5_encoder(towers[1], dtype=torch.float32)
    norm = model.layers[0].norm1
    x = torch.full((1, model.config.d_model), 3.0)
    torch.testing.assert_close(norm(x), norm.weight[None] * 1.0, atol=1e-5, rtol=1e-5)


def test_relative_position_bucket_hand_values():
    # 32 buckets: 16 for keys before the query, 16 after; 8 exact offsets each, then log-spaced to 128.
    cases = {0: 0, 1: 17, -1: 1, -7: 7, 8: 24, -8: 8, -15: 9, 31: 27, -32: 12, 100: 31, -127: 15, -1000: 15}
    got = relative_position_bucket(torch.tensor(list(cases)), num_buckets=32, max_distance=128)
    assert got.tolist() == list(cases.values())


def test_presets_have_the_published_parameter_counts():
    with torch.device("meta"):
        clip, t5 = CLIPTextModel(CLIP_PRESETS["vit-l-14"]), T5Encoder(T5_PRESETS["t5-v1_1-xxl"])
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480 + 768 * 768  # CLIPTextModel + projection
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656  # T5EncoderModel t5-v1_1-xxl


def test_key_maps_cover_every_parameter():
    with torch.device("meta"):
        for model, key_map in [(CLIPTextModel(CLIP_PRESETS["vit-l-14"]), clip_text_key_map),
                               (T5Encoder(T5_PRESETS["t5-v1_1-xxl"]), t5_key_map)]:
            assert set(key_map(model.config).values()) == {name for name, _ in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------
# Save and load


@pytest.mark.parametrize("tower", ["clip", "t5"])
def test_round_trip_gives_identical_outputs_and_frozen_models(towers, tmp_path, tower):
    directory = towers[0] if tower == "clip" else towers[1]
    save_clip_text = lambda model, tokenizer, path: save_clip(path, tokenizer, text=model)  # noqa: E731
    load, save, outputs = {"clip": (load_clip_text, save_clip_text, clip_outputs),
                           "t5": (load_t5_encoder, save_t5_encoder, t5_outputs)}[tower]
    model, tokenizer = load(directory, dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    save(model, tokenizer, tmp_path / tower)
    for a, b in zip(outputs(directory), outputs(tmp_path / tower)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_clip_config_is_a_clip_model_config_with_text_config(towers):
    config = json.loads((towers[0] / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["model_type"] == "clip"
    assert config["text_config"]["hidden_size"] == 64 and config["projection_dim"] == 64


def shard(directory):
    """Rewrite model.safetensors as two shards and an index, as large checkpoints are published."""
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(directory / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_layout_loads_same_as_single_file(towers, tmp_path):
    for source, outputs in [(towers[0], clip_outputs), (towers[1], t5_outputs)]:
        directory = copy_tower(source, tmp_path, source.name)
        shard(directory)
        for a, b in zip(outputs(source), outputs(directory)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_t5_decoder_keys_are_skipped_and_either_embedding_name_works(towers, tmp_path):
    directory = copy_tower(towers[1], tmp_path, "t5")
    state = load_file(directory / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
    state["lm_head.weight"] = torch.zeros(3, 3)
    save_file(state, str(directory / "model.safetensors"))
    torch.testing.assert_close(t5_outputs(towers[1]), t5_outputs(directory), atol=0, rtol=0)


def test_clip_vision_keys_are_skipped(towers, tmp_path):
    directory = copy_tower(towers[0], tmp_path, "clip")
    state = load_file(directory / "model.safetensors")
    state.update({"vision_model.embeddings.class_embedding": torch.zeros(4), "logit_scale": torch.zeros(()),
                  "visual_projection.weight": torch.zeros(2, 2),
                  "text_model.embeddings.position_ids": torch.arange(77)[None]})
    save_file(state, str(directory / "model.safetensors"))
    for a, b in zip(clip_outputs(towers[0]), clip_outputs(directory)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def edit_weights(directory, edit):
    """Damage `directory`/model.safetensors: "drop KEY", "add KEY" (a stray tensor) or "reshape KEY" (transposed)."""
    state = load_file(directory / "model.safetensors")
    action, key = edit.split()
    if action == "drop":
        del state[key]
    elif action == "add":
        state[key] = torch.zeros(2)
    else:
        state[key] = state[key].T.contiguous()
    save_file(state, str(directory / "model.safetensors"))


@pytest.mark.parametrize("edit, words", [
    ("drop encoder.final_layer_norm.weight", ["missing", "encoder.final_layer_norm.weight"]),
    ("drop shared.weight", ["missing", "shared.weight"]),
    ("add encoder.block.0.layer.0.SelfAttention.extra.weight", ["unexpected", "SelfAttention.extra.weight"]),
    ("reshape encoder.block.1.layer.1.DenseReluDense.wo.weight", ["shape", "DenseReluDense.wo.weight"]),
])
def test_bad_t5_checkpoint_names_file_and_key(towers, tmp_path, edit, words):
    directory = copy_tower(towers[1], tmp_path, "t5")
    edit_weights(directory, edit)
    with pytest.raises(EmuError) as error:
        load_t5_encoder(directory, dtype=torch.float32)
    message = str(error.value)
    assert "model.safetensors" in message and all(word in message for word in words) and "\n" not in message


def test_clip_without_projection_is_a_missing_key(towers, tmp_path):
    directory = copy_tower(towers[0], tmp_path, "clip")
    state = load_file(directory / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(EmuError, match="missing keys.*text_projection.weight"):
        load_clip_text(directory, dtype=torch.float32)


def test_pickle_checkpoint_asks_for_safetensors(towers, tmp_path):
    directory = copy_tower(towers[1], tmp_path, "t5")
    (directory / "model.safetensors").unlink()
    torch.save({"shared.weight": torch.zeros(2)}, directory / "pytorch_model.bin")
    with pytest.raises(EmuError, match=r"pytorch_model\.bin.*convert it to safetensors"):
        load_t5_encoder(directory, dtype=torch.float32)


def test_missing_directory_config_or_tokenizer(towers, tmp_path):
    with pytest.raises(EmuError, match="directory not found"):
        load_clip_text(tmp_path / "nowhere", dtype=torch.float32)
    directory = copy_tower(towers[0], tmp_path, "clip")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(EmuError, match="tokenizer.json: tokenizer not found"):
        load_clip_text(directory, dtype=torch.float32)
    (directory / "config.json").unlink()
    with pytest.raises(EmuError, match="config.json: config not found"):
        load_clip_text(directory, dtype=torch.float32)


def test_tokenizer_larger_than_embedding_table_is_refused(towers, tmp_path):
    directory = copy_tower(towers[1], tmp_path, "t5")
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = 10
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(EmuError, match="tokenizer.json: .* more than the model's vocab_size 10"):
        load_t5_encoder(directory, dtype=torch.float32)


def test_clip_end_token_id_comes_from_the_tokenizer(towers, tmp_path):
    # openai/clip-vit-large-patch14's config.json says eos_token_id=2; pooling must still find <|endoftext|>.
    directory = copy_tower(towers[0], tmp_path, "clip")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (directory / "config.json").write_text(json.dumps(config))
    for a, b in zip(clip_outputs(towers[0]), clip_outputs(directory)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# TextEncoder, TextEmbedding, toy towers


def test_encode_shapes_masks_and_empty_prompt(encoder):
    emb = encoder.encode(["a photo of a cat", ""])
    assert emb.clip.shape == (2, 77, encoder.clip_dim) and emb.t5.shape == (2, 77, encoder.t5_dim)
    assert emb.pooled.shape == (2, encoder.pooled_dim)
    assert all(t.dtype == torch.float32 for t in (emb.clip, emb.t5, emb.pooled))
    assert emb.clip_mask.dtype == emb.t5_mask.dtype == torch.bool
    assert emb.clip_mask[1].sum() == 2 and emb.t5_mask[1].sum() == 1  # "" is start+end, and </s>
    assert emb.clip_mask[0].sum() > 2 and emb.t5_mask[0].sum() > 1
    assert torch.isfinite(emb.clip).all() and torch.isfinite(emb.t5).all()
    with pytest.raises(EmuError):
        encoder.encode("a photo of a cat")


def test_encode_rows_do_not_depend_on_the_rest_of_the_batch(encoder):
    both = encoder.encode(["a photo of a cat", "two dogs playing in the snow"])
    alone = encoder.encode(["two dogs playing in the snow"])
    for a, b in [(both.clip[1:], alone.clip), (both.t5[1:], alone.t5), (both.pooled[1:], alone.pooled)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_towers_return_float32_close_to_float32(towers, encoder):
    half = TextEncoder.load(*towers, dtype=torch.bfloat16, t5_max_length=32)
    assert half.clip.token_embedding.weight.dtype == torch.bfloat16
    emb, ref = half.encode(["a photo of a cat"]), encoder.encode(["a photo of a cat"])
    assert emb.t5.shape == (1, 32, encoder.t5_dim) and emb.clip.dtype == emb.t5.dtype == torch.float32
    n = int(emb.t5_mask.sum())
    torch.testing.assert_close(emb.t5[:, :n], ref.t5[:, :n], atol=0.1, rtol=0.1)
    torch.testing.assert_close(emb.pooled, ref.pooled, atol=0.1, rtol=0.1)


def test_text_embedding_index_cat_len_to(encoder):
    emb = encoder.encode(["a", "b c", "d e f"])
    assert len(emb) == 3 and len(emb[1]) == 1 and len(emb[-1]) == 1 and len(emb[1:]) == 2
    torch.testing.assert_close(emb[-1].t5, emb.t5[2:])
    again = TextEmbedding.cat([emb[0], emb[1:]])
    for name in ("clip", "clip_mask", "t5", "t5_mask", "pooled"):
        assert torch.equal(getattr(again, name), getattr(emb, name))
    assert emb.to("cpu").t5.device.type == "cpu"


def test_make_toy_towers_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = make_toy_towers(CAPTIONS, tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = make_toy_towers(CAPTIONS, tmp_path / "b", seed=0)
    c = make_toy_towers(CAPTIONS, tmp_path / "c", seed=1)
    for i in range(3):  # CLIP, T5 and XLM-R
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (a[i] / name).read_bytes() == (b[i] / name).read_bytes()
        assert (a[i] / "model.safetensors").read_bytes() != (c[i] / "model.safetensors").read_bytes()
    # without Kandinsky's XLM-R (make_toy.py --no-xlmr, as toy.sh runs it), CLIP and T5 are the same files
    d = make_toy_towers(CAPTIONS, tmp_path / "d", seed=0, xlmr=False)
    assert d[2] is None and not (tmp_path / "d" / "xlmr").exists()
    for i in range(2):
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (a[i] / name).read_bytes() == (d[i] / name).read_bytes()


def test_clip_preprocess_resizes_short_side_crops_centre_and_normalises():
    from emu.text.clip import CLIP_MEAN, CLIP_STD, clip_preprocess
    grey = torch.full((2, 3, 40, 60), 0.2)  # [-1, 1] images, wider than tall
    out = clip_preprocess(grey, size=32)
    expected = (torch.tensor(0.6) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(2, 3, 32, 32), atol=1e-5, rtol=0)
    # The crop is the centre: a bright column in the middle survives, the outer columns are cut away.
    image = torch.full((1, 3, 32, 48), -1.0)
    image[..., 23:25] = 1.0
    image[..., :4] = 1.0
    out = clip_preprocess(image, size=32)
    lo = (0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert out[0, 0, :, 15:17].min() > 0 and torch.allclose(out[0, 0, :, :4], torch.tensor(lo))


def test_towers_load_in_bfloat16_by_default(towers):
    encoder = TextEncoder.load(*towers)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert encoder.encode(["a cat"]).t5.dtype == torch.float32
