"""Kandinsky's decoder (emu/variants/kandinsky.py): MoVQ latents, the image-text conditioning, inpainting."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emu import EmuError
from emu.arch import get_arch
from emu.text.clip import CLIP_VISION_PRESETS, CLIPVisionModel, clip_preprocess
from emu.diffusion import GaussianDiffusion
from emu.variants.inpaint import box_mask, outpaint_window
from emu.variants.kandinsky import (KANDINSKY_PRESETS, ImageTextEncoder, InpaintingDiffusion, MoVQLatents,
                                    decoder_config, decoder_generate, fuse_embeddings)
from emu.models.vq import VQ_PRESETS, VQTokenizer
from emu.variants.prior import LinearPrior
from emu.text.encoder import MultilingualImageEmbedding, MultilingualTextEncoder, TextEmbedding, TextImageEmbedding
from emu.text.hf import tokenize
from emu.text.xlmr import XLMR_PRESETS, XLMRTextModel, build_toy_xlmr_tokenizer
from emu.models.unet import UNet, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeTowers:
    """A text encoder's interface over fixed random embeddings per caption (the towers are tested elsewhere)."""
    clip_dim, t5_dim, pooled_dim = 8, 12, 10

    def encode(self, captions):
        rows = []
        for c in captions:
            g = torch.Generator().manual_seed(len(c) * 7919 + sum(map(ord, c)))
            rows.append(TextEmbedding(clip=torch.randn(1, 5, 8, generator=g), clip_mask=torch.ones(1, 5, dtype=torch.bool),
                                      t5=torch.randn(1, 4, 12, generator=g), t5_mask=torch.ones(1, 4, dtype=torch.bool),
                                      pooled=torch.randn(1, 10, generator=g)))
        return TextEmbedding.cat(rows)


def small_movq(scale=1.0):
    torch.manual_seed(0)
    cfg = dataclasses.replace(VQ_PRESETS["toy-movq"], base_channels=8, codebook_size=32, latent_scale=scale)
    return VQTokenizer(cfg).eval()


def vision():
    torch.manual_seed(1)
    return CLIPVisionModel(dataclasses.replace(CLIP_VISION_PRESETS["toy"], hidden_size=32, intermediate_size=64,
                                               num_attention_heads=2, projection_dim=6)).eval()


def test_movq_latents_are_continuous_scaled_and_quantised_before_decoding():
    tok = small_movq(scale=2.5)
    movq = MoVQLatents(tok)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = movq.encode(images)
        assert z.shape == (2, 16, 8, 8) and movq.latent_channels == 16 and movq.downsample_factor == 4
        torch.testing.assert_close(z, tok.quant_conv(tok.encoder(images)) * 2.5)
        # decoding snaps to the nearest codes: exactly the tokenizer's decode of its own token ids
        torch.testing.assert_close(movq.decode(z).clamp(-1, 1), tok.decode_tokens(tok.encode(images)))
        # so a small change of the latents that keeps every nearest code changes nothing
        assert torch.equal(movq.decode(z), movq.decode(z + 1e-6))
        unquantised = MoVQLatents(tok, quantize=False)
        assert not torch.equal(unquantised.decode(z), movq.decode(z))
    with pytest.raises(EmuError, match="MoVQ"):
        MoVQLatents(VQTokenizer(VQ_PRESETS["toy"]))  # a tokenizer without the spatial norm


def test_the_conditioning_takes_images_embeddings_or_the_prior_and_zeros_for_the_empty_caption():
    towers, clip = FakeTowers(), vision()
    encoder = ImageTextEncoder(towers, clip)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = encoder.encode(["a", ""], images=images)
    assert isinstance(cond, TextImageEmbedding) and cond.image.shape == (2, 6)
    with torch.no_grad():
        torch.testing.assert_close(cond.image, clip(clip_preprocess(images, 32))[1])  # even for "" with its image
    torch.testing.assert_close(cond.pooled, towers.encode(["a", ""]).pooled)
    given = torch.randn(2, 6)
    assert torch.equal(encoder.encode(["a", "b"], image_embeds=given).image, given)
    assert torch.equal(encoder.encode(["", ""]).image, torch.zeros(2, 6))  # the unconditional input
    with pytest.raises(EmuError, match="needs an image prior"):
        encoder.encode(["a red circle"])
    prior = LinearPrior(10, 6)
    torch.nn.init.normal_(prior.proj.weight)
    with_prior = ImageTextEncoder(towers, clip, prior)
    out = with_prior.encode(["a red circle", ""])
    torch.testing.assert_close(out.image[0], prior(towers.encode(["a red circle"]))[0])
    assert torch.equal(out.image[1], torch.zeros(6))
    # caption dropout swaps in the empty caption's row, image embedding included
    dropped = out.where(torch.tensor([False, True]), with_prior.encode([""]))
    assert torch.equal(dropped.image, torch.zeros(2, 6)) and torch.equal(dropped.pooled[1], out.pooled[1])
    with pytest.raises(EmuError, match="maps 7-wide text embeddings"):
        ImageTextEncoder(towers, clip, LinearPrior(7, 6))


def test_the_decoder_unet_reads_the_image_embedding_and_the_inpainting_one_its_inputs():
    towers = ImageTextEncoder(FakeTowers(), vision())
    cfg = decoder_config("toy", 16, towers)
    assert (cfg.in_channels, cfg.clip_dim, cfg.t5_dim, cfg.pooled_dim, cfg.image_embed_dim, cfg.cond_channels) == (16, 8, 12, 10, 6, 0)
    assert decoder_config("toy-inpaint", 16, towers).cond_channels == 17  # the masked latents and the mask
    arch = get_arch("kandinsky")
    assert set(arch.presets) == {"toy", "toy-inpaint", "kandinsky", "kandinsky-inpaint"}
    with pytest.raises(EmuError, match="needs MoVQ"):
        arch.build("toy", VQTokenizer(VQ_PRESETS["toy"]), towers)
    # the paper's decoder: 1.22B parameters (ours 1.26B, see KANDINSKY_PRESETS)
    assert 1.2e9 < count_parameters(KANDINSKY_PRESETS["kandinsky"]) < 1.3e9


class CountingTowers(FakeTowers):
    """FakeTowers that count the captions they encode."""
    encoded = 0

    def encode(self, captions):
        self.encoded += len(captions)
        return super().encode(captions)


def small_xlmr():
    """A random XLM-R with M-CLIP's head, 16 wide, projecting to 10 (FakeTowers' pooled width), and its tokenizer."""
    tokenizer = build_toy_xlmr_tokenizer(["a red circle on the left", "красный круг слева", "two blue squares", "два синих квадрата"],
                                         vocab_size=60)
    torch.manual_seed(2)
    config = dataclasses.replace(XLMR_PRESETS["toy"], vocab_size=tokenizer.get_vocab_size(), hidden_size=16,
                                 transformerDimensions=16, intermediate_size=32, numDims=10)
    return MultilingualTextEncoder(XLMRTextModel(config).eval(), tokenizer)


def test_the_multilingual_decoder_reads_xlmr_in_place_of_clip_and_t5_tokens():
    towers, clip, xlmr = CountingTowers(), vision(), small_xlmr()
    prior = LinearPrior(10, 6)
    torch.nn.init.normal_(prior.proj.weight)
    encoder = ImageTextEncoder(towers, clip, prior, xlmr=xlmr)
    captions = ["красный круг слева", "two blue squares", ""]
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    # training: XLM-R's states and vector, CLIP's image embedding; CLIP's and T5's text towers are not run
    cond = encoder.encode(captions, images=images)
    assert isinstance(cond, MultilingualImageEmbedding) and towers.encoded == 0
    ids, mask = tokenize(xlmr.tokenizer, captions)
    with torch.no_grad():
        vector, states = xlmr.model(ids, mask)
        torch.testing.assert_close(cond.image, clip(clip_preprocess(images, 32))[1])
    torch.testing.assert_close(cond.xlmr, states)
    torch.testing.assert_close(cond.pooled, vector)
    assert torch.equal(cond.xlmr_mask, mask)
    # text alone: the linear prior reads M-CLIP's vector in place of CLIP's pooled one (so a Russian prompt
    # reaches it), and the empty caption gets a zero image embedding
    alone = encoder.encode(captions)
    through_mclip = prior(dataclasses.replace(towers.encode(captions[:2]), pooled=vector[:2]))
    torch.testing.assert_close(alone.image[:2], through_mclip)
    assert (through_mclip - prior(towers.encode(captions[:2]))).abs().max() > 1e-3
    assert torch.equal(alone.image[2], torch.zeros(6)) and torch.equal(alone.xlmr, cond.xlmr)
    # caption dropout swaps in the empty caption's row, cut to the batch's length
    dropped = cond.where(torch.tensor([True, False, True]), encoder.encode([""]))
    assert torch.equal(dropped.xlmr[1], cond.xlmr[2]) and torch.equal(dropped.image[1], torch.zeros(6))
    assert torch.equal(dropped.xlmr[0], cond.xlmr[0])

    cfg = decoder_config("toy", 16, encoder)
    assert (cfg.xlmr_dim, cfg.pooled_dim, cfg.image_embed_dim) == (16, 10, 6)
    torch.manual_seed(3)
    unet = UNet(cfg).eval()
    assert unet.clip_proj is None and unet.t5_proj is None and unet.xlmr_proj.in_features == 16
    for weight in unet.parameters():  # the zero-initialised output layers, so that every input reaches the output
        if not weight.any():
            torch.nn.init.normal_(weight, std=0.1)
    x, t = torch.randn(3, 16, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = unet(x, t, cond)
        # a caption's output does not depend on the longer captions padded beside it
        torch.testing.assert_close(unet(x[:1], t[:1], encoder.encode(captions[:1], images=images[:1])), out[:1])
        # and it reads the caption: the same image embedding with another caption gives another output
        other = encoder.encode(["два синих квадрата"] * 3, image_embeds=cond.image)
        assert (unet(x, t, other) - out).abs().max() > 1e-3
        # through its tokens (the cross-attention context) as well as its vector
        assert (unet(x, t, dataclasses.replace(cond, xlmr=cond.xlmr.flip(1))) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="set one"):
        UNet(dataclasses.replace(cfg, t5_only=True))


def test_inpainting_trains_on_random_masks_with_the_hole_blanked_in_its_input():
    objective = InpaintingDiffusion(GaussianDiffusion("linear", 1000, "eps"))
    latents = torch.randn(8, 4, 8, 8)
    draws = objective.training_noise(latents, 0.0, torch.Generator().manual_seed(0))
    assert set(draws) == {"t", "noise", "mask"} and draws["mask"].shape == (8, 1, 8, 8)
    assert set(draws["mask"].unique().tolist()) <= {0.0, 1.0} and (draws["mask"].flatten(1).mean(1) > 0).all()
    seen = {}

    def model(x, t, text, cond):
        seen["cond"] = cond
        return torch.zeros_like(x)

    loss = objective.training_loss(model, latents, None, **draws)
    mask = draws["mask"]
    assert torch.equal(seen["cond"][:, 4:], mask)
    assert torch.equal(seen["cond"][:, :4], latents * (1 - mask))  # what is known, and zeros in the hole
    torch.testing.assert_close(loss, draws["noise"].pow(2).mean())  # a zero prediction misses all the noise
    a = objective.check_loss(model, latents, None)
    cond_a = seen["cond"]
    assert objective.check_loss(model, latents, None) == a and torch.equal(seen["cond"], cond_a)  # fixed draws
    # --whole-masks: every mask the whole image, so the model reads nothing of the latents
    whole = InpaintingDiffusion(GaussianDiffusion("linear", 1000, "eps"), whole=1.0)
    assert (whole.training_noise(latents, 0.0, torch.Generator().manual_seed(0))["mask"] == 1).all()


def test_inpainting_keeps_the_known_region_and_outpainting_extends_the_canvas():
    towers = ImageTextEncoder(FakeTowers(), vision())
    movq = MoVQLatents(small_movq())
    torch.manual_seed(2)
    unet = UNet(decoder_config("toy-inpaint", 16, towers)).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # an untrained model that still paints something
    diffusion = GaussianDiffusion("linear", 1000, "eps")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = box_mask(32, (0.25, 0.25, 0.75, 0.5)).expand(2, -1, -1, -1)
    text, uncond = towers.encode(["a", "b"], images=images), towers.encode(["", ""])
    out = decoder_generate(unet, movq, diffusion, text, uncond, [0, 1], (32, 32), 3.0, 3, "ddim", 0.0, (images, mask))
    keep = mask.expand_as(images) == 0
    assert torch.equal(out[keep], images[keep])  # what the person kept stays exactly as it was
    assert (out[~keep] - images[~keep]).abs().mean() > 0.05  # the hole is painted anew
    # the hole's content never reaches the model: changing it changes nothing
    other = images + 0.5 * mask
    assert torch.equal(out, decoder_generate(unet, movq, diffusion, text, uncond, [0, 1], (32, 32), 3.0, 3, "ddim", 0.0,
                                             (other.clamp(-1, 1), mask)))
    # outpainting: a canvas 16 pixels wider on each side, the image in its middle
    canvas, border, _ = outpaint_window(images, -16, 0, 64, 32)
    wide = decoder_generate(unet, movq, diffusion, text, uncond, [0, 1], (32, 64), 3.0, 3, "ddim", 0.0, (canvas, border))
    assert wide.shape == (2, 3, 32, 64) and torch.equal(wide[..., 16:48], images)
    assert (wide[..., :16] != 0).float().mean() > 0.9  # the grey border was painted
    # a decoder that is not an inpainting one refuses a mask
    plain = UNet(decoder_config("toy", 16, towers)).eval()
    with pytest.raises(EmuError, match="need an inpainting decoder"):
        decoder_generate(plain, movq, diffusion, text, uncond, [0, 1], (32, 32), 3.0, 3, "ddim", 0.0, (images, mask))


def test_fusion_mixes_unit_directions_by_weight_at_the_mean_norm():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(fuse_embeddings(torch.stack([a, b]), [1.0, 0.0]), a)
    half = fuse_embeddings(torch.stack([a, b]), [1.0, 1.0])
    torch.testing.assert_close(half, torch.tensor([1.0, 1.0, 0.0]) / 2 ** 0.5 * 2.0)  # 45 degrees, norm (3 + 1) / 2
    more_a = fuse_embeddings(torch.stack([a, b]), [3.0, 1.0])
    assert more_a[0] > more_a[1] > 0
    with pytest.raises(EmuError, match="one positive weight per input"):
        fuse_embeddings(torch.stack([a, b]), [1.0])


@pytest.mark.slow
def test_variations_of_an_image_are_closer_to_it_in_clip_space_than_to_other_images():
    """A decoder trained briefly on toy images, conditioned on their CLIP image embeddings alone (every
    caption empty; pixels as its latents, 8x8; the toy CLIP vision tower): new noise around an
    image's embedding gives images whose CLIP embeddings are nearer that image's than most others'.
    (The toy tower is untrained, and many toy images share a background, so the other images can be
    near too: the measure is how many of them a variation is farther from, not the nearest alone.)"""
    from emu.variants.pixel import PixelSpace, resize
    from emu.datasets.toyworld import make_haystack
    pixels = np.stack([image for image, _, _ in make_haystack(96, seed=3, size=32)])
    images = resize(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, 8)  # (96, 3, 8, 8)
    torch.manual_seed(1)
    towers = ImageTextEncoder(FakeTowers(), CLIPVisionModel(CLIP_VISION_PRESETS["toy"]).eval())
    cond = towers.encode([""] * len(images), images=images)
    center = cond.image.mean(0)  # measured from the mean embedding: what sets each image apart
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(decoder_config("toy", 3, towers), model_channels=32))
    diffusion = GaussianDiffusion("scaled_linear", 1000, "eps")
    k = 16
    sources = cond[:k]
    twice = TextImageEmbedding.cat([sources, sources])  # two variations of each, with different noise

    def closeness():
        """Centred cosine of the variations to their own source, to the others, and the share of the
        other sources farther than its own."""
        unet.eval()
        made = decoder_generate(unet, PixelSpace(), diffusion, twice, towers.encode([""] * 2 * k),
                                list(range(100, 100 + 2 * k)), (8, 8), 3.0, 20, "ddim", 0.0)
        unet.train()
        seen = towers.embed_images(made.clamp(-1, 1))
        sim = F.normalize(seen - center, dim=-1) @ F.normalize(sources.image - center, dim=-1).T  # (2k, k)
        own = sim[torch.arange(2 * k), torch.arange(k).repeat(2)]
        others = (sim.sum(1) - own) / (k - 1)
        return own.mean(), others.mean(), ((sim < own[:, None]).sum(1).float() / (k - 1)).mean()

    untrained = closeness()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(300):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        loss = diffusion.training_loss(unet, images[idx], cond[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    own, others, farther = closeness()
    assert own > others + 0.3 and farther > 0.65, (own, others, farther)
    assert untrained[2] < 0.65, untrained  # it is the training that makes them so
