"""Our hand-written towers against the reference implementation, transformers (a test-only
dependency), on the same files: checkpoints that transformers itself writes, read by our loaders.
Real-size models are built on the meta device, so their key sets and parameter counts are compared
without allocating a byte."""
import shutil

import pytest
import torch

from emu.text.clip import (CLIP_PRESETS, CLIP_VISION_PRESETS, TEXT_SKIPPED, VISION_SKIPPED, CLIPTextModel,
                           CLIPVisionModel, build_toy_clip_tokenizer, clip_text_key_map, clip_vision_key_map,
                           load_clip_text, load_clip_vision)
from emu.text.hf import tokenize
from emu.text.t5 import T5_PRESETS, T5_SKIPPED, T5Encoder, build_toy_t5_tokenizer, load_t5_encoder, t5_key_map

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a photo of a cat sitting on a red sofa", "two dogs playing in the snow at sunset",
            "an oil painting of a lighthouse on a rocky coast", "a cup of coffee next to an open book"] * 4
TOLERANCE = 1e-5  # max abs error in float32


def perturb(model, seed):
    """Move every weight off its initial value (LayerNorm ones, zero biases), so a wrongly mapped
    norm or bias cannot hide behind an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A random CLIPModel written by transformers in shards, plus our toy tokenizer.json."""
    tokenizer = build_toy_clip_tokenizer(CAPTIONS, vocab_size=300)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         projection_dim=24),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24),
        projection_dim=24)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "clip"
    perturb(transformers.CLIPModel(config), seed=1).save_pretrained(directory, max_shard_size="100KB")
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def hf_t5_dir(tmp_path_factory):
    """A random full T5ForConditionalGeneration (encoder and decoder) written by transformers, one file."""
    tokenizer = build_toy_t5_tokenizer(CAPTIONS, vocab_size=200)
    # num_heads * d_kv (64) differs from d_model (32), as T5-XXL's 64 x 64 = 4096 need not match either.
    config = transformers.T5Config(vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=16, d_ff=48,
                                   num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "t5"
    perturb(transformers.T5ForConditionalGeneration(config), seed=2).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def max_error(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_clip_text_matches_transformers(hf_clip_dir):
    assert (hf_clip_dir / "model.safetensors.index.json").is_file()  # the sharded layout
    ours, tokenizer = load_clip_text(hf_clip_dir, dtype=torch.float32)
    ids, _ = tokenize(tokenizer, ["a photo of a cat", "", "two dogs playing in the snow at sunset " * 9])
    hidden, pooled = ours(ids)
    ref = transformers.CLIPTextModelWithProjection.from_pretrained(hf_clip_dir).eval()
    with torch.no_grad():
        out = ref(input_ids=ids)
    assert pooled.shape == (3, 24)
    assert max_error(hidden, out.last_hidden_state) <= TOLERANCE
    assert max_error(pooled, out.text_embeds) <= TOLERANCE


def test_clip_vision_matches_transformers(hf_clip_dir):
    ours = load_clip_vision(hf_clip_dir, dtype=torch.float32)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hidden, embeds = ours(pixels)
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(hf_clip_dir).eval()
    with torch.no_grad():
        out = ref(pixel_values=pixels)
    assert hidden.shape == (3, 1 + 16, 32) and embeds.shape == (3, 24)
    assert max_error(hidden, out.last_hidden_state) <= TOLERANCE
    assert max_error(embeds, out.image_embeds) <= TOLERANCE


def test_t5_encoder_from_a_full_checkpoint_matches_transformers(hf_t5_dir):
    ours, tokenizer = load_t5_encoder(hf_t5_dir, dtype=torch.float32)  # reads past the decoder and lm_head
    ids, mask = tokenize(tokenizer, ["a photo of a cat", "", "two dogs playing in the snow at sunset " * 9])
    ref = transformers.T5EncoderModel.from_pretrained(hf_t5_dir).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    real = mask[..., None]  # padded positions are never read downstream; compare the real ones
    assert max_error(ours(ids, mask) * real, expected * real) <= TOLERANCE


def test_t5_sharded_checkpoint_written_by_transformers_loads_the_same(hf_t5_dir, tmp_path):
    sharded = tmp_path / "t5"
    model = transformers.T5ForConditionalGeneration.from_pretrained(hf_t5_dir)
    model.save_pretrained(sharded, max_shard_size="50KB")
    shutil.copy(hf_t5_dir / "tokenizer.json", sharded / "tokenizer.json")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    a, tokenizer = load_t5_encoder(hf_t5_dir, dtype=torch.float32)
    b, _ = load_t5_encoder(sharded, dtype=torch.float32)
    ids, mask = tokenize(tokenizer, ["a photo of a cat"])
    assert torch.equal(a(ids, mask), b(ids, mask))


# ----------------------------------------------------------------------------------------------------
# Real sizes, on the meta device


def published_clip_config():
    """openai/clip-vit-large-patch14's architecture, as its config.json states it."""
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768),
        projection_dim=768)


def published_t5_config():
    """google/t5-v1_1-xxl's architecture, as its config.json states it."""
    return transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                 num_decoder_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False)


def parameters_by_name(model):
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("tower", ["clip-text", "clip-vision", "t5-encoder"])
def test_presets_match_the_published_architectures_key_for_key(tower):
    """Every published tensor is either mapped to one of our parameters with the same shape or
    deliberately skipped, and our preset has exactly the reference's parameter count."""
    with torch.device("meta"):
        if tower == "t5-encoder":
            reference = transformers.T5ForConditionalGeneration(published_t5_config())
            ours, key_map, skipped = T5Encoder(T5_PRESETS["t5-v1_1-xxl"]), t5_key_map, T5_SKIPPED
            counted = transformers.T5EncoderModel(published_t5_config())
        else:
            reference = transformers.CLIPModel(published_clip_config())
            if tower == "clip-text":
                ours, key_map, skipped = CLIPTextModel(CLIP_PRESETS["vit-l-14"]), clip_text_key_map, TEXT_SKIPPED
                counted = transformers.CLIPTextModelWithProjection(published_clip_config().text_config)
            else:
                ours, key_map, skipped = CLIPVisionModel(CLIP_VISION_PRESETS["vit-l-14"]), clip_vision_key_map, VISION_SKIPPED
                counted = transformers.CLIPVisionModelWithProjection(published_clip_config().vision_config)
    theirs, mine = parameters_by_name(reference), parameters_by_name(ours)
    key_map = key_map(ours.config)
    unplaced = [k for k in theirs if k not in key_map and not k.startswith(skipped)]
    assert unplaced == []
    assert {key_map[k]: shape for k, shape in theirs.items() if k in key_map} == mine
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in counted.parameters())


def test_clip_projection_size_comes_from_the_top_level_config(tmp_path):
    """transformers writes a default projection_dim (512) inside text_config and vision_config; the
    CLIPModel's projections are sized by the top-level one, and so are ours."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=20)
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    build_toy_clip_tokenizer(CAPTIONS, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    assert load_clip_text(tmp_path, dtype=torch.float32)[0].text_projection.out_features == 20
    assert load_clip_vision(tmp_path, dtype=torch.float32).visual_projection.out_features == 20
