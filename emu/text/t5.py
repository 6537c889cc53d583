"""T5 v1.1's encoder, in the layout of google/t5-v1_1-xxl: the second text tower that conditions Emu.

RMSNorm without mean or bias, gated-GELU feed-forward, one relative-position bias table shared by
all layers, and attention without the 1/sqrt(d) scale. Loaded frozen, encoder only, from a
T5EncoderModel or a full T5ForConditionalGeneration checkpoint (single file or shards).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import processors

from emu import EmuError
from emu.models.nn import MultiHeadAttention
from emu.text.hf import (build_toy_unigram, config_from_dict, empty_model, load_hf_weights, load_tokenizer, read_config,
                         save_pretrained, set_fixed_length)

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_LENGTH = 77  # we pad T5 to CLIP's length by default; the paper does not give T5's
# Span corruption's sentinels (emu/text/pretraining.py): T5 has 100, at the end of its vocabulary; the toy one has 8.
T5_SENTINEL = "<extra_id_{}>"
TOY_SENTINELS = 8


# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int  # width of one attention head; num_heads * d_kv need not equal d_model
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1; the original T5's "relu" is not supported
    pad_token_id: int = 0
    eos_token_id: int = 1


T5_PRESETS = {
    "toy": T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


# ----------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    """T5's layer norm: divide by the root mean square, scale; no mean subtraction and no bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()  # the mean of squares overflows in half precision
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """Map key-minus-query offsets to T5's bidirectional buckets.

    Half the buckets are for keys after the query, half for keys before. Within each half, small
    offsets get a bucket each; larger ones share logarithmically wider buckets up to max_distance,
    and everything farther lands in the last bucket.

    :param relative_position: integer tensor of (key position - query position).
    :return: long tensor of the same shape, values in [0, num_buckets).
    """
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    # Clamping keeps log() finite for small n; those positions take the exact branch anyway.
    log_ratio = torch.log(n.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


class T5Layer(nn.Module):
    """Pre-RMSNorm T5 encoder layer: unscaled self-attention with a position bias, then gated GELU."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = MultiHeadAttention(config.d_model, config.num_heads, head_dim=config.d_kv, out_bias=False)
        self.norm2 = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.ff_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.ff_down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, mask, position_bias):
        # T5 folds 1/sqrt(d) into its initialisation, so the trained weights expect scale=1.
        x = x + self.attn(self.norm1(x), context_mask=mask, bias=position_bias, scale=1.0)
        h = self.norm2(x)
        h = F.gelu(self.ff_gate(h), approximate="tanh") * self.ff_up(h)  # (B, L, d_ff)
        return x + self.ff_down(h)


class T5Encoder(nn.Module):
    """The encoder half of T5 v1.1 (no dropout: the tower is only ever run frozen)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        # One bias table for the whole stack: the checkpoint keeps it in block 0 and every layer reuses it.
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = nn.ModuleList(T5Layer(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, length, device):
        """The additive attention bias from relative positions, (1, H, L, L)."""
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # (Lq, Lk) key minus query
        buckets = relative_position_bucket(relative, self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, Lq, Lk)

    def forward(self, input_ids, attention_mask=None):
        """
        :param input_ids: (B, L) token ids.
        :param attention_mask: optional (B, L) bool, True at real tokens; padded keys are ignored.
        :return: (B, L, d_model) hidden states after the final norm.
        """
        x = self.token_embedding(input_ids)  # (B, L, D)
        bias = self.position_bias(input_ids.shape[1], input_ids.device)
        mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.layers:
            x = layer(x, mask, bias)
        return self.final_norm(x)



# ----------------------------------------------------------------------------------------------------
# Tokenizer


def build_toy_t5_tokenizer(captions, vocab_size=T5_PRESETS["toy"].vocab_size, max_length=T5_LENGTH):
    """Build a small Unigram tokenizer shaped like T5's (emu.text.hf.build_toy_unigram):
    <pad>=0, </s>=1, <unk>=2, the pieces, then the sentinels; `</s>` appended to every caption."""
    sentinels = [T5_SENTINEL.format(i) for i in range(TOY_SENTINELS)]  # after the pieces, as in T5
    tokenizer = build_toy_unigram(captions, [T5_PAD, T5_EOS, T5_UNK], sentinels, vocab_size, T5_UNK)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    set_fixed_length(tokenizer, max_length, T5_PAD)
    return tokenizer


def sentinel_ids(tokenizer):
    """The ids of <extra_id_0>, <extra_id_1>, ... that `tokenizer` has, in that order."""
    ids = []
    while (i := tokenizer.token_to_id(T5_SENTINEL.format(len(ids)))) is not None:
        ids.append(i)
    return ids


# ----------------------------------------------------------------------------------------------------
# Published layout

# A full checkpoint also holds the decoder and the language-model head; the encoder reads past them.
T5_SKIPPED = ("decoder.", "lm_head.")


def t5_key_map(config):
    """Published Hugging Face name -> our parameter name, for every T5 encoder weight we load.

    The token embedding appears under two names (`shared` and its tied copy `encoder.embed_tokens`);
    either one is enough, and `shared.weight` comes first because that is the name we write.
    """
    key_map = {
        "shared.weight": "token_embedding.weight",
        "encoder.embed_tokens.weight": "token_embedding.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "relative_attention_bias.weight",
        "encoder.final_layer_norm.weight": "final_norm.weight",
    }
    renames = [("0.layer_norm", "norm1"), ("0.SelfAttention.q", "attn.q"), ("0.SelfAttention.k", "attn.k"),
               ("0.SelfAttention.v", "attn.v"), ("0.SelfAttention.o", "attn.out"), ("1.layer_norm", "norm2"),
               ("1.DenseReluDense.wi_0", "ff_gate"), ("1.DenseReluDense.wi_1", "ff_up"),
               ("1.DenseReluDense.wo", "ff_down")]
    for i in range(config.num_layers):
        for theirs, ours in renames:
            key_map[f"encoder.block.{i}.layer.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    return key_map


def save_t5_encoder(model, tokenizer, path):
    """Save a T5Encoder as a Hugging Face T5EncoderModel directory."""
    config_dict = {"architectures": ["T5EncoderModel"], "model_type": "t5", **asdict(model.config)}
    save_pretrained(path, config_dict, [(model, t5_key_map(model.config))], tokenizer)


def load_t5_encoder(path, dtype=torch.bfloat16, device="cpu", max_length=T5_LENGTH):
    """Load a frozen T5Encoder and its tokenizer (padding to `max_length`) from a Hugging Face directory.

    Reads T5EncoderModel and full T5ForConditionalGeneration checkpoints (the decoder is skipped).
    Run T5-XXL in float32 or bfloat16: its activations overflow float16.
    """
    raw, config_file = read_config(path)
    config = config_from_dict(T5Config, raw, config_file)
    if config.feed_forward_proj != "gated-gelu":
        raise EmuError(f"{config_file}: feed_forward_proj {config.feed_forward_proj!r} is not supported "
                       f"(only T5 v1.1's gated-gelu)")
    tokenizer = load_tokenizer(path, [T5_PAD, T5_EOS], config.vocab_size)
    set_fixed_length(tokenizer, max_length, T5_PAD)
    model = empty_model(T5Encoder, config, dtype, device)
    load_hf_weights(model, path, t5_key_map(config), T5_SKIPPED)
    return model.requires_grad_(False).eval(), tokenizer


