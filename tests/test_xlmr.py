"""Tests for emu/text/xlmr.py: XLM-RoBERTa with M-CLIP's head, Kandinsky 2.1's multilingual text tower.

The references are test-only dependencies, skipped where absent: transformers' XLMRobertaModel for the
numbers (on a tiny random model written in the published MultilingualCLIP layout), and SentencePiece
for the token ids (a unigram model trained here, converted to tokenizer.json by transformers as
XLM-R's published one is).
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from emu import EmuError
from emu.text.hf import tokenize
from emu.text.xlmr import (XLMR_LENGTH, XLMR_PRESETS, XLMR_SKIPPED, XLMRConfig, XLMRTextModel,
                           build_toy_xlmr_tokenizer, load_xlmr, roberta_positions, save_xlmr, xlmr_key_map)
from test_text import copy_tower, edit_weights, shard  # the towers' shared file helpers

CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "two dogs playing in the snow at sunset",
    "a lighthouse on a rocky coast under stormy skies",
    "café au lait sur une table en bois à paris",
    "кошка сидит на красном диване",  # Russian: Kandinsky's first language
    "две собаки играют в снегу на закате",
    "маяк на скалистом берегу под грозовым небом",
    "東京の夜景と富士山",
    "一碗拉面和溏心蛋",
]
LONG = "a very long caption about a sunny beach with palm trees, blue water and white sand " * 8
PROMPTS = [
    "a photo of a cat on a red sofa",  # Latin
    "Café crème on a Parisian terrace",
    "Кошка спит на диване у окна",  # Cyrillic
    "東京の夜景、富士山",  # CJK, no spaces
    "",
    "   ",
    LONG,  # longer than 77 tokens: cut, keeping </s>
    "an unseen zebra ✓ ☃ in Reykjavík",  # characters the vocabulary lacks
]
TOLERANCE = 1e-5  # max abs error in float32


def outputs(path, prompts=("a photo of a cat", "кошка", "")):
    model, tokenizer = load_xlmr(path, dtype=torch.float32)
    return model(*tokenize(tokenizer, list(prompts)))


# ----------------------------------------------------------------------------------------------------
# Against transformers' XLMRobertaModel


@pytest.fixture(scope="module")
def mclip_dir(tmp_path_factory):
    """A tiny random MultilingualCLIP as Kandinsky 2.1 publishes it: transformers' XLMRobertaModel under
    `transformer.` (with its pooler and, as older transformers wrote it, the position_ids buffer), a
    LinearTransformation head, a config.json of XLM-R's fields plus M-CLIP's, and a toy tokenizer.json.
    :return: (directory, the transformers model, the head).
    """
    transformers = pytest.importorskip("transformers")
    from test_parity import perturb
    tokenizer = build_toy_xlmr_tokenizer(CAPTIONS, vocab_size=300)
    config = transformers.XLMRobertaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=XLMR_LENGTH + 2, type_vocab_size=1, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    reference = perturb(transformers.XLMRobertaModel(config), seed=1).eval()
    head = perturb(torch.nn.Linear(32, 24), seed=2)
    state = {f"transformer.{k}": v for k, v in reference.state_dict().items()}
    assert "transformer.pooler.dense.weight" in state  # skipped by our loader
    state["transformer.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]  # int64
    state.update({"LinearTransformation.weight": head.weight.detach(), "LinearTransformation.bias": head.bias.detach()})
    directory = tmp_path_factory.mktemp("kandinsky") / "text_encoder"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    published = {**config.to_dict(), "architectures": ["MultilingualCLIP"], "transformerDimensions": 32, "numDims": 24}
    (directory / "config.json").write_text(json.dumps(published))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, reference, head


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_xlmr_matches_transformers(mclip_dir, tmp_path, layout):
    directory, reference, head = mclip_dir
    if layout == "sharded":
        directory = copy_tower(directory, tmp_path, "xlmr")
        shard(directory)
    ours, tokenizer = load_xlmr(directory, dtype=torch.float32)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    ids, mask = tokenize(tokenizer, PROMPTS)
    assert ids.shape == (len(PROMPTS), XLMR_LENGTH)
    assert mask[PROMPTS.index(LONG)].all() and ids[PROMPTS.index(LONG), -1] == 2  # truncated, </s> kept
    projected, hidden = ours(ids, mask)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        real = mask[..., None].float()
        expected_projected = head((expected * real).sum(1) / real.sum(1))  # M-CLIP's masked mean
    assert projected.shape == (len(PROMPTS), 24) and hidden.shape == (len(PROMPTS), XLMR_LENGTH, 32)
    assert (hidden - expected).abs().max() <= TOLERANCE  # padded positions too
    assert (projected - expected_projected).abs().max() <= TOLERANCE


def test_saved_directory_loads_in_diffusers_multilingual_clip(mclip_dir, tmp_path):
    """What save_xlmr writes is the published layout: the class Kandinsky 2.1's pipeline loads reads it
    and gives our outputs."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
    ours, tokenizer = load_xlmr(mclip_dir[0], dtype=torch.float32)
    save_xlmr(ours, tokenizer, tmp_path / "saved")
    theirs = MultilingualCLIP.from_pretrained(tmp_path / "saved").eval()
    ids, mask = tokenize(tokenizer, PROMPTS)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask.long())
    for a, b in zip(ours(ids, mask), expected):
        assert (a - b).abs().max() <= TOLERANCE


def test_preset_matches_the_published_architecture_key_for_key():
    """Every tensor of xlm-roberta-large under `transformer.` is mapped with its shape or skipped, and
    the preset has the count of XLMRobertaModel without its pooler plus M-CLIP's 1024 -> 768 head."""
    transformers = pytest.importorskip("transformers")
    preset = XLMR_PRESETS["xlm-roberta-large-vit-l-14"]
    published = transformers.XLMRobertaConfig(  # FacebookAI/xlm-roberta-large's config.json
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
    with torch.device("meta"):
        reference, ours = transformers.XLMRobertaModel(published), XLMRTextModel(preset)
    theirs = {f"transformer.{k}": tuple(v.shape) for k, v in reference.state_dict().items()}
    theirs.update({"LinearTransformation.weight": (768, 1024), "LinearTransformation.bias": (768,)})
    key_map = xlmr_key_map(preset)
    assert [k for k in theirs if k not in key_map and not k.startswith(XLMR_SKIPPED)] == []
    assert {key_map[k]: shape for k, shape in theirs.items() if k in key_map} == \
        {name: tuple(p.shape) for name, p in ours.named_parameters()}
    assert sum(p.numel() for p in reference.parameters()) == 559_890_432  # xlm-roberta-large, with its pooler
    assert sum(p.numel() for p in ours.parameters()) == 559_890_432 - (1024 * 1024 + 1024) + (1024 * 768 + 768)


# ----------------------------------------------------------------------------------------------------
# Token ids against SentencePiece


@pytest.fixture(scope="module")
def spm_xlmr(tmp_path_factory):
    """(SentencePiece processor, our tokenizer as load_xlmr returns it) for one unigram model."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import XLMRobertaConverter
    from test_tokenizers import train_sentencepiece
    # XLM-R's sentencepiece.bpe.model: a unigram model (despite the name) with <unk>=0 <s>=1 </s>=2, no <pad>;
    # transformers' conversion lays its pieces out in fairseq's dictionary order.
    processor, pieces, charsmap = train_sentencepiece(CAPTIONS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    kwargs = XLMRobertaConverter.convert_from_spm(vocab=pieces)
    converted = transformers.XLMRobertaTokenizer(**kwargs, _spm_precompiled_charsmap=charsmap).backend_tokenizer
    config = XLMRConfig(vocab_size=converted.get_vocab_size(), hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, transformerDimensions=8, numDims=4)
    path = tmp_path_factory.mktemp("spm")
    save_xlmr(XLMRTextModel(config), converted, path)
    return processor, load_xlmr(path)[1]


def fairseq_ids(processor, text, length=XLMR_LENGTH):
    """XLM-R's ids from SentencePiece's: <s>=0, each piece one id higher, <unk> (SentencePiece's 0) = 3,
    </s>=2 (kept when cut to `length`), then <pad>=1 up to `length`."""
    pieces = [3 if i == processor.unk_id() else i + 1 for i in processor.encode(text)]
    ids = [0] + pieces[:length - 2] + [2]
    return ids + [1] * (length - len(ids))


@pytest.mark.parametrize("text", PROMPTS, ids=lambda text: repr(text[:24]))
def test_ids_equal_sentencepiece_with_the_fairseq_offset(spm_xlmr, text):
    processor, tokenizer = spm_xlmr
    ids, mask = tokenize(tokenizer, [text])
    assert ids[0].tolist() == fairseq_ids(processor, text)
    assert mask[0].tolist() == [i != 1 for i in fairseq_ids(processor, text)]


def test_reference_covers_the_cases(spm_xlmr):
    """The prompts really exercise unknown pieces, truncation and an empty caption."""
    processor, tokenizer = spm_xlmr
    assert processor.unk_id() in processor.encode(PROMPTS[-1])
    assert len(processor.encode(LONG)) > XLMR_LENGTH
    assert tokenize(tokenizer, [""])[0][0].tolist() == [0, 2] + [1] * (XLMR_LENGTH - 2)
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.id_to_token(tokenizer.get_vocab_size() - 1) == "<mask>"


# ----------------------------------------------------------------------------------------------------
# Model details


def test_positions_count_real_tokens_after_the_pad_id():
    ids = torch.tensor([[0, 7, 8, 2, 1, 1], [1, 1, 0, 7, 2, 1]])  # right and left padding
    assert roberta_positions(ids, pad_token_id=1).tolist() == [[2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 1]]


def test_padding_does_not_change_real_positions_or_the_projection(toy_dir):
    model, tokenizer = load_xlmr(toy_dir, dtype=torch.float32)
    ids, mask = tokenize(tokenizer, ["a photo of a cat"])
    n = int(mask.sum())
    short = model(ids[:, :n + 2], mask[:, :n + 2])
    long = model(ids, mask)
    assert (short[0] - long[0]).abs().max() <= TOLERANCE
    assert (short[1][:, :n] - long[1][:, :n]).abs().max() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------
# The toy tower, save and load


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    tokenizer = build_toy_xlmr_tokenizer(CAPTIONS)
    torch.manual_seed(0)
    model = XLMRTextModel(XLMR_PRESETS["toy"])
    path = tmp_path_factory.mktemp("toy") / "text_encoder"
    save_xlmr(model, tokenizer, path)
    return path


def test_toy_preset_and_tokenizer_are_shaped_like_the_real_ones():
    tokenizer = build_toy_xlmr_tokenizer(CAPTIONS)
    assert tokenizer.get_vocab_size() <= XLMR_PRESETS["toy"].vocab_size
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.id_to_token(tokenizer.get_vocab_size() - 1) == "<mask>"
    ids, mask = tokenize(tokenizer, ["кошка на диване", "", "zebra " * 200])
    n = int(mask[0].sum())
    assert ids[0, 0] == 0 and ids[0, n - 1] == 2 and ids[0, n:].tolist() == [1] * (XLMR_LENGTH - n)
    assert 3 not in ids[0].tolist()  # Cyrillic seen in training is not unknown
    assert ids[1].tolist() == [0, 2] + [1] * (XLMR_LENGTH - 2)
    assert mask[2].all() and ids[2, 0] == 0 and ids[2, -1] == 2
    projected, hidden = XLMRTextModel(XLMR_PRESETS["toy"])(ids, mask)
    assert projected.shape == (3, 64) and hidden.shape == (3, XLMR_LENGTH, 64)


def test_round_trip_gives_identical_ids_and_outputs(toy_dir, tmp_path):
    model, tokenizer = load_xlmr(toy_dir, dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    config = json.loads((toy_dir / "config.json").read_text())
    assert config["architectures"] == ["MultilingualCLIP"] and config["transformerDimensions"] == 64
    save_xlmr(model, tokenizer, tmp_path / "again")
    texts = ["a photo of a cat", "", "кошка сидит на диване", "東京の夜景"]
    fresh = build_toy_xlmr_tokenizer(CAPTIONS)
    assert tokenize(tokenizer, texts)[0].tolist() == tokenize(fresh, texts)[0].tolist()
    for a, b in zip(outputs(toy_dir), outputs(tmp_path / "again")):
        assert torch.equal(a, b)


def test_tokenizer_in_a_sibling_directory_or_given_explicitly(toy_dir, tmp_path):
    """Kandinsky 2.1's repository keeps text_encoder/ and tokenizer/ side by side."""
    repo = tmp_path / "kandinsky-2-1"
    encoder = copy_tower(toy_dir, repo, "text_encoder")
    (repo / "tokenizer").mkdir()
    shutil.move(encoder / "tokenizer.json", repo / "tokenizer" / "tokenizer.json")
    for a, b in zip(outputs(toy_dir), outputs(encoder)):
        assert torch.equal(a, b)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(repo / "tokenizer", elsewhere)
    with pytest.raises(EmuError, match="text_encoder/tokenizer.json: tokenizer not found"):
        load_xlmr(encoder)
    assert load_xlmr(encoder, tokenizer_path=elsewhere)[1].token_to_id("<pad>") == 1


def test_bfloat16_is_close_to_float32(toy_dir):
    half, tokenizer = load_xlmr(toy_dir)
    full, _ = load_xlmr(toy_dir, dtype=torch.float32)
    ids, mask = tokenize(tokenizer, ["a photo of a cat", "кошка"])
    assert half.token_embedding.weight.dtype == torch.bfloat16
    for a, b in zip(half(ids, mask), full(ids, mask)):
        assert (a.float() - b).abs().max() < 0.1


# ----------------------------------------------------------------------------------------------------
# Errors: one line, naming the file


@pytest.mark.parametrize("edit, words", [
    ("drop transformer.encoder.layer.1.output.LayerNorm.bias", ["missing", "layer.1.output.LayerNorm.bias"]),
    ("drop LinearTransformation.weight", ["missing", "LinearTransformation.weight"]),
    ("add transformer.encoder.layer.0.attention.self.extra.weight", ["unexpected", "attention.self.extra.weight"]),
    ("reshape transformer.embeddings.position_embeddings.weight", ["shape", "position_embeddings.weight"]),
    ("reshape transformer.encoder.layer.0.intermediate.dense.weight", ["shape", "intermediate.dense.weight"]),
])
def test_bad_checkpoint_names_file_and_key(toy_dir, tmp_path, edit, words):
    directory = copy_tower(toy_dir, tmp_path, "xlmr")
    edit_weights(directory, edit)
    with pytest.raises(EmuError) as error:
        load_xlmr(directory, dtype=torch.float32)
    message = str(error.value)
    assert "model.safetensors" in message and all(w in message for w in words) and "\n" not in message


@pytest.mark.parametrize("change, words", [
    ({"hidden_act": "relu"}, ["hidden_act", "'relu'"]),
    ({"transformerDimensions": 32}, ["transformerDimensions 32", "hidden_size 64"]),
    ({"max_position_embeddings": 40}, ["max_position_embeddings 40"]),
    ({"pad_token_id": 0}, ["pad_token_id 0", "tokenizer.json"]),
    ({"numDims": None}, ["missing config keys", "numDims"]),
])
def test_bad_config_is_one_line_naming_the_file(toy_dir, tmp_path, change, words):
    directory = copy_tower(toy_dir, tmp_path, "xlmr")
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(EmuError) as error:
        load_xlmr(directory, dtype=torch.float32)
    message = str(error.value)
    assert "config.json" in message and all(w in message for w in words) and "\n" not in message


def test_pickle_checkpoint_is_refused(toy_dir, tmp_path):
    directory = copy_tower(toy_dir, tmp_path, "xlmr")
    (directory / "model.safetensors").unlink()
    torch.save({"LinearTransformation.weight": torch.zeros(2)}, directory / "pytorch_model.bin")
    with pytest.raises(EmuError, match=r"pytorch_model\.bin.*convert it to safetensors"):
        load_xlmr(directory, dtype=torch.float32)
