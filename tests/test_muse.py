import dataclasses
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emu.models import attention as attention_module
from emu.models.autoencoder import AELoss, PatchDiscriminator
from emu.models.vq import VQ_PRESETS, VectorQuantizer, VQTokenizer, codebook_usage, vq_training_losses
from emu.variants.muse import (TRANSFORMER_PRESETS, MaskedTransformer, MaskedTransformerConfig, count_parameters,
                               guided_logits, maskgit_sample, maskgit_schedule, masked_token_loss, random_mask)
from emu.text.encoder import TextEmbedding
from emu.datasets.toyworld import make_haystack


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_vq(**overrides):
    """The toy tokenizer, narrower still, so tests run in milliseconds."""
    return dataclasses.replace(VQ_PRESETS["toy"], base_channels=8, **overrides)


def small_transformer(seed=0, **overrides):
    cfg = MaskedTransformerConfig(**{"codebook_size": 16, "grid": 4, "dim": 32, "depth": 2, "heads": 2,
                                     "clip_dim": 8, "t5_dim": 12, **overrides})
    torch.manual_seed(seed)
    return MaskedTransformer(cfg).eval()


def random_text(batch, cfg, lengths=None, seed=0, lc=6, lt=5):
    """A TextEmbedding of random features; row i has lengths[i] real tokens in each sequence."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [lc] * batch)
    return TextEmbedding(clip=torch.randn(batch, lc, cfg.clip_dim, generator=g),
                         clip_mask=torch.arange(lc)[None] < lengths[:, None],
                         t5=torch.randn(batch, lt, cfg.t5_dim, generator=g),
                         t5_mask=torch.arange(lt)[None] < lengths[:, None].clamp(max=lt),
                         pooled=torch.randn(batch, 4, generator=g))


def toy_images(n, seed=0):
    """`n` 32x32 toy-world images as a (n, 3, 32, 32) tensor in [-1, 1]."""
    pixels = np.stack([image for image, _, _ in make_haystack(n, seed=seed, size=32)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


# -----------------------------------------------------------------------------
# tokenizer

def test_toy_presets_shapes_of_tokens_images_and_logits():
    torch.manual_seed(0)
    cfg = VQ_PRESETS["toy"]
    tok = VQTokenizer(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok.encode(x)
    assert tok.downsample_factor == 4 and ids.shape == (2, 8, 8) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < cfg.codebook_size
    images = tok.decode_tokens(ids)
    assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    recon, vq_loss, fwd_ids = tok(x)
    assert recon.shape == x.shape and vq_loss.dim() == 0 and torch.equal(fwd_ids, ids)
    model = MaskedTransformer(TRANSFORMER_PRESETS["toy"])
    assert model.mask_id == cfg.codebook_size
    logits = model(ids, random_text(2, model.cfg))
    assert logits.shape == (2, 64, cfg.codebook_size)


def test_muse_presets_are_f16_8192_codes_and_about_632m_parameters():
    vq, transformer = VQ_PRESETS["muse"], TRANSFORMER_PRESETS["muse"]
    assert vq.downsample_factor == 16 and vq.codebook_size == transformer.codebook_size == 8192
    assert transformer.grid == 256 // vq.downsample_factor
    assert 0.60e9 < count_parameters(transformer) < 0.66e9


def test_straight_through_passes_gradients_and_outputs_the_codes_exactly():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, _, ids = vq(z)
    assert torch.equal(quantized, vq.codebook[ids].permute(0, 3, 1, 2))
    weight = torch.randn_like(quantized)
    (quantized * weight).sum().backward()
    assert torch.equal(z.grad, weight)  # the identity

    tok = VQTokenizer(small_vq())
    recon, _, _ = tok(torch.rand(2, 3, 32, 32) * 2 - 1)
    recon.abs().mean().backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # through the quantizer to the encoder


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, ema=False)
    torch.nn.init.normal_(vq.codebook)
    flat = torch.randn(500, 8)
    ids = vq.nearest(flat)
    dist = ((flat[:, None, :] - vq.codebook[None].detach()) ** 2).sum(-1)  # (M, K)
    best = dist.min(dim=1)
    torch.testing.assert_close(dist.gather(1, ids[:, None]).squeeze(1), best.values)
    assert (ids == best.indices).float().mean() > 0.99  # anything else is a near-tie


def test_vq_loss_is_commitment_plus_codebook_term_and_only_trains_the_codebook_without_ema():
    torch.manual_seed(0)
    z = torch.randn(1, 4, 4, 4)
    for ema in (False, True):
        vq = VectorQuantizer(8, 4, beta=0.25, ema=ema).eval()
        quantized, loss, _ = vq(z)
        mse = F.mse_loss(z, quantized)
        torch.testing.assert_close(loss, (0.25 if ema else 1.25) * mse)
        assert ("codebook" in dict(vq.named_parameters())) == (not ema)  # with EMA, a buffer
    vq = VectorQuantizer(8, 4, ema=False)
    _, loss, ids = vq(z)
    loss.backward()
    used = torch.bincount(ids.flatten(), minlength=8) > 0
    assert (vq.codebook.grad[used].abs().sum(1) > 0).all() and (vq.codebook.grad[~used] == 0).all()


def ema_quantizer(codes, decay, restart_after=0):
    vq = VectorQuantizer(len(codes), codes.shape[1], ema=True, decay=decay, restart_after=restart_after)
    vq.codebook.copy_(codes)
    vq.code_sum.copy_(codes)  # cluster sizes start at one
    return vq


def test_ema_update_moves_codes_to_the_average_of_assigned_outputs():
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq = ema_quantizer(codes, decay=0.5).train()
    outputs = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])  # all nearest to code 0, mean (1, 1)
    z = outputs.t().reshape(1, 2, 1, 3)  # (B, D, h, w)
    quantized, _, ids = vq(z)
    assert (ids == 0).all() and (quantized == 0).all()  # this batch is quantized before the update
    size = torch.tensor([0.5 * 1 + 0.5 * 3, 0.5 * 1])
    code_sum = torch.stack([0.5 * codes[0] + 0.5 * outputs.sum(0), 0.5 * codes[1]])
    n, eps = size.sum(), vq.eps
    expected = code_sum / ((size + eps) / (n + 2 * eps) * n)[:, None]
    torch.testing.assert_close(vq.cluster_size, size)
    torch.testing.assert_close(vq.codebook, expected)
    assert torch.allclose(vq.codebook[0], torch.tensor([0.75, 0.75]), atol=1e-4)  # halfway to the mean
    assert torch.allclose(vq.codebook[1], codes[1], atol=1e-4)  # an unused code stays where it was


def test_eval_mode_and_encode_leave_the_codebook_unchanged():
    torch.manual_seed(0)
    tok = VQTokenizer(small_vq(restart_after=1))
    before = {k: v.clone() for k, v in tok.quantizer.state_dict().items()}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tok.encode(x)  # in training mode, encode() is still a read
    tok.eval()(x)
    for k, v in tok.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
    tok.train()(x)
    assert not torch.equal(tok.quantizer.codebook, before["codebook"])


def test_dead_codes_restart_at_encoder_outputs_of_the_batch():
    torch.manual_seed(0)
    codes = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    outputs = torch.randn(16, 2) * 0.1  # all nearest to code 0
    z = outputs.t().reshape(1, 2, 4, 4)
    vq = ema_quantizer(codes, decay=0.9, restart_after=2).train()
    vq(z)
    assert (vq.codebook[1:] > 50).all() and vq.unused_steps.tolist() == [0, 1, 1, 1]
    vq(z)  # the second unused step: codes 1..3 are dead
    for code in vq.codebook[1:]:
        assert (outputs - code).abs().sum(1).min() == 0  # exactly one of the batch's outputs
    assert vq.unused_steps.tolist() == [0, 0, 0, 0] and vq.cluster_size[1:].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(vq.code_sum[1:], vq.codebook[1:])


def test_codebook_usage_fraction_and_perplexity():
    assert codebook_usage(torch.arange(8), 8) == pytest.approx((1.0, 8.0))
    assert codebook_usage(torch.arange(8).repeat(3).view(2, 3, 4), 16) == pytest.approx((0.5, 8.0))
    assert codebook_usage(torch.zeros(2, 4, 4, dtype=torch.long), 8) == pytest.approx((1 / 8, 1.0))


def train_tokenizer(images, restart_after, steps=12, bs=8):
    torch.manual_seed(0)
    tok = VQTokenizer(small_vq(codebook_size=32, restart_after=restart_after))
    loss_fn = AELoss(PatchDiscriminator(3, 8, 1), kl_weight=0.0, disc_start=10 ** 9)  # reconstruction only
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    for step in range(steps):
        loss, _, _ = vq_training_losses(tok, loss_fn, images[(step * bs) % 32:][:bs], step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tok.eval()


def test_codebook_stays_in_use_on_toy_images_thanks_to_restarts():
    images = toy_images(48)
    train, heldout = images[:32], images[32:]
    usage, perplexity = codebook_usage(train_tokenizer(train, restart_after=3).encode(heldout), 32)
    assert usage > 0.4 and perplexity > 8, (usage, perplexity)
    # Without restarts the same run collapses onto a few codes (about 7 of 32, perplexity 4).
    usage, perplexity = codebook_usage(train_tokenizer(train, restart_after=0).encode(heldout), 32)
    assert usage < 0.4 and perplexity < 8, (usage, perplexity)


def test_tokenizer_and_discriminator_train_with_ae_loss():
    torch.manual_seed(0)
    tok = VQTokenizer(small_vq())
    disc = PatchDiscriminator(3, 8, 1)
    ae_loss = AELoss(disc, kl_weight=0.0, disc_start=0)
    opt, opt_disc = torch.optim.Adam(tok.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    x = toy_images(4)
    tok_before = [p.clone() for p in tok.parameters()]
    disc_before = [p.clone() for p in disc.parameters()]

    loss, recon, logs = vq_training_losses(tok, ae_loss, x, step=0)
    assert logs["kl"] == 0.0 and logs["adv_weight"] > 0
    assert loss.item() == pytest.approx(logs["rec"] + logs["adv_weight"] * logs["gen"] + logs["vq"], rel=1e-5)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(tok.parameters(), tok_before) if a.grad is not None)
    assert all(torch.equal(a, b) for a, b in zip(disc.parameters(), disc_before))

    disc_loss = ae_loss.discriminator_loss(x, recon, step=0)
    opt_disc.zero_grad(set_to_none=True)
    disc_loss.backward()
    opt_disc.step()
    assert torch.isfinite(disc_loss) and all(not torch.equal(a, b) for a, b in zip(disc.parameters(), disc_before))


# -----------------------------------------------------------------------------
# masked transformer

def test_transformer_is_bidirectional_and_reads_text_but_not_its_padding():
    model = small_transformer()
    ids = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    text = random_text(2, model.cfg, lengths=[3, 6])
    base = model(ids, text)
    later = ids.clone()
    later[:, -1, -1] = (later[:, -1, -1] + 1) % 16
    assert (model(later, text)[:, 0] - base[:, 0]).abs().max() > 1e-4  # the first token sees the last
    padded = dataclasses.replace(text, clip=text.clip.clone(), t5=text.t5.clone())
    padded.clip[~text.clip_mask] = 99.0
    padded.t5[~text.t5_mask] = -99.0
    torch.testing.assert_close(model(ids, padded), base, atol=1e-5, rtol=1e-5)
    assert (model(ids, random_text(2, model.cfg, lengths=[3, 6], seed=1)) - base).abs().max() > 1e-3


def test_transformer_attention_goes_through_emu_attention():
    model = small_transformer()
    with mock.patch("emu.models.nn.attention", wraps=attention_module.attention) as spy:
        model(torch.zeros(1, 4, 4, dtype=torch.long), random_text(1, model.cfg))
    assert spy.call_count == 2 * model.cfg.depth  # self- and cross-attention in every block


def test_cosine_masking_fraction_follows_the_schedule():
    g = torch.Generator().manual_seed(0)
    mask = random_mask(20000, 64, g, "cpu")
    fraction = mask.float().mean(1)
    assert abs(fraction.mean().item() - 2 / math.pi) < 0.01  # E[cos(pi/2 u)] for u ~ U(0, 1)
    assert abs(fraction.median().item() - math.cos(math.pi / 4)) < 0.02
    assert (mask.float().mean(0) - 2 / math.pi).abs().max() < 0.03  # every position alike
    small = random_mask(20000, 4, g, "cpu")
    assert small.sum(1).min() >= 1  # even when cos(pi/2 u) * N rounds to 0


class Recorder(torch.nn.Module):
    """Wraps a model; records its inputs, and optionally scrambles the logits at unmasked or masked tokens."""

    def __init__(self, model, scramble=None):
        super().__init__()
        self.model, self.mask_id, self.scramble = model, model.mask_id, scramble
        self.calls = []

    def forward(self, ids, text):
        self.calls.append((ids, text))
        logits = self.model(ids, text)
        if self.scramble:
            masked = (ids.flatten(1) == self.mask_id)[..., None]  # (B, N, 1)
            where = ~masked if self.scramble == "unmasked" else masked
            logits = torch.where(where, logits + 100 * torch.randn_like(logits), logits)
        return logits


def test_loss_counts_only_masked_positions():
    model = small_transformer()
    ids = torch.randint(0, 16, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    text, empty = random_text(4, model.cfg), random_text(1, model.cfg, lengths=[1], seed=9)
    losses = {}
    for scramble in (None, "unmasked", "masked"):
        recorder = Recorder(model, scramble)
        losses[scramble] = masked_token_loss(recorder, ids, text, empty, torch.Generator().manual_seed(1), 0.0)
    assert losses["unmasked"].item() == pytest.approx(losses[None].item(), rel=1e-6)
    assert abs(losses["masked"].item() - losses[None].item()) > 1.0
    inputs, seen = recorder.calls[0]  # the same seed masked the same tokens in every run
    masked = inputs.flatten(1) == model.mask_id
    assert masked.any(1).all() and (inputs[~masked.view(inputs.shape)] == ids[~masked.view(ids.shape)]).all()
    logits = model(inputs, seen)  # each image's masked tokens averaged, then the images
    reference = torch.stack([F.cross_entropy(logits[b][masked[b]], ids.flatten(1)[b][masked[b]]) for b in range(4)]).mean()
    torch.testing.assert_close(losses[None], reference)


def test_caption_dropout_swaps_in_the_empty_caption():
    model = small_transformer()
    ids = torch.randint(0, 16, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    text, empty = random_text(3, model.cfg), random_text(1, model.cfg, lengths=[1], seed=9)
    for p, expected in ((0.0, text), (1.0, TextEmbedding.cat([empty] * 3))):
        recorder = Recorder(model)
        masked_token_loss(recorder, ids, text, empty, torch.Generator().manual_seed(0), p)
        seen = recorder.calls[0][1]
        assert torch.equal(seen.t5, expected.t5) and torch.equal(seen.clip_mask, expected.clip_mask)


# -----------------------------------------------------------------------------
# MaskGIT decoding

def test_maskgit_schedule_is_cosine_and_ends_with_nothing_masked():
    counts = maskgit_schedule(64, 12)
    assert counts == [math.floor(64 * math.cos(math.pi / 2 * t / 12)) for t in range(1, 12)] + [0]
    assert all(a > b for a, b in zip([64] + counts, counts))  # every step decides something
    assert maskgit_schedule(4, 8)[-1] == 0 and maskgit_schedule(16, 1) == [0]


def test_maskgit_unmasks_every_token_on_schedule_and_never_changes_decided_ones():
    model = small_transformer()
    text, uncond = random_text(2, model.cfg), random_text(2, model.cfg, lengths=[1, 1], seed=9)
    history = []
    out = maskgit_sample(model, text, uncond, (4, 4), steps=6, guidance=3.0,
                         generator=torch.Generator().manual_seed(0), callback=lambda d: history.append(d["ids"].clone()))
    masked_counts = [(ids == model.mask_id).sum(dim=(1, 2)).tolist() for ids in history]
    assert masked_counts == [[n, n] for n in maskgit_schedule(16, 6)] == [[n, n] for n in (15, 13, 11, 8, 4, 0)]
    assert torch.equal(history[-1], out) and (out != model.mask_id).all() and out.max() < 16
    for before, after in zip(history, history[1:]):
        decided = before != model.mask_id
        assert torch.equal(after[decided], before[decided])


def test_maskgit_same_seed_same_tokens():
    model = small_transformer()
    text, uncond = random_text(2, model.cfg), random_text(2, model.cfg, lengths=[1, 1], seed=9)
    sample = lambda seed: maskgit_sample(model, text, uncond, (4, 4), steps=4, guidance=2.0,
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_guidance_scale_one_is_the_conditional_model_alone():
    model = small_transformer()
    ids = torch.randint(0, 17, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    text = random_text(2, model.cfg)
    uncond_a, uncond_b = random_text(2, model.cfg, seed=3), random_text(2, model.cfg, seed=4)
    torch.testing.assert_close(guided_logits(model, ids, text, uncond_a, 1.0), model(ids, text))
    sample = lambda uncond: maskgit_sample(model, text, uncond, (4, 4), steps=4, guidance=1.0,
                                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(uncond_a), sample(uncond_b))
    # Other scales: one batched call gives what two separate calls give.
    cond, unc = model(ids, text), model(ids, uncond_a)
    torch.testing.assert_close(guided_logits(model, ids, text, uncond_a, 3.0), unc + 3.0 * (cond - unc),
                               atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# MoVQ: the tokenizer with spatially conditioned decoder norms (Kandinsky's autoencoder)

def test_movq_decoder_reads_the_code_in_every_norm():
    from emu.models.nn import SpatialNorm
    torch.manual_seed(0)
    tok = VQTokenizer(small_vq(spatial_norm=True)).eval()
    norms = [m for m in tok.decoder.modules() if isinstance(m, SpatialNorm)]
    groupnorms = [m for m in tok.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and len(groupnorms) == len(norms)  # every GroupNorm of the decoder sits inside a SpatialNorm
    ids = torch.randint(0, 256, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    codes = tok.quantizer.lookup(ids)
    out = tok.decoder(codes, codes)
    # the same decoder input, another code in the norms: another image
    assert (tok.decoder(codes, tok.quantizer.lookup(ids.roll(1, dims=2))) - out).abs().max() > 1e-3
    torch.testing.assert_close(tok.decode_tokens(ids), out.clamp(-1, 1))
    x = toy_images(2)  # quantisation is kept at inference: images go through the codebook
    torch.testing.assert_close(tok(x)[0], tok.decode_codes(tok.quantizer.lookup(tok.encode(x))), atol=1e-5, rtol=1e-5)


def test_the_autoencoder_keeps_its_parameters_without_spatial_norm():
    """The spatial norms are an option: saved autoencoders hold the state dict they always held.
    The fingerprints (names and shapes) were taken before the option existed; the toy one again when the
    encoder's linear patch path came to read RGB alone (encoder.patch.weight (32, 304) -> (32, 48))."""
    import hashlib
    from emu.models.autoencoder import PRESETS, Autoencoder
    for name, expected in [("toy", (147, "4892713dff592f8ca1d49ca8989f25a10db30a77b3dd844ee392f66a381e70c7")),
                           ("emu", (239, "eb60b24b73ac41dcf474796b3231f092f2404ff8f08594348d83c7945c9ace33"))]:
        with torch.device("meta"):
            state = Autoencoder(PRESETS[name]).state_dict()
        listing = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
        assert (len(state), hashlib.sha256(listing.encode()).hexdigest()) == expected, name


def test_movq_trains_with_the_autoencoder_loss_and_keeps_its_codebook_in_use():
    images = toy_images(48)
    train, heldout = images[:32], images[32:]
    torch.manual_seed(0)
    tok = VQTokenizer(small_vq(codebook_size=32, restart_after=3, spatial_norm=True))
    loss_fn = AELoss(PatchDiscriminator(3, 8, 1), kl_weight=0.0, disc_start=10 ** 9)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    with torch.no_grad():
        before = F.l1_loss(tok.eval()(heldout)[0], heldout).item()
    tok.train()
    for step in range(24):
        loss, _, _ = vq_training_losses(tok, loss_fn, train[(step * 8) % 32:][:8], step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tok.eval()
    with torch.no_grad():
        after = F.l1_loss(tok(heldout)[0], heldout).item()
    usage, perplexity = codebook_usage(tok.encode(heldout), 32)
    assert after < 0.6 * before and usage > 0.4 and perplexity > 8, (before, after, usage, perplexity)
