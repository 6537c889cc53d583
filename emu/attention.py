"""The one attention entry point.

Every attention layer in emu (U-Net, autoencoder, text towers) calls `attention()`. Today it is
PyTorch's scaled_dot_product_attention, which runs everywhere; a fused CUDA kernel can later be
chosen here, in one place, without touching the models.
"""
import torch
import torch.nn.functional as F


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
