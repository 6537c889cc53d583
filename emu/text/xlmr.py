"""XLM-RoBERTa-large with M-CLIP's head: Kandinsky 2.1's multilingual text tower, in the layout of
kandinsky-community/kandinsky-2-1's text_encoder/ (the MultilingualCLIP that diffusers loads).

XLM-RoBERTa is BERT's architecture trained as RoBERTa on text in 100 languages: learned absolute
positions, post-LayerNorm layers, exact GELU, and a SentencePiece vocabulary of 250k pieces. M-CLIP
(Carlsson et al. 2022) distilled it into CLIP ViT-L/14's text space: the mean of the last hidden
states over the real tokens, through one linear layer, lands where CLIP's text embedding of the same
caption (in English) would. Kandinsky 2.1 conditions its U-Net on both outputs: the projected vector
and the hidden states. The tower is loaded frozen.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import processors

from emu import EmuError
from emu.models.nn import MultiHeadAttention
from emu.text.hf import (build_toy_unigram, config_from_dict, empty_model, load_hf_weights, load_tokenizer, read_config,
                         save_pretrained, set_fixed_length)

# XLM-R's ids follow fairseq's dictionary, not SentencePiece's: <s>=0, <pad>=1, </s>=2, <unk>=3, then the
# SentencePiece pieces (each one id higher than in the .model file, whose own ids are <unk>=0 <s>=1 </s>=2),
# and <mask> last.
XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK, XLMR_MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
XLMR_LENGTH = 77  # Kandinsky 2.1 pads its prompts to 77 tokens, CLIP's length


# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass(frozen=True)
class XLMRConfig:
    """The fields of a Hugging Face XLMRobertaConfig that the model depends on, plus M-CLIP's two."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    transformerDimensions: int  # M-CLIP: the projection's input width (= hidden_size); the published name
    numDims: int  # M-CLIP: the projection's output width, CLIP ViT-L/14's embedding width (768)
    max_position_embeddings: int = 514  # 512 positions after RoBERTa's offset of pad_token_id + 1 = 2
    type_vocab_size: int = 1  # one segment type: XLM-R has no next-sentence task
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_act: str = "gelu"  # the exact, erf-based GELU


# The toy vocab size is a target: a toy tokenizer builder may fit fewer pieces from few captions. 1000 keeps
# every word of the toy's English and Russian web captions whole; at 600 the inflected Russian words and
# the English junk around them ("photo of") were cut into letters.
XLMR_PRESETS = {
    "toy": XLMRConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256, transformerDimensions=64, numDims=64,
                      max_position_embeddings=XLMR_LENGTH + 2),
    "xlm-roberta-large-vit-l-14": XLMRConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                                             num_attention_heads=16, intermediate_size=4096,
                                             transformerDimensions=1024, numDims=768),
}


# ----------------------------------------------------------------------------------------------------
# Model


def roberta_positions(input_ids, pad_token_id):
    """RoBERTa's position ids: real tokens count pad_token_id + 1, pad_token_id + 2, ... in order,
    every <pad> gets pad_token_id itself.

    fairseq numbers positions after the padding index, so that padding has a position of its own
    whose embedding it never trains. The count runs over non-pad tokens only, which makes a caption's
    positions the same whether padding sits after it or (in a left-padded batch) before it.

    :param input_ids: (B, L) token ids.
    :return: (B, L) long position ids.
    """
    real = (input_ids != pad_token_id).long()
    return torch.cumsum(real, dim=1) * real + pad_token_id


class XLMRLayer(nn.Module):
    """Post-LayerNorm transformer layer (BERT's): each sublayer's output is added to its input and
    the sum normalised, where CLIP and T5 normalise before the sublayer instead."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.attn = MultiHeadAttention(D, config.num_attention_heads, qkv_bias=True)  # scale 1/sqrt(D / heads)
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(D, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, D)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, x, mask):
        x = self.norm1(x + self.attn(x, context_mask=mask))
        h = F.gelu(self.fc_in(x))  # (B, L, intermediate_size)
        return self.norm2(x + self.fc_out(h))


class XLMRTextModel(nn.Module):
    """XLM-RoBERTa's encoder plus M-CLIP's head (no pooler, no dropout: the tower only runs frozen)."""

    def __init__(self, config):
        super().__init__()
        if config.transformerDimensions != config.hidden_size:
            raise ValueError(f"transformerDimensions {config.transformerDimensions} must equal hidden_size "
                             f"{config.hidden_size}: M-CLIP projects the encoder's output")
        self.config = config
        D = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, D)
        # BERT's segment embedding. XLM-R has a single segment, so its one row is a learned bias.
        self.token_type_embedding = nn.Embedding(config.type_vocab_size, D)
        self.embed_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(XLMRLayer(config) for _ in range(config.num_hidden_layers))
        self.projection = nn.Linear(config.transformerDimensions, config.numDims)  # M-CLIP's LinearTransformation

    def forward(self, input_ids, attention_mask=None):
        """
        :param input_ids: (B, L) token ids, L <= max_position_embeddings - pad_token_id - 1.
        :param attention_mask: optional (B, L) bool, True at real tokens; default: the ids that are not <pad>.
        :return: the projected masked mean (B, numDims) and the last hidden states (B, L, hidden_size),
                 in the order of the published MultilingualCLIP's outputs.
        """
        pad = self.config.pad_token_id
        mask = (input_ids != pad) if attention_mask is None else attention_mask.bool()
        positions = roberta_positions(input_ids, pad)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        x = self.embed_norm(x + self.token_type_embedding.weight[0])  # every token is of type 0
        for layer in self.layers:
            x = layer(x, mask)
        # M-CLIP's pooling: the mean over real tokens, <s> and </s> included. Summed in float32,
        # where bfloat16's 8-bit mantissa would round away most of 77 small terms.
        weights = mask.float()[:, :, None]  # (B, L, 1)
        mean = (x.float() * weights).sum(dim=1) / weights.sum(dim=1)  # (B, D)
        return self.projection(mean.to(x.dtype)), x


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def build_toy_xlmr_tokenizer(captions, vocab_size=XLMR_PRESETS["toy"].vocab_size, max_length=XLMR_LENGTH):
    """Build a small Unigram tokenizer shaped like XLM-R's (emu.text.hf.build_toy_unigram): <s>=0,
    <pad>=1, </s>=2, <unk>=3, the pieces, <mask> last; every caption becomes `<s> ... </s>`, cut keeping
    `</s>` and padded with <pad> to `max_length`."""
    tokenizer = build_toy_unigram(captions, [XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK], [XLMR_MASK], vocab_size,
                                  XLMR_UNK)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{XLMR_BOS} $A {XLMR_EOS}", special_tokens=[(XLMR_BOS, 0), (XLMR_EOS, 2)])
    set_fixed_length(tokenizer, max_length, XLMR_PAD)
    return tokenizer


def find_tokenizer_dir(path, tokenizer_path=None):
    """The directory holding the tower's tokenizer.json: `tokenizer_path` when given, else `path`
    itself, else a sibling `tokenizer/` (Kandinsky 2.1's repository keeps text_encoder/ and
    tokenizer/ side by side) when only that one has a tokenizer.json."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    path = Path(path)
    sibling = path.parent / "tokenizer"
    if not (path / "tokenizer.json").is_file() and (sibling / "tokenizer.json").is_file():
        return sibling
    return path


# ----------------------------------------------------------------------------------------------------
# Published layout

# The pooler (a dense layer on <s>, for classification) is unused by M-CLIP. Checkpoints written by
# older transformers also hold the integer buffers of position and token-type ids, which we compute.
XLMR_SKIPPED = ("transformer.pooler.", "transformer.embeddings.position_ids", "transformer.embeddings.token_type_ids")
LAYER_RENAMES = [("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
                 ("attention.self.value", "attn.v"), ("attention.output.dense", "attn.out"),
                 ("attention.output.LayerNorm", "norm1"), ("intermediate.dense", "fc_in"),
                 ("output.dense", "fc_out"), ("output.LayerNorm", "norm2")]


def xlmr_key_map(config):
    """Published Hugging Face name -> our parameter name, for every weight of a MultilingualCLIP."""
    key_map = {
        "transformer.embeddings.word_embeddings.weight": "token_embedding.weight",
        "transformer.embeddings.position_embeddings.weight": "position_embedding.weight",
        "transformer.embeddings.token_type_embeddings.weight": "token_type_embedding.weight",
        "transformer.embeddings.LayerNorm.weight": "embed_norm.weight",
        "transformer.embeddings.LayerNorm.bias": "embed_norm.bias",
    }
    for i in range(config.num_hidden_layers):
        for theirs, ours in LAYER_RENAMES:
            for kind in ("weight", "bias"):
                key_map[f"transformer.encoder.layer.{i}.{theirs}.{kind}"] = f"layers.{i}.{ours}.{kind}"
    key_map["LinearTransformation.weight"] = "projection.weight"
    key_map["LinearTransformation.bias"] = "projection.bias"
    return key_map


def save_xlmr(model, tokenizer, path):
    """Save an XLMRTextModel as kandinsky-2-1's text_encoder/ lays out a MultilingualCLIP, with the
    tokenizer.json beside it.

    The published config.json names the architecture MultilingualCLIP but keeps XLM-R's model_type.
    """
    config_dict = {"architectures": ["MultilingualCLIP"], "model_type": "xlm-roberta",
                   "bos_token_id": 0, "eos_token_id": 2, **asdict(model.config)}
    save_pretrained(path, config_dict, [(model, xlmr_key_map(model.config))], tokenizer)


def load_xlmr(path, dtype=torch.bfloat16, device="cpu", max_length=XLMR_LENGTH, tokenizer_path=None):
    """Load a frozen XLMRTextModel and its tokenizer (padding to `max_length`) from a MultilingualCLIP
    directory (single file or shards; pickles are refused).

    :param tokenizer_path: the directory of tokenizer.json; default `path`, or its sibling
        `tokenizer/` when `path` has none (see find_tokenizer_dir).
    """
    raw, config_file = read_config(path)
    config = config_from_dict(XLMRConfig, raw, config_file)
    if config.hidden_act != "gelu":
        raise EmuError(f"{config_file}: hidden_act {config.hidden_act!r} is not supported (only XLM-R's exact 'gelu')")
    if config.transformerDimensions != config.hidden_size:
        raise EmuError(f"{config_file}: transformerDimensions {config.transformerDimensions} differs from "
                       f"hidden_size {config.hidden_size}")
    if max_length + config.pad_token_id + 1 > config.max_position_embeddings:
        raise EmuError(f"{config_file}: max_position_embeddings {config.max_position_embeddings} holds at most "
                       f"{config.max_position_embeddings - config.pad_token_id - 1} tokens, not {max_length}")
    directory = find_tokenizer_dir(path, tokenizer_path)
    tokenizer = load_tokenizer(directory, [XLMR_BOS, XLMR_PAD, XLMR_EOS], config.vocab_size)
    if tokenizer.token_to_id(XLMR_PAD) != config.pad_token_id:
        # The positions are counted from the pad id, so the tokenizer and the model must agree on it.
        raise EmuError(f"{directory / 'tokenizer.json'}: {XLMR_PAD} is id {tokenizer.token_to_id(XLMR_PAD)}, "
                       f"but {config_file} has pad_token_id {config.pad_token_id}")
    set_fixed_length(tokenizer, max_length, XLMR_PAD)
    model = empty_model(XLMRTextModel, config, dtype, device)
    load_hf_weights(model, path, xlmr_key_map(config), XLMR_SKIPPED)
    return model.requires_grad_(False).eval(), tokenizer
