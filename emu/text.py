"""The frozen text towers that condition Emu: CLIP ViT-L/14's text transformer and T5-XXL's encoder.

Emu feeds the U-Net two sequences of text features (CLIP's and T5's last hidden states, cross-attended
with their padding masks) plus CLIP's pooled, projected caption vector. Neither tower is trained.
Both are read from Hugging Face directories (config.json, safetensors weights, tokenizer.json) through
an explicit key map, and make_toy_towers writes small random ones in that same layout for tests.
"""
import json
import math
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from emu import EmuError
from emu.attention import attention

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
CLIP_LENGTH = 77  # CLIP's context length; we pad T5 to the same length by default


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
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu"
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


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


# The toy vocab sizes are training targets; make_toy_towers sets them to the size actually trained.
CLIP_PRESETS = {
    "toy": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "vit-l-14": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, projection_dim=768),
}
T5_PRESETS = {
    "toy": T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


# ----------------------------------------------------------------------------------------------------
# Models


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections (both towers' layout)."""

    def __init__(self, dim, num_heads, head_dim, bias):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=bias)
        self.k = nn.Linear(dim, inner, bias=bias)
        self.v = nn.Linear(dim, inner, bias=bias)
        self.out = nn.Linear(inner, dim, bias=bias)

    def forward(self, x, key_padding_mask=None, position_bias=None, causal=False, scale=None):
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
                   for proj in (self.q, self.k, self.v))
        y = attention(q, k, v, key_padding_mask=key_padding_mask, bias=position_bias, causal=causal, scale=scale)
        y = y.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)  # (B, L, H * Dh)
        return self.out(y)


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer layer: causal self-attention, then a 4x MLP."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = SelfAttention(D, config.num_attention_heads, D // config.num_attention_heads, bias=True)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(D, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, D)
        self.quick_gelu = config.hidden_act == "quick_gelu"

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), key_padding_mask=mask, causal=True)
        h = self.fc_in(self.norm2(x))  # (B, L, 4D)
        # OpenAI trained CLIP with this sigmoid approximation of GELU, so the weights expect it.
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return x + self.fc_out(h)


class CLIPTextModel(nn.Module):
    """CLIP's text transformer plus its text projection."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, D)
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(D, config.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None):
        """
        :param input_ids: (B, L) token ids, L <= max_position_embeddings.
        :param attention_mask: optional (B, L) bool, True at real tokens.
        :return: last_hidden (B, L, D) after the final LayerNorm, and pooled (B, projection_dim): the
                 projected hidden state at each row's first end-of-text token.
        """
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x)
        # The attention is causal, so only the end-of-text token has seen the whole caption.
        eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=1)  # (B,) first match
        pooled = self.text_projection(x[torch.arange(B, device=x.device), eos_position])  # (B, P)
        return x, pooled


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
        self.attn = SelfAttention(config.d_model, config.num_heads, config.d_kv, bias=False)
        self.norm2 = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.ff_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.ff_down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, mask, position_bias):
        # T5 folds 1/sqrt(d) into its initialisation, so the trained weights expect scale=1.
        x = x + self.attn(self.norm1(x), key_padding_mask=mask, position_bias=position_bias, scale=1.0)
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
# Tokenizers


def set_fixed_length(tokenizer, length, pad_token):
    """Make every encoding exactly `length` ids: truncate (keeping the appended end token), then pad."""
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)


def build_toy_clip_tokenizer(captions, vocab_size=CLIP_PRESETS["toy"].vocab_size):
    """Train a small byte-level BPE shaped like CLIP's: lower-cased, <|startoftext|> ... <|endoftext|>.

    Real CLIP marks word ends with a `</w>` suffix on a 512-symbol base alphabet; we mark word starts
    GPT-2 style instead, which keeps every byte encodable with the plain 256-symbol alphabet.
    Ids: <|startoftext|>=0, <|endoftext|>=1. Padding uses <|endoftext|>, as CLIP does.
    """
    tokenizer = Tokenizer(models.BPE())
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


def build_toy_t5_tokenizer(captions, vocab_size=T5_PRESETS["toy"].vocab_size, max_length=CLIP_LENGTH):
    """Build a small Unigram tokenizer shaped like T5's: <pad>=0, </s>=1, <unk>=2, `</s>` appended.

    T5's SentencePiece vocabulary was fitted with EM. Here the pieces are every character seen plus
    the substrings covering the most text (count x length), scored by log frequency. That favours
    short pieces more than EM would, but it is reproducible, where the library's UnigramTrainer picks
    different pieces run to run. Segmentation is the same Viterbi search over piece scores as T5's.
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
    pieces = chars + longer[:max(vocab_size - 3 - len(chars), 0)]
    total = sum(counts.values())
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)] + [(p, math.log(counts[p] / total)) for p in pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    set_fixed_length(tokenizer, max_length, T5_PAD)
    return tokenizer


def tokenize(tokenizer, captions, device="cpu"):
    """Encode a list of captions to fixed-length ids (B, L) long and a real-token mask (B, L) bool."""
    if isinstance(captions, str) or len(captions) == 0:
        raise EmuError(f"captions must be a non-empty list of strings, got {captions!r:.80}")
    encodings = tokenizer.encode_batch(list(captions))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool, device=device)
    return ids, mask


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


# ----------------------------------------------------------------------------------------------------
# Hugging Face on-disk layout: config.json + model.safetensors (or shards) + tokenizer.json

# Published keys we read past on purpose: the other halves of the public checkpoints.
CLIP_SKIPPED = ("vision_model.", "visual_projection.", "logit_scale", "text_model.embeddings.position_ids")
T5_SKIPPED = ("decoder.", "lm_head.")


def clip_key_map(config):
    """Published Hugging Face name -> our parameter name, for every CLIP weight we load."""
    key_map = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "position_embedding.weight",
        "text_model.final_layer_norm.weight": "final_norm.weight",
        "text_model.final_layer_norm.bias": "final_norm.bias",
        "text_projection.weight": "text_projection.weight",
    }
    renames = [("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
               ("self_attn.out_proj", "attn.out"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
               ("mlp.fc1", "fc_in"), ("mlp.fc2", "fc_out")]
    for i in range(config.num_hidden_layers):
        for theirs, ours in renames:
            for kind in ("weight", "bias"):
                key_map[f"text_model.encoder.layers.{i}.{theirs}.{kind}"] = f"layers.{i}.{ours}.{kind}"
    return key_map


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


def _key_list(keys):
    """Up to five keys for a one-line error message."""
    keys = sorted(keys)
    return str(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def find_weight_files(path):
    """Where each published key lives: ({key: safetensors file}, the file to name in errors).

    Reads the single-file layout (model.safetensors) or the sharded one (model.safetensors.index.json
    whose "weight_map" names a shard per key). Pickled checkpoints are refused: loading them runs code.
    """
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {key: single for key in f.keys()}, single
        except SafetensorError as e:
            raise EmuError(f"{single}: not a readable safetensors file ({e})") from None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise EmuError(f"{index}: not a safetensors index (no \"weight_map\")") from None
        absent = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if absent:
            raise EmuError(f"{index}: shard files not found: {absent}")
        return {key: path / shard for key, shard in weight_map.items()}, index
    pickles = sorted(p for p in path.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise EmuError(f"{pickles[0]}: pickled checkpoints are not loaded; convert it to safetensors "
                       f"(model.safetensors) first")
    raise EmuError(f"{path}: no model.safetensors or model.safetensors.index.json")


@torch.no_grad()
def load_weights(model, path, key_map, skipped, dtype, device):
    """Fill every parameter of `model` from the checkpoint in `path`, one tensor at a time.

    All keys are checked before any tensor is read: a published key that is neither mapped nor
    deliberately skipped, or a parameter no key fills, is an EmuError listing them.
    """
    files, source = find_weight_files(path)
    unexpected = [k for k in files if k not in key_map and not k.startswith(skipped)]
    if unexpected:
        raise EmuError(f"{files[unexpected[0]]}: unexpected keys {_key_list(unexpected)}")
    # Name each parameter by its first published name (the T5 embedding has two).
    first_name = {}
    for theirs, ours in key_map.items():
        first_name.setdefault(ours, theirs)
    present = {key_map[k] for k in files if k in key_map}
    missing = [theirs for ours, theirs in first_name.items() if ours not in present]
    if missing:
        raise EmuError(f"{source}: missing keys {_key_list(missing)}")

    params = dict(model.named_parameters())
    loaded = set()
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                ours = key_map.get(key)
                if ours is None or ours in loaded:  # skipped, or the second copy of a tied weight
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(params[ours].shape):
                    raise EmuError(f"{file}: {key} has shape {shape}, expected {tuple(params[ours].shape)}")
                params[ours].copy_(f.get_tensor(key).to(dtype))
                loaded.add(ours)
    unread = [first_name[ours] for ours in params if ours not in loaded]
    if unread:  # a shard index can list keys that its shard files do not hold
        raise EmuError(f"{source}: missing keys {_key_list(unread)}")


def save_pretrained(path, config_dict, model, key_map, tokenizer):
    """Write config.json, model.safetensors (under the published key names) and tokenizer.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict["torch_dtype"] = str(model.token_embedding.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    state = model.state_dict()
    tensors, written = {}, set()
    for theirs, ours in key_map.items():
        if ours not in written:  # a tied weight is written once, under its first name
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


def _empty_model(cls, config, dtype, device):
    """Our model with uninitialised parameters of the given dtype on `device` (no random init)."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    return model.to_empty(device=device)


def save_clip_text(model, tokenizer, path):
    """Save a CLIPTextModel as openai/clip-vit-large-patch14 lays it out (text half only)."""
    text_config = {**asdict(model.config), "model_type": "clip_text_model"}
    config_dict = {"architectures": ["CLIPModel"], "model_type": "clip", "text_config": text_config,
                   "projection_dim": model.config.projection_dim}
    save_pretrained(path, config_dict, model, clip_key_map(model.config), tokenizer)


def load_clip_text(path, dtype=torch.float32, device="cpu"):
    """Load a frozen CLIPTextModel and its tokenizer (padding to 77) from a Hugging Face directory.

    Accepts a full CLIPModel (config with "text_config") or a flat CLIPTextModelWithProjection. The
    checkpoint must contain text_projection.weight (Stable Diffusion's bare text_encoder does not).
    """
    raw, config_file = read_config(path)
    values = dict(raw.get("text_config", raw))
    if "projection_dim" in raw:  # CLIPModel keeps it at the top level
        values.setdefault("projection_dim", raw["projection_dim"])
    config = config_from_dict(CLIPTextConfig, values, config_file)
    if config.hidden_act not in ("quick_gelu", "gelu"):
        raise EmuError(f"{config_file}: hidden_act {config.hidden_act!r} is not supported")
    tokenizer = load_tokenizer(path, [CLIP_BOS, CLIP_EOS], config.vocab_size)
    # The tokenizer is the authority on special ids: openai's config.json carries placeholder ids (eos 2).
    eos = tokenizer.token_to_id(CLIP_EOS)
    config = replace(config, bos_token_id=tokenizer.token_to_id(CLIP_BOS), eos_token_id=eos, pad_token_id=eos)
    set_fixed_length(tokenizer, config.max_position_embeddings, CLIP_EOS)
    model = _empty_model(CLIPTextModel, config, dtype, device)
    load_weights(model, path, clip_key_map(config), CLIP_SKIPPED, dtype, device)
    return model.requires_grad_(False).eval(), tokenizer


def save_t5_encoder(model, tokenizer, path):
    """Save a T5Encoder as a Hugging Face T5EncoderModel directory."""
    config_dict = {"architectures": ["T5EncoderModel"], "model_type": "t5", **asdict(model.config)}
    save_pretrained(path, config_dict, model, t5_key_map(model.config), tokenizer)


def load_t5_encoder(path, dtype=torch.float32, device="cpu", max_length=CLIP_LENGTH):
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
    model = _empty_model(T5Encoder, config, dtype, device)
    load_weights(model, path, t5_key_map(config), T5_SKIPPED, dtype, device)
    return model.requires_grad_(False).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------
# Conditioning: both towers behind one encode()


@dataclass
class TextEmbedding:
    """A batch of text conditioning for the U-Net (float32; masks are True at real tokens)."""
    clip: torch.Tensor  # (B, Lc, Dc) CLIP last hidden states
    clip_mask: torch.Tensor  # (B, Lc) bool
    t5: torch.Tensor  # (B, Lt, Dt) T5 last hidden states
    t5_mask: torch.Tensor  # (B, Lt) bool
    pooled: torch.Tensor  # (B, P) CLIP's projected end-of-text vector

    def to(self, device):
        return TextEmbedding(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, idx):
        """Index every field along the batch; an int gives a batch of one, so results can be cat()."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return TextEmbedding(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def __len__(self):
        return self.clip.shape[0]

    def without_padding(self):
        """The same batch with trailing padding columns cut: each sequence ends at the last position
        any row uses. Attention masks padding out, so the U-Net's output does not change; only the
        cost of projecting and attending to up to 77 + 77 mostly empty positions goes away."""
        def length(mask):
            used = mask.any(dim=0).nonzero()
            return int(used.max()) + 1 if len(used) else 1
        lc, lt = length(self.clip_mask), length(self.t5_mask)
        return TextEmbedding(clip=self.clip[:, :lc], clip_mask=self.clip_mask[:, :lc], t5=self.t5[:, :lt],
                             t5_mask=self.t5_mask[:, :lt], pooled=self.pooled)

    def where(self, keep, other):
        """Row i of this batch where keep[i] is True, else the single row of `other` (a batch of one,
        e.g. the empty caption), cut to this batch's sequence lengths."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name != "pooled":
                theirs = theirs[:, :mine.shape[1]]
            out[f.name] = torch.where(keep.view(-1, *[1] * (mine.dim() - 1)), mine, theirs)
        return TextEmbedding(**out)

    @staticmethod
    def cat(embeddings):
        """Concatenate a list of TextEmbeddings along the batch."""
        return TextEmbedding(**{f.name: torch.cat([getattr(e, f.name) for e in embeddings])
                                for f in fields(TextEmbedding)})


class TextEncoder(nn.Module):
    """The two frozen towers and their tokenizers; encode() turns captions into a TextEmbedding."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer):
        super().__init__()
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer

    @classmethod
    def load(cls, clip_dir, t5_dir, dtype=torch.float32, device="cpu", t5_max_length=CLIP_LENGTH):
        clip, clip_tokenizer = load_clip_text(clip_dir, dtype=dtype, device=device)
        t5, t5_tokenizer = load_t5_encoder(t5_dir, dtype=dtype, device=device, max_length=t5_max_length)
        return cls(clip, clip_tokenizer, t5, t5_tokenizer)

    @property
    def clip_dim(self):
        return self.clip.config.hidden_size

    @property
    def t5_dim(self):
        return self.t5.config.d_model

    @property
    def pooled_dim(self):
        return self.clip.config.projection_dim

    @torch.no_grad()
    def encode(self, captions):
        """Encode a list of captions ("" is the unconditional prompt) to a float32 TextEmbedding."""
        device = self.clip.token_embedding.weight.device
        clip_ids, clip_mask = tokenize(self.clip_tokenizer, captions, device)  # (B, 77) each
        t5_ids, t5_mask = tokenize(self.t5_tokenizer, captions, device)  # (B, Lt) each
        # CLIP was trained without a padding mask; being causal, its real tokens never see the padding.
        clip_hidden, pooled = self.clip(clip_ids)
        t5_hidden = self.t5(t5_ids, t5_mask)
        return TextEmbedding(clip=clip_hidden.float(), clip_mask=clip_mask, t5=t5_hidden.float(),
                             t5_mask=t5_mask, pooled=pooled.float())


# ----------------------------------------------------------------------------------------------------
# Toy towers


def make_toy_towers(captions, out_dir, seed=0):
    """Train toy tokenizers on `captions`, build seeded random toy towers, save both in the HF layout.

    :return: (out_dir/"clip", out_dir/"t5") as Paths, ready for TextEncoder.load.
    """
    captions = list(captions)
    clip_tokenizer = build_toy_clip_tokenizer(captions)
    t5_tokenizer = build_toy_t5_tokenizer(captions)
    clip_config = replace(CLIP_PRESETS["toy"], vocab_size=clip_tokenizer.get_vocab_size())
    t5_config = replace(T5_PRESETS["toy"], vocab_size=t5_tokenizer.get_vocab_size())
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        clip, t5 = CLIPTextModel(clip_config), T5Encoder(t5_config)
    clip_dir, t5_dir = Path(out_dir) / "clip", Path(out_dir) / "t5"
    save_clip_text(clip, clip_tokenizer, clip_dir)
    save_t5_encoder(t5, t5_tokenizer, t5_dir)
    return clip_dir, t5_dir
