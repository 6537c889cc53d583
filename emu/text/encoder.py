"""The frozen text conditioning of Emu: both towers behind one encode().

Emu feeds the U-Net two sequences of text features (CLIP ViT-L's and T5-XXL's last hidden states,
cross-attended with their padding masks) plus CLIP's pooled, projected caption vector. Neither tower
is trained. The towers live in emu/text/clip.py and emu/text/t5.py and are read from Hugging Face directories
(emu/text/hf.py); make_toy_towers writes small ones in that same layout, pretrained for the toy world
(emu/text/pretraining.py) or random for tests, and beside them a toy XLM-R, Kandinsky 2.1's multilingual
tower (emu/text/xlmr.py): a language model of the toy captions in English and Russian, then distilled
from the toy CLIP.

The batches of conditioning are dataclasses of tensors (Conditioning): TextEmbedding is Emu's,
TextImageEmbedding adds the CLIP image embedding Kandinsky's decoder reads, and
MultilingualImageEmbedding is that decoder's conditioning when it reads XLM-R (MultilingualTextEncoder)
instead of CLIP's and T5's tokens.
"""
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from emu.text.clip import (CLIP_PRESETS, CLIP_VISION_PRESETS, CLIPTextModel, CLIPVisionModel, build_toy_clip_tokenizer,
                           clip_clean, load_clip_text, save_clip)
from emu.text.hf import tokenize
from emu.text.pretraining import (clip_text_embeddings, train_clip, train_mclip, train_t5, train_xlmr,
                                  xlmr_span_corruption)
from emu.text.t5 import T5_LENGTH, T5_PRESETS, T5Encoder, build_toy_t5_tokenizer, load_t5_encoder, save_t5_encoder
from emu.text.xlmr import XLMR_PRESETS, XLMRTextModel, build_toy_xlmr_tokenizer, load_xlmr, save_xlmr

# The dtypes the towers may run in; not float16, which T5's activations overflow.
TEXT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# ----------------------------------------------------------------------------------------------------
# Conditioning: both towers behind one encode()


class Conditioning:
    """What every batch of conditioning below can do. Each field is a float or bool tensor with the
    batch first; a sequence field `x` has its mask (True at real tokens) in the field `x_mask`; the
    fields named in VECTORS are one vector per row."""

    VECTORS = ()

    def to(self, device):
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, idx):
        """Index every field along the batch; an int gives a batch of one, so results can be cat()."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return type(self)(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def __len__(self):
        return getattr(self, fields(self)[0].name).shape[0]

    def sequences(self):
        """The names of the sequence fields, those with a mask."""
        names = [f.name for f in fields(self)]
        return [name for name in names if name + "_mask" in names]

    def without_padding(self):
        """The same batch with trailing padding columns cut: each sequence ends at the last position
        any row uses. Attention masks padding out, so the U-Net's output does not change; only the
        cost of projecting and attending to up to 77 + 77 mostly empty positions goes away."""
        def length(mask):
            used = mask.any(dim=0).nonzero()
            return int(used.max()) + 1 if len(used) else 1
        cut = {}
        for name in self.sequences():
            mask = getattr(self, name + "_mask")
            n = length(mask)
            cut[name], cut[name + "_mask"] = getattr(self, name)[:, :n], mask[:, :n]
        return replace(self, **cut)

    def where(self, keep, other):
        """Row i of this batch where keep[i] is True, else the single row of `other` (a batch of one,
        e.g. the empty caption), cut to this batch's sequence lengths."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name not in self.VECTORS:
                theirs = theirs[:, :mine.shape[1]]
            out[f.name] = torch.where(keep.view(-1, *[1] * (mine.dim() - 1)), mine, theirs)
        return type(self)(**out)

    @staticmethod
    def cat(embeddings):
        """Concatenate a list of conditioning batches (all of one class) along the batch."""
        cls = type(embeddings[0])
        return cls(**{f.name: torch.cat([getattr(e, f.name) for e in embeddings]) for f in fields(cls)})


@dataclass
class TextEmbedding(Conditioning):
    """A batch of text conditioning for the U-Net (float32; masks are True at real tokens)."""
    clip: torch.Tensor  # (B, Lc, Dc) CLIP last hidden states
    clip_mask: torch.Tensor  # (B, Lc) bool
    t5: torch.Tensor  # (B, Lt, Dt) T5 last hidden states
    t5_mask: torch.Tensor  # (B, Lt) bool
    pooled: torch.Tensor  # (B, P) CLIP's projected end-of-text vector

    VECTORS = ("pooled",)


@dataclass
class TextImageEmbedding(TextEmbedding):
    """Text conditioning plus a CLIP image embedding per row: what Kandinsky's decoder U-Net is
    conditioned on (emu/variants/kandinsky.py). The image embedding comes from CLIP's vision tower (training,
    image variations), from the image prior (text to image), or is zeros for the empty caption
    (the unconditional input classifier-free guidance compares against)."""
    image: torch.Tensor = None  # (B, E) CLIP's projected image vector

    VECTORS = ("pooled", "image")


@dataclass
class MultilingualImageEmbedding(Conditioning):
    """What Kandinsky 2.1's decoder reads with its multilingual tower (kandinsky_paper.txt, section 3;
    emu/variants/kandinsky.py with an XLM-R): XLM-R's last hidden states as the cross-attention
    context, M-CLIP's projected vector of them as the pooled vector, and a CLIP image embedding. No
    CLIP or T5 tokens: the caption reaches the decoder through XLM-R, and through CLIP's text tower
    only by way of the image prior's embedding."""
    xlmr: torch.Tensor  # (B, L, D) XLM-R's last hidden states
    xlmr_mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, P) M-CLIP's vector: the states' masked mean through its linear map
    image: torch.Tensor  # (B, E) CLIP's projected image vector

    VECTORS = ("pooled", "image")


def drop_captions(text, empty, p, generator):
    """Replace each caption's embedding by the empty caption's with probability p: the model also
    learns the unconditional prediction that classifier-free guidance needs."""
    keep = torch.rand(len(text), generator=generator, device=generator.device) >= p
    return text.where(keep, empty)


class TextEncoder(nn.Module):
    """The two frozen towers and their tokenizers; encode() turns captions into a TextEmbedding."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer):
        super().__init__()
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer

    @classmethod
    def load(cls, clip_dir, t5_dir, dtype=torch.bfloat16, device="cpu", t5_max_length=T5_LENGTH):
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
        clip_ids, clip_mask = tokenize(self.clip_tokenizer, captions, device, clean=clip_clean)  # (B, 77) each
        t5_ids, t5_mask = tokenize(self.t5_tokenizer, captions, device)  # (B, Lt) each
        # CLIP was trained without a padding mask; being causal, its real tokens never see the padding.
        clip_hidden, pooled = self.clip(clip_ids)
        t5_hidden = self.t5(t5_ids, t5_mask)
        return TextEmbedding(clip=clip_hidden.float(), clip_mask=clip_mask, t5=t5_hidden.float(),
                             t5_mask=t5_mask, pooled=pooled.float())


class MultilingualTextEncoder(nn.Module):
    """Kandinsky 2.1's frozen multilingual tower (XLM-R with M-CLIP's head, emu/text/xlmr.py) and its
    tokenizer. encode() gives the (states, mask, vector) that a MultilingualImageEmbedding holds."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, path, dtype=torch.bfloat16, device="cpu"):
        return cls(*load_xlmr(path, dtype=dtype, device=device))

    @property
    def dim(self):
        return self.model.config.hidden_size

    @property
    def vector_dim(self):
        return self.model.config.numDims

    @torch.no_grad()
    def encode(self, captions):
        """Captions ("" is the unconditional prompt) -> float32 states (B, L, D), mask (B, L), vector (B, P)."""
        ids, mask = tokenize(self.tokenizer, captions, self.model.token_embedding.weight.device)
        vector, states = self.model(ids, mask)
        return states.float(), mask, vector.float()


# ----------------------------------------------------------------------------------------------------
# Toy towers


def make_toy_towers(captions, out_dir, seed=0, images=None, steps=0, batch_size=256, lr=2e-3, log=None, translated=(),
                    multilingual=(), xlmr=True):
    """Train toy tokenizers on `captions`, build seeded toy towers, save them in the HF layout.

    Beside Emu's two towers, a toy XLM-R (Kandinsky 2.1's multilingual tower, emu/text/xlmr.py) whose
    tokenizer is trained on `captions`, `multilingual` (more captions, in other languages too) and both
    sides of `translated`, (English caption, the same in another language) pairs: data/make_toy.py gives
    the haystack's web captions in Russian and every toy scene's caption in English and Russian.
    With `steps` > 0 the towers are pretrained first, as the real ones were (emu/text/pretraining.py):
    CLIP's text and vision towers contrastively on `images` ((N, 3, H, W) in [-1, 1]) paired with the
    first N captions, T5 by span corruption on all the captions, `steps` steps of `batch_size` each at
    peak learning rate `lr`. The XLM-R first learns the language of `captions` and `multilingual` (by span
    corruption, emu.text.pretraining.train_xlmr), as the real one learned 100 languages from web text,
    `steps` steps; then it is distilled from the trained CLIP text tower as M-CLIP was, on both sides of
    `translated` (or, without it, on `captions`): 4 * `steps` steps of `batch_size` // 8 captions, since
    steps on text alone are cheap, and many small ones fit the teacher better than a few large ones of
    the same cost. Meanwhile it rehearses its language task, as many captions a step, at equal weight
    (train_mclip's `rehearse`): distilled alone, its token states, which Kandinsky's decoder reads, fall
    to what the toy CLIP's vector says, the background.
    With `steps` 0 they stay random. `xlmr` False leaves the XLM-R out (CLIP and T5 come out the same).
    The CLIP directory is a whole CLIPModel (text and vision towers), as the published one is.
    :return: (out_dir/"clip", out_dir/"t5", out_dir/"xlmr") as Paths; the first two are what
             TextEncoder.load reads, the third is what load_xlmr reads (None without `xlmr`).
    """
    captions = list(captions)
    clip_tokenizer = build_toy_clip_tokenizer(captions)
    t5_tokenizer = build_toy_t5_tokenizer(captions)
    clip_config = replace(CLIP_PRESETS["toy"], vocab_size=clip_tokenizer.get_vocab_size())
    t5_config = replace(T5_PRESETS["toy"], vocab_size=t5_tokenizer.get_vocab_size())
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        clip, t5 = CLIPTextModel(clip_config), T5Encoder(t5_config)
        vision = CLIPVisionModel(CLIP_VISION_PRESETS["toy"])
        if steps:
            if images is None:
                raise ValueError("make_toy_towers: pretraining the towers (steps > 0) needs the captions' images")
            train_clip(clip, vision, clip_tokenizer, images, captions[:len(images)], steps, batch_size, lr, seed, log)
            train_t5(t5, t5_tokenizer, captions, steps, batch_size, lr, seed, log)
        # built last, so that CLIP's and T5's random draws do not depend on it
        xlmr_tower = (_make_toy_xlmr(clip, clip_tokenizer, captions, multilingual, translated, steps, batch_size, lr, seed, log)
                      if xlmr else None)
    clip_dir, t5_dir, xlmr_dir = Path(out_dir) / "clip", Path(out_dir) / "t5", Path(out_dir) / "xlmr"
    save_clip(clip_dir, clip_tokenizer, text=clip, vision=vision)
    save_t5_encoder(t5, t5_tokenizer, t5_dir)
    if xlmr_tower is None:
        return clip_dir, t5_dir, None
    save_xlmr(*xlmr_tower, xlmr_dir)
    return clip_dir, t5_dir, xlmr_dir


def _make_toy_xlmr(clip, clip_tokenizer, captions, multilingual, translated, steps, batch_size, lr, seed, log):
    """make_toy_towers' XLM-R: (model, tokenizer). It reads `captions` and `multilingual` as a language
    model, then is distilled from the (trained) `clip` on both sides of `translated`, or on `captions`."""
    text = captions + list(multilingual)
    english, other = ([e for e, _ in translated], [o for _, o in translated]) if translated else (captions, [])
    tokenizer = build_toy_xlmr_tokenizer(text + [c for pair in translated for c in pair])
    config = replace(XLMR_PRESETS["toy"], vocab_size=tokenizer.get_vocab_size(),
                     numDims=clip.config.projection_dim)  # it lands in CLIP's text space
    model = XLMRTextModel(config)
    if steps:
        language = xlmr_span_corruption(model, tokenizer, text, seed)
        train_xlmr(model, language, steps, batch_size, lr, seed, log)
        teacher = clip_text_embeddings(clip, clip_tokenizer, english)  # the frozen teacher's targets, once
        # both languages of a caption have the same target, the English caption's
        small = max(1, batch_size // 8)
        train_mclip(model, tokenizer, torch.cat([teacher] * (2 if other else 1)), english + other, 4 * steps,
                    small, lr, seed, log, rehearse=language, rehearse_batch=small, rehearse_weight=1.0)
    return model, tokenizer
