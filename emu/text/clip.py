"""CLIP ViT-L/14, both towers, in the layout of openai/clip-vit-large-patch14.

The text transformer (causal, quick GELU, 77 positions, pooled at the end-of-text token, projected)
conditions Emu's U-Net. The vision transformer with its projection embeds images into the same space:
the curation funnel scores image-caption agreement with it, and Kandinsky's image prior predicts it.
Both are frozen and read from one Hugging Face CLIPModel directory through explicit key maps.
"""
import html
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models

from emu import EmuError
from emu.models.nn import MultiHeadAttention
from emu.text.hf import (config_from_dict, empty_model, find_weight_files, load_hf_weights, load_tokenizer, read_config,
                         save_pretrained, set_fixed_length)

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_LENGTH = 77  # CLIP's context length
# The normalisation CLIP's image encoder was trained with (per-channel mean and std of its data).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    max_position_embeddings: int = CLIP_LENGTH
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu"
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


# The toy vocab size is a training target; make_toy_towers sets it to the size actually trained.
CLIP_PRESETS = {
    "toy": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "vit-l-14": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, projection_dim=768),
}
CLIP_VISION_PRESETS = {
    "toy": CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            projection_dim=64, image_size=32, patch_size=4),
    "vit-l-14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, projection_dim=768),
}


# ----------------------------------------------------------------------------------------------------
# Models


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer layer, the same in both towers: self-attention, then a 4x MLP."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = MultiHeadAttention(D, config.num_attention_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(D, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, D)
        self.quick_gelu = config.hidden_act == "quick_gelu"

    def forward(self, x, mask=None, causal=False):
        x = x + self.attn(self.norm1(x), context_mask=mask, causal=causal)
        h = self.fc_in(self.norm2(x))  # (B, L, 4D)
        # OpenAI trained CLIP with this sigmoid approximation of GELU, so the weights expect it.
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return x + self.fc_out(h)


class CLIPTextModel(nn.Module):
    """CLIP's text transformer plus its text projection (none with `projection=False`: Stable
    Diffusion's text_encoder/ is the bare transformer, a CLIPTextModel without the projection)."""

    def __init__(self, config, projection=True):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, D)
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(D, config.projection_dim, bias=False) if projection else None

    def forward(self, input_ids, attention_mask=None):
        """
        :param input_ids: (B, L) token ids, L <= max_position_embeddings.
        :param attention_mask: optional (B, L) bool, True at real tokens.
        :return: last_hidden (B, L, D) after the final LayerNorm, and pooled (B, projection_dim): the
                 projected hidden state at each row's first end-of-text token (without a projection,
                 that hidden state itself, (B, D)).
        """
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.layers:
            x = layer(x, mask, causal=True)
        x = self.final_norm(x)
        # The attention is causal, so only the end-of-text token has seen the whole caption.
        eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=1)  # (B,) first match
        pooled = x[torch.arange(B, device=x.device), eos_position]  # (B, D)
        return x, pooled if self.text_projection is None else self.text_projection(pooled)  # (B, P)


class CLIPVisionModel(nn.Module):
    """CLIP's vision transformer plus its visual projection: an image -> one embedding."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, P = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=P, stride=P, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.position_embedding = nn.Embedding((config.image_size // P) ** 2 + 1, D)
        self.pre_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.num_hidden_layers))
        self.post_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(D, config.projection_dim, bias=False)

    def forward(self, pixels):
        """
        :param pixels: (B, 3, S, S) images prepared by clip_preprocess, S = config.image_size.
        :return: last_hidden (B, 1 + N, D), the class token first, before the post LayerNorm; and
                 the image embedding (B, projection_dim): the class token, normalised and projected.
        """
        S = self.config.image_size
        if pixels.shape[1:] != (self.config.num_channels, S, S):
            raise ValueError(f"CLIP vision expects (B, {self.config.num_channels}, {S}, {S}) images, "
                             f"got {tuple(pixels.shape)}; use clip_preprocess")
        x = self.patch_embedding(pixels.to(self.class_embedding.dtype))  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D) one token per patch
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return x, self.visual_projection(self.post_norm(x[:, 0]))


def clip_preprocess(images, size=224):
    """emu images (B, 3, H, W) in [-1, 1] -> CLIP's input: shorter side resized to `size` (bicubic,
    antialiased), centre-cropped to size x size, normalised with CLIP's mean and std.

    The published preprocessing resizes 8-bit images with PIL; resizing float tensors differs from it
    by about one grey level, far below what moves an embedding.
    """
    H, W = images.shape[-2:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = (images.float() + 1) / 2  # [0, 1]
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def build_toy_clip_tokenizer(captions, vocab_size=CLIP_PRESETS["toy"].vocab_size):
    """Train a small byte-level BPE shaped like CLIP's: lower-cased, <|startoftext|> ... <|endoftext|>.

    Real CLIP marks word ends with a `</w>` suffix on a 512-symbol base alphabet; we mark word starts
    GPT-2 style instead, which keeps every byte encodable with the plain 256-symbol alphabet.
    Ids: <|startoftext|>=0, <|endoftext|>=1. Padding uses <|endoftext|>, as CLIP does.
    """
    tokenizer = Tokenizer(tokenizer_models.BPE())
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[CLIP_BOS, CLIP_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, 0), (CLIP_EOS, 1)])
    set_fixed_length(tokenizer, CLIP_LENGTH, CLIP_EOS)
    return tokenizer


def clip_clean(text):
    """CLIP's original text cleanup, the part that a tokenizer.json cannot express: pass it as
    tokenize(..., clean=clip_clean) so that every caption gets it before the CLIP tokenizer.

    The released tokenizer unescapes HTML entities twice ("&amp;amp;" becomes "&", "&amp;amp;amp;"
    becomes "&amp;") and lower-cases with Python, whose str.lower() writes a word-final capital sigma
    as "ς" where the tokenizers library writes "σ". The rest of its cleanup, Unicode NFC and
    whitespace runs collapsed to one space, is in the published tokenizer.json's normalizer, which
    runs after this. The original first repairs broken text with ftfy.fix_text (mojibake, curly
    quotes, ligatures, fullwidth forms); emu does not depend on ftfy and leaves such text as it is.
    Captions without "&" or upper case come out unchanged.
    """
    return html.unescape(html.unescape(text)).lower()


# ----------------------------------------------------------------------------------------------------
# Published layout: one CLIPModel directory holds both towers

# Each tower reads past the other's keys (and the contrastive temperature, which we do not use).
TEXT_SKIPPED = ("vision_model.", "visual_projection.", "logit_scale", "text_model.embeddings.position_ids")
VISION_SKIPPED = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")
LAYER_RENAMES = [("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
                 ("self_attn.out_proj", "attn.out"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                 ("mlp.fc1", "fc_in"), ("mlp.fc2", "fc_out")]


def _layer_keys(prefix, num_layers):
    """The key map of a stack of CLIPLayers published under `prefix`."""
    return {f"{prefix}.encoder.layers.{i}.{theirs}.{kind}": f"layers.{i}.{ours}.{kind}"
            for i in range(num_layers) for theirs, ours in LAYER_RENAMES for kind in ("weight", "bias")}


def clip_text_key_map(config, projection=True):
    """Published Hugging Face name -> our parameter name, for every weight of the text tower."""
    return {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "position_embedding.weight",
        **_layer_keys("text_model", config.num_hidden_layers),
        "text_model.final_layer_norm.weight": "final_norm.weight",
        "text_model.final_layer_norm.bias": "final_norm.bias",
        **({"text_projection.weight": "text_projection.weight"} if projection else {}),
    }


def clip_vision_key_map(config):
    """Published Hugging Face name -> our parameter name, for every weight of the vision tower."""
    return {
        "vision_model.embeddings.class_embedding": "class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight": "position_embedding.weight",
        "vision_model.pre_layrnorm.weight": "pre_norm.weight",  # sic: the published name
        "vision_model.pre_layrnorm.bias": "pre_norm.bias",
        **_layer_keys("vision_model", config.num_hidden_layers),
        "vision_model.post_layernorm.weight": "post_norm.weight",
        "vision_model.post_layernorm.bias": "post_norm.bias",
        "visual_projection.weight": "visual_projection.weight",
    }


def save_clip(path, tokenizer, text=None, vision=None):
    """Save one or both towers as openai/clip-vit-large-patch14 lays out a CLIPModel directory."""
    config = {"architectures": ["CLIPModel"], "model_type": "clip"}
    parts = []
    if text is not None:
        config["text_config"] = {**asdict(text.config), "model_type": "clip_text_model"}
        parts.append((text, clip_text_key_map(text.config)))
    if vision is not None:
        config["vision_config"] = {**asdict(vision.config), "model_type": "clip_vision_model"}
        parts.append((vision, clip_vision_key_map(vision.config)))
    config["projection_dim"] = (text or vision).config.projection_dim
    save_pretrained(path, config, parts, tokenizer)


def _tower_config(cls, path, section):
    """The config of one tower: a CLIPModel's `section` ("text_config"), or a flat single-tower config."""
    raw, file = read_config(path)
    values = dict(raw.get(section, raw))
    if section in raw and "projection_dim" in raw:
        # A CLIPModel's projections are sized by its top-level projection_dim; the copies inside
        # text_config and vision_config can be stale defaults (transformers writes 512 there).
        values["projection_dim"] = raw["projection_dim"]
    config = config_from_dict(cls, values, file)
    if config.hidden_act not in ("quick_gelu", "gelu"):
        raise EmuError(f"{file}: hidden_act {config.hidden_act!r} is not supported")
    return config


def load_clip_text(path, dtype=torch.bfloat16, device="cpu", projection=True):
    """Load a frozen CLIPTextModel and its tokenizer (padding to 77) from a Hugging Face directory.

    Accepts a full CLIPModel (config with "text_config") or a flat CLIPTextModelWithProjection; with
    `projection=False`, a bare CLIPTextModel (Stable Diffusion's text_encoder/, which has no
    text_projection.weight). The tokenizer is found by load_clip_tokenizer.
    """
    config = _tower_config(CLIPTextConfig, path, "text_config")
    tokenizer = load_clip_tokenizer(path, config.vocab_size)
    # The tokenizer is the authority on special ids: openai's config.json carries placeholder ids (eos 2).
    eos = tokenizer.token_to_id(CLIP_EOS)
    config = replace(config, bos_token_id=tokenizer.token_to_id(CLIP_BOS), eos_token_id=eos, pad_token_id=eos)
    set_fixed_length(tokenizer, config.max_position_embeddings, CLIP_EOS)
    model = empty_model(CLIPTextModel, config, dtype, device, projection=projection)
    load_hf_weights(model, path, clip_text_key_map(config, projection), TEXT_SKIPPED)
    return model.requires_grad_(False).eval(), tokenizer


# CLIP's word split, as the published tokenizer.json writes it: its special tokens, English
# contractions, runs of letters, single digits, and runs of anything else but spaces
CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def load_clip_tokenizer(path, vocab_size):
    """CLIP's tokenizer for the tower in `path`: the tokenizer.json there, or in a sibling tokenizer/
    (Stable Diffusion keeps text_encoder/ and tokenizer/ side by side); where only the original
    tokenizer's vocab.json and merges.txt are published (Stable Diffusion v1.5's tokenizer/), the same
    tokenizer built from those (clip_tokenizer_from_vocab)."""
    for directory in (Path(path), Path(path).parent / "tokenizer"):
        if (directory / "tokenizer.json").is_file():
            return load_tokenizer(directory, [CLIP_BOS, CLIP_EOS], vocab_size)
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = clip_tokenizer_from_vocab(directory)
            if tokenizer.get_vocab_size() > vocab_size:
                raise EmuError(f"{directory / 'vocab.json'}: {tokenizer.get_vocab_size()} tokens, more than the "
                               f"model's vocab_size {vocab_size}")
            return tokenizer
    return load_tokenizer(path, [CLIP_BOS, CLIP_EOS], vocab_size)  # the error names path/tokenizer.json


def clip_tokenizer_from_vocab(directory):
    """CLIP's byte-level BPE from `directory`/vocab.json and merges.txt, set up as the published
    tokenizer.json is: NFC, whitespace runs to one space, lower case; split into CLIP_SPLIT's pieces;
    bytes mapped to GPT-2's printable alphabet; word ends marked `</w>`; <|startoftext|> ... <|endoftext|>."""
    directory = Path(directory)
    try:
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (ValueError, UnicodeDecodeError) as e:
        raise EmuError(f"{directory}: unreadable vocab.json or merges.txt ({str(e)[:120]})") from None
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    missing = [t for t in (CLIP_BOS, CLIP_EOS) if t not in vocab]
    if missing or any(len(m) != 2 for m in merges):
        raise EmuError(f"{directory}: not CLIP's vocab.json and merges.txt (special tokens missing: {missing})")
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=merges, unk_token=CLIP_EOS, continuing_subword_prefix="",
                                               end_of_word_suffix="</w>", fuse_unk=False))
    tokenizer.add_special_tokens([CLIP_BOS, CLIP_EOS])  # already in the vocabulary: their ids stay
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing((CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]),
                                                            trim_offsets=False, add_prefix_space=False)
    return tokenizer


# Stable Diffusion v1's safety_checker/ (StableDiffusionSafetyChecker): CLIP ViT-L/14's image tower one level
# deeper ("vision_model.vision_model.*"), its projection, and the concept embeddings the checker compares with
SAFETY_CONCEPTS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")


def load_clip_vision(path, dtype=torch.bfloat16, device="cpu"):
    """Load a frozen CLIPVisionModel (with its projection) from a CLIPModel or
    CLIPVisionModelWithProjection directory, or from a Stable Diffusion folder's safety_checker/."""
    config = _tower_config(CLIPVisionConfig, path, "vision_config")
    if config.image_size % config.patch_size:
        raise EmuError(f"{path}: image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    model = empty_model(CLIPVisionModel, config, dtype, device)
    key_map, skipped = clip_vision_key_map(config), VISION_SKIPPED
    published = find_weight_files(path)[0]
    if SAFETY_CONCEPTS[0] in published:  # a safety checker
        skipped = (*VISION_SKIPPED, *SAFETY_CONCEPTS)
        if "vision_model.vision_model.embeddings.class_embedding" in published:  # as v1.5 publishes it
            key_map = {("vision_model." if k.startswith("vision_model.") else "") + k: v for k, v in key_map.items()}
            skipped = ("vision_model.vision_model.embeddings.position_ids", *SAFETY_CONCEPTS)
    load_hf_weights(model, path, key_map, skipped)
    return model.requires_grad_(False).eval()
