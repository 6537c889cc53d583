"""An analytic count of the U-Net's floating-point operations, from its config and input sizes.

This is what model FLOPs utilisation (MFU) divides by: the FLOPs the model needs, not those the
hardware happened to run (recomputation, padding and fused kernels do not change it). The
convention is the one of the PaLM paper (appendix B) and nanoGPT's estimate_mfu:

  * only matmul-like work is counted: every Conv2d, every Linear, and the two matmuls of attention
    (scores Q K^T and values P V). A multiply-add counts as 2 FLOPs; biases are not counted.
  * elementwise ops, norms, softmax, up/downsampling by interpolation and the loss are left out;
    they are memory-bound and a small fraction of the total.
  * a training step costs 3x the forward: the backward pass computes a gradient for each matmul's
    input and one for its weight, each as costly as the forward matmul.

The walk below mirrors UNet.__init__ and UNet.forward (emu/models/unet.py) piece by piece, so a change to
the architecture shows up here as the same change; tests/test_flops.py checks the count against
torch's FlopCounterMode on a real forward pass.
"""


def mm(rows, d_in, d_out):
    """FLOPs of a (rows, d_in) @ (d_in, d_out) matmul. A k x k convolution from c_in to c_out
    channels is mm(output pixels, k * k * c_in, c_out): each output pixel is one such row."""
    return 2 * rows * d_in * d_out


def res_block_flops(cfg, hw, c_in, c_out):
    """One ResBlock (emu/models/nn.py) at hw pixels, c_in -> c_out channels, for one image."""
    emb_dim = 4 * cfg.model_channels
    flops = mm(hw, 9 * c_in, c_out) + mm(hw, 9 * c_out, c_out)  # conv1, conv2 (3x3)
    flops += mm(1, emb_dim, 2 * c_out)  # FiLM: the embedding to a per-channel scale and shift
    if c_in != c_out:
        flops += mm(hw, c_in, c_out)  # the 1x1 skip convolution
    return flops


def transformer_flops(cfg, hw, c, text_tokens):
    """One SpatialTransformer over hw pixel tokens of width c, cross-attending to text_tokens,
    for one image. The head count does not matter: heads x head_dim = c."""
    self_attn = mm(hw, c, 3 * c) + mm(hw, c, c)  # q, k, v and out projections
    self_attn += mm(hw, c, hw) + mm(hw, hw, c)  # scores Q K^T (hw x hw), then P V
    cross_attn = mm(hw, c, c) + mm(text_tokens, cfg.context_dim, 2 * c) + mm(hw, c, c)  # q; k, v from the text; out
    cross_attn += mm(hw, c, text_tokens) + mm(hw, text_tokens, c)  # scores (hw x text), then P V
    feed_forward = mm(hw, c, 8 * c) + mm(hw, 4 * c, c)  # GEGLU: c -> 2 x 4c, then 4c -> c
    return 2 * mm(hw, c, c) + cfg.transformer_depth * (self_attn + cross_attn + feed_forward)  # proj_in, proj_out


def unet_flops(cfg, latent_size, clip_tokens, t5_tokens, batch=1):
    """Forward FLOPs of UNet(cfg) on `batch` latents of latent_size x latent_size pixels with
    clip_tokens + t5_tokens text tokens (after UNet.forward cuts the padding).

    :param cfg: an emu.models.unet.UNetConfig.
    :return: an int, matmul FLOPs only (see the module docstring).
    """
    levels = len(cfg.channel_mult)
    assert latent_size % 2 ** (levels - 1) == 0, f"latent size {latent_size} must be divisible by {2 ** (levels - 1)}"
    # a T5-only U-Net (the pixel models, emu/variants/pixel.py) cross-attends to the T5 tokens alone
    ch, emb_dim = cfg.model_channels, 4 * cfg.model_channels
    text_tokens = t5_tokens if cfg.t5_only else clip_tokens + t5_tokens
    text_tokens += cfg.image_tokens if cfg.image_embed_dim else 0  # a decoder's image-embedding tokens (Kandinsky)

    def stage(hw, c_in, c_out, attend):
        flops = res_block_flops(cfg, hw, c_in, c_out)
        return (flops + transformer_flops(cfg, hw, c_out, text_tokens)) if attend else flops

    # conditioning: time MLP (and the upsampler's augmentation-level MLP), the pooled text projection
    # (CLIP's pooled vector, or the mean of the T5 tokens), the token projections
    flops = (2 if cfg.aug_embedding else 1) * (mm(1, ch, emb_dim) + mm(1, emb_dim, emb_dim))
    flops += mm(1, cfg.t5_dim if cfg.t5_only else cfg.pooled_dim, emb_dim)
    flops += (0 if cfg.t5_only else mm(clip_tokens, cfg.clip_dim, cfg.context_dim)) + mm(t5_tokens, cfg.t5_dim, cfg.context_dim)
    if cfg.image_embed_dim:  # the image embedding into the time embedding and into its context tokens
        flops += mm(1, cfg.image_embed_dim, emb_dim) + mm(1, cfg.image_embed_dim, cfg.image_tokens * cfg.context_dim)

    side = latent_size
    flops += mm(side * side, 9 * (cfg.in_channels + cfg.cond_channels), ch)  # conv_in (an upsampler's low-res image too)
    skip_chs = [ch]
    # down: ResBlock (+ transformer) stages, then a stride-2 3x3 conv that outputs a quarter of the pixels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            flops += stage(side * side, ch, mult * cfg.model_channels, level in cfg.attention_levels)
            ch = mult * cfg.model_channels
            skip_chs.append(ch)
        if level != levels - 1:
            side //= 2
            flops += mm(side * side, 9 * ch, ch)
            skip_chs.append(ch)

    # middle: ResBlock -> transformer, then ResBlock
    flops += stage(side * side, ch, ch, True) + stage(side * side, ch, ch, False)

    # up: each stage takes a skip concatenated on the channels; then nearest 2x and a 3x3 conv
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for _ in range(cfg.num_res_blocks + 1):
            flops += stage(side * side, ch + skip_chs.pop(), mult * cfg.model_channels, level in cfg.attention_levels)
            ch = mult * cfg.model_channels
        if level != 0:
            side *= 2
            flops += mm(side * side, 9 * ch, ch)

    flops += mm(side * side, 9 * ch, cfg.in_channels)  # conv_out
    return batch * flops


def train_step_flops(cfg, latent_size, clip_tokens, t5_tokens, batch=1):
    """FLOPs of one training step: forward plus a backward that costs twice the forward.

    The exact backward is a little cheaper: nothing needs the gradient of the latents, the text or
    the timestep embedding, so the first conv and the conditioning projections skip their input
    gradients. MFU counts 3x the forward regardless, as PaLM and nanoGPT do.
    """
    return 3 * unet_flops(cfg, latent_size, clip_tokens, t5_tokens, batch)
