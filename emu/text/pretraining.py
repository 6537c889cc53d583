"""Pretraining the toy towers the way the real ones were pretrained.

Emu's text towers come frozen and already trained: CLIP ViT-L/14 contrastively on 400M image-alt-text
pairs (Radford et al. 2021), T5 on web text by span corruption (Raffel et al. 2020). What the U-Net
gets from them is a space where captions that mean different things lie apart, and where an
attribute ("red", "on the left") is carried by the features in a form a small network can read. A
randomly initialised tower gives neither, so the toy world trains its own towers briefly, with the
same two objectives, before they are frozen:

  * CLIP: the symmetric InfoNCE loss over a batch of (image, caption) pairs. The text tower and the
    vision tower each embed their side, both are L2-normalised, and the batch's cosine-similarity
    matrix, scaled by a learned temperature, is classified along its rows (which caption is this
    image's?) and its columns (which image is this caption's?).
  * T5: span corruption. A random 15% of a caption's tokens, in spans of mean length 3, are cut
    out, each span replaced by one sentinel token (<extra_id_0>, <extra_id_1>, ...); a decoder reads
    the encoder's output and writes the cut spans after their sentinels. Only the encoder is kept:
    Emu, like Imagen, uses T5's encoder alone, so the small decoder here exists for training only.

Kandinsky 2.1's multilingual tower was made in two stages:

  * XLM-R: a language model of web text in 100 languages (Conneau et al. 2020); the toy one learns its two
    languages by T5's span corruption instead of RoBERTa's masked tokens (train_xlmr says why).
  * M-CLIP (Carlsson et al. 2022): CLIP stays frozen as the teacher. XLM-RoBERTa with a linear head, the student, reads a
    caption in any language (machine-translated from English) and is trained by mean squared error
    to put its projected vector where CLIP's text tower puts the English original. No images are
    needed: the student inherits CLIP's image-text alignment through the teacher's text space.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from emu.text.clip import clip_clean, clip_preprocess
from emu.text.hf import tokenize
from emu.text.t5 import T5_EOS, T5_PAD, sentinel_ids
from emu.text.xlmr import XLMR_BOS, XLMR_EOS, XLMR_MASK, XLMR_PAD

# ----------------------------------------------------------------------------------------------------
# CLIP: contrastive image-text pretraining


def contrastive_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's loss: cross-entropy of the scaled cosine similarities, image->text and text->image."""
    image_embeds, text_embeds = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # (B, B), pairs on the diagonal
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_clip(text, vision, tokenizer, images, captions, steps=400, batch_size=256, lr=2e-3, seed=0, log=None):
    """Train both CLIP towers in place on (image, caption) pairs with the contrastive loss.

    :param images: (N, 3, H, W) float in [-1, 1]; captions: N strings, the i-th describing image i.
    :return: the training losses, one per step.
    """
    # trained on ids cut to the longest caption; frozen, the tower reads them padded to 77, which a causal
    # CLIP does not see before its end token
    ids, _ = tokenize(tokenizer, captions, clean=clip_clean, trim=True)
    pixels = clip_preprocess(images, size=vision.config.image_size)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature, 0.07
    params = [*text.parameters(), *vision.parameters(), logit_scale]
    return _train(params, steps, lr, len(ids), batch_size, seed, log, "CLIP contrastive",
                  lambda idx: contrastive_loss(vision(pixels[idx])[1], text(ids[idx])[1], logit_scale))


# ----------------------------------------------------------------------------------------------------
# T5: span corruption


def span_corruption(tokens, sentinels, rng, density=0.15, mean_span=3.0):
    """T5's denoising objective on one sequence of token ids (without its end token).

    :return: (input ids, target ids): the input with each cut span replaced by the next sentinel; the
             target is each sentinel followed by the span it replaced. Both end with </s> (added later).
    """
    n = len(tokens)
    noise = min(max(1, round(n * density)), n - 1)
    spans = min(max(1, round(noise / mean_span)), noise, len(sentinels))
    # random compositions: `noise` cut tokens into `spans` non-empty runs, the kept ones into the gaps between
    lengths = np.diff([0, *sorted(rng.choice(np.arange(1, noise), spans - 1, replace=False)), noise])
    kept = n - noise
    gaps = np.diff([0, *sorted(rng.integers(0, kept + 1, spans)), kept])  # spans + 1 gaps, any may be empty
    inputs, targets, at = [], [], 0
    for i in range(spans):
        inputs += tokens[at:at + gaps[i]]
        at += gaps[i]
        inputs.append(sentinels[i])
        targets += [sentinels[i], *tokens[at:at + lengths[i]]]
        at += lengths[i]
    inputs += tokens[at:]
    return inputs, targets


class SpanDecoder(nn.Module):
    """A small transformer decoder for span corruption: causal self-attention over the target written
    so far, cross-attention to the encoder's states, tied input and output embeddings. Thrown away after
    training (T5's decoder is not part of what Emu loads)."""

    def __init__(self, embedding, num_layers=2, num_heads=4):
        super().__init__()
        D = embedding.embedding_dim
        self.embedding = embedding
        layer = nn.TransformerDecoderLayer(D, num_heads, 4 * D, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(D))

    def forward(self, target_in, memory, memory_mask):
        L = target_in.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=target_in.device), 1)
        x = self.layers(self.embedding(target_in), memory, tgt_mask=causal, memory_key_padding_mask=~memory_mask)
        return x @ self.embedding.weight.T * x.shape[-1] ** -0.5  # (B, L, vocab) logits, scaled as T5 does a tied head


def pad_sequences(sequences, pad_id):
    """(B, L) ids padded with `pad_id` to the longest sequence, and the (B, L) mask of real ids."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, ids != pad_id


def span_corruption_batch(token_lists, sentinels, pad, eos, rng, bos=None):
    """Encoder input (behind `bos` when given, as XLM-R's <s>), decoder input (the target shifted right
    behind </pad>, T5's start token) and decoder target for a batch of captions' token ids."""
    pairs = [span_corruption(tokens, sentinels, rng) for tokens in token_lists]
    start = [] if bos is None else [bos]
    enc, enc_mask = pad_sequences([start + p[0] + [eos] for p in pairs], pad)
    target, target_mask = pad_sequences([p[1] + [eos] for p in pairs], pad)
    target_in = torch.cat([torch.full((len(pairs), 1), pad), target[:, :-1]], dim=1)
    return enc, enc_mask, target_in, target.masked_fill(~target_mask, -100)


class SpanCorruption:
    """T5's objective for any encoder: loss(idx) is its loss on those of `token_lists` (captions' token ids
    without the tokenizer's start and end tokens), through a SpanDecoder tied to the encoder's word embeddings.

    :param encode: (ids, mask) -> the encoder's last hidden states (B, L, D).
    :param bos: a start token the encoder's input begins with (XLM-R's <s>); T5's has none.
    """

    def __init__(self, encode, embedding, token_lists, sentinels, pad, eos, bos=None, num_heads=4, seed=0):
        self.encode, self.sentinels, self.pad, self.eos, self.bos = encode, sentinels, pad, eos, bos
        self.token_lists = [t for t in token_lists if len(t) >= 2]  # a span and something left to read
        self.decoder = SpanDecoder(embedding, num_heads=num_heads)
        self.rng = np.random.default_rng([seed, 5])

    def __len__(self):
        return len(self.token_lists)

    def parameters(self):
        """The decoder's own parameters: not the word embeddings it shares with the encoder."""
        return [p for p in self.decoder.parameters() if p is not self.decoder.embedding.weight]

    def loss(self, idx):
        enc, enc_mask, target_in, target = span_corruption_batch([self.token_lists[i] for i in idx], self.sentinels,
                                                                 self.pad, self.eos, self.rng, self.bos)
        logits = self.decoder(target_in, self.encode(enc, enc_mask), enc_mask)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def train_t5(t5, tokenizer, captions, steps=400, batch_size=256, lr=2e-3, seed=0, log=None):
    """Train a T5Encoder in place by span corruption on `captions`; its tokenizer must have sentinels.

    :return: the training losses, one per step.
    """
    pad, eos = tokenizer.token_to_id(T5_PAD), tokenizer.token_to_id(T5_EOS)
    ids, mask = tokenize(tokenizer, captions)
    token_lists = [row[m].tolist()[:-1] for row, m in zip(ids, mask)]  # drop the appended </s>
    task = SpanCorruption(t5, t5.token_embedding, token_lists, sentinel_ids(tokenizer), pad, eos,
                          num_heads=t5.config.num_heads, seed=seed)
    return _train([*t5.parameters(), *task.parameters()], steps, lr, len(task), batch_size, seed, log,
                  "T5 span corruption", task.loss)


# ----------------------------------------------------------------------------------------------------
# XLM-R: a language model first


def xlmr_span_corruption(model, tokenizer, captions, seed=0):
    """Span corruption for an XLMRTextModel on `captions`: every cut span becomes XLM-R's own <mask>
    (its vocabulary has no sentinels), the encoder reads `<s> ... </s>`."""
    ids, mask = tokenize(tokenizer, captions, trim=True)
    token_lists = [row[m].tolist()[1:-1] for row, m in zip(ids, mask)]  # without <s> and </s>
    ids_of = tokenizer.token_to_id
    return SpanCorruption(lambda ids, mask: model(ids, mask)[1], model.token_embedding, token_lists,
                          [ids_of(XLMR_MASK)] * 8, ids_of(XLMR_PAD), ids_of(XLMR_EOS), bos=ids_of(XLMR_BOS),
                          num_heads=model.config.num_attention_heads, seed=seed)


def train_xlmr(model, task, steps=400, batch_size=256, lr=2e-3, seed=0, log=None):
    """Train an XLMRTextModel's encoder in place as a language model: `task` is its xlmr_span_corruption on
    captions in any language, kept for train_mclip's rehearsal.

    The real XLM-R learned its languages by masked language modelling on 2.5 TB of text (Conneau et al.
    2020). The toy one gets 200 steps, and there RoBERTa's objective (15% of the tokens chosen; 80% of
    those masked, 10% random, 10% kept; each predicted from its own position's state) left token states
    that a Kandinsky decoder trained 1400 steps on them did not learn to read: it drew the background,
    which M-CLIP's vector carries, and nothing the words alone say. T5's span corruption, the same family
    of denoising objective but read back by a decoder's cross-attention, which is how the U-Net reads the
    states too, gives states it does read (README, "The text towers"). So the toy XLM-R learns its
    language by span corruption.

    :return: the training losses, one per step.
    """
    return _train([*model.parameters(), *task.parameters()], steps, lr, len(task), batch_size, seed, log,
                  "XLM-R span corruption", task.loss)


# ----------------------------------------------------------------------------------------------------
# M-CLIP: distilling CLIP's text space into a multilingual tower


@torch.no_grad()
def clip_text_embeddings(text, tokenizer, captions):
    """The CLIP text tower's pooled, projected vector of each caption, (N, P): M-CLIP's targets."""
    ids, _ = tokenize(tokenizer, captions, clean=clip_clean, trim=True)
    return text(ids)[1]


def train_mclip(student, tokenizer, teacher_embeds, captions, steps=400, batch_size=256, lr=2e-3, seed=0, log=None,
                rehearse=None, rehearse_batch=0, rehearse_weight=1.0):
    """Train an XLMRTextModel in place so that its projected vector of each caption matches the frozen
    teacher's CLIP text embedding of that caption's English original, by mean squared error.

    The teacher is frozen, so its embeddings are computed once by the caller (clip_text_embeddings), not in every step. An
    English caption's target is its own embedding; a translation's target is its original's.
    :param teacher_embeds: (N, P) the CLIP text tower's pooled, projected vector of each caption's
        English original, P = the student's numDims.
    :param captions: N strings, the i-th in any language, meaning what the i-th English original says.
    :param rehearse: the student's language task (xlmr_span_corruption, as train_xlmr trained it), which it
        keeps learning beside the distillation, on `rehearse_batch` captions a step, that loss weighted by
        `rehearse_weight` (not in M-CLIP). A small tower pulled towards one mean vector alone forgets its
        language, and its token states collapse onto what the teacher encodes; Kandinsky's decoder reads
        those states, so they must keep telling the words apart.
    :return: the training losses (the distillation's), one per step.
    """
    # trained on ids cut to the longest caption: the padding is masked out of attention and of the mean
    ids, mask = tokenize(tokenizer, captions, trim=True)
    targets = teacher_embeds.detach().float()
    with torch.no_grad():
        # Not in M-CLIP: the head starts at the teacher's mean vector. A teacher's embeddings share a large
        # common part and differ by little, and the differences are what tell captions apart; starting at
        # the common part, training spends its steps on them.
        student.projection.bias.copy_(targets.mean(dim=0))
    params, losses = list(student.parameters()), []
    if rehearse is not None:
        params += rehearse.parameters()
        gen = torch.Generator().manual_seed(seed + 13)

    def loss(idx):
        distill = F.mse_loss(student(ids[idx], mask[idx])[0], targets[idx])
        losses.append(distill.item())
        if rehearse is None:
            return distill
        return distill + rehearse_weight * rehearse.loss(torch.randint(len(rehearse), (rehearse_batch,), generator=gen))

    _train(params, steps, lr, len(ids), batch_size, seed, log, "M-CLIP distillation", loss)
    return losses


# ----------------------------------------------------------------------------------------------------


def _train(params, steps, lr, n, batch_size, seed, log, name, loss_fn):
    """AdamW with a linear warm-up over the first tenth and a cosine decay; a random batch each step."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 4) == 0:
            log(f"{name} step {step + 1}/{steps}: loss {np.mean(losses[-20:]):.3f}")
    return losses
