"""The one attention entry point.

Every attention layer in emu (U-Net, autoencoder, text towers) calls `attention()`. It is PyTorch's
scaled_dot_product_attention (SDPA), which runs everywhere, unless the fused CUDA kernel
(emu/models/fused_attention.py, emu/models/csrc/flash_attention.cu) is chosen. The choice is made here, in one place,
by the environment variable EMU_ATTENTION or by set_backend():

    sdpa   (default) always SDPA
    auto   the fused kernel where it applies (CUDA tensors, head dim 64 or 128, no bias, not causal)
           and is built, else SDPA
    fused  the fused kernel, or an error saying why it does not apply

SDPA stays the default while the fused kernel lacks a tensor-core path (its tiles are computed with
scalar fused multiply-adds), which SDPA's flash backend has.

Under "auto", tensors that are not on a CUDA device take SDPA without looking at the fused kernel at
all: CPU results are SDPA's bit for bit, and nothing is imported or built for them.
"""
import os

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "auto", "fused")
_backend = os.environ.get("EMU_ATTENTION", "sdpa")  # set_backend() changes it
if _backend not in BACKENDS:
    raise ValueError(f"EMU_ATTENTION must be one of {', '.join(BACKENDS)}, got {_backend!r}")


def attention(q, k, v, key_padding_mask=None, bias=None, causal=False, scale=None):
    """Multi-head attention softmax(q k^T * scale + bias) v.

    :param q: (B, H, Nq, D) queries.
    :param k: (B, H, Nk, D) keys.
    :param v: (B, H, Nk, D) values.
    :param key_padding_mask: optional (B, Nk) bool, True where the key is a real token.
    :param bias: optional additive float bias broadcastable to (B, H, Nq, Nk) (T5's position bias).
    :param causal: mask out keys after the query position (CLIP's text transformer).
    :param scale: logit scale; default 1/sqrt(D). T5 uses 1.0.
    :return: (B, H, Nq, D)
    """
    if _backend == "fused" or (_backend == "auto" and q.is_cuda):
        out = _fused(q, k, v, key_padding_mask, bias, causal, scale)
        if out is not None:
            return out
    mask = bias
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        pad = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        mask = pad if mask is None else mask + pad
    if causal and mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1)
        mask = mask.masked_fill(future, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _fused(q, k, v, key_padding_mask, bias, causal, scale):
    """The fused kernel's output; where it does not apply, None under "auto" and an error under "fused"."""
    from emu.models import fused_attention  # only here: it registers the ops and may build the CUDA extension
    reason = fused_attention.unsupported_reason(q, k, v, key_padding_mask, bias, causal)
    if reason is None:
        return fused_attention.fused_attention(q, k, v, key_padding_mask, scale)
    if _backend == "fused":
        raise RuntimeError(f"attention backend 'fused': the fused kernel does not apply: {reason}")
    return None


def set_backend(name):
    """Choose the attention implementation for every later call: "auto", "sdpa" or "fused"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    _backend = name


def get_backend():
    """The current choice: "auto", "sdpa" or "fused"."""
    return _backend
