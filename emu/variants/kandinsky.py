"""Kandinsky's decoder beside Emu: a latent diffusion U-Net conditioned on a CLIP image embedding.

Kandinsky (kandinsky_paper.txt, section 4) generates in three steps:

    caption -> CLIP text tower -> image prior (emu/variants/prior.py) -> CLIP image embedding
            -> decoder U-Net (emu/models/unet.py, configured: image_embed_dim)  -> MoVQ latents
            -> MoVQ decoder (emu/models/vq.py, VQConfig.spatial_norm) -> image

Because the decoder reads an *image* embedding, an embedding taken from a real image works as well
as one predicted from a caption, which gives the paper's other modes (section 3): variations (embed
an image with CLIP's vision tower and decode it again with new noise), fusion (mix the embeddings
of two images, or of an image and a caption), and, with an inpainting U-Net that also reads a
masked image and its mask, inpainting and outpainting.

What is here, the rest being Emu's own code:
  * KANDINSKY_PRESETS: the decoder U-Net's sizes; a "-inpaint" preset adds the inpainting inputs;
  * MoVQLatents: the MoVQ tokenizer as the diffusion's first stage: continuous latents in, and
    quantised before decoding ("we did not skip the quantization step ... during diffusion inference");
  * ImageTextEncoder: the text towers plus CLIP's vision tower and the prior, one encode() that
    gives the decoder's conditioning (emu.text.encoder.TextImageEmbedding);
  * InpaintingDiffusion: the denoising loss with random masks (emu/variants/inpaint.py);
  * decoder_generate and fuse_embeddings: sampling and the fusion mode.
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu import EmuError
from emu.diffusion import guided_images
from emu.models.unet import UNetConfig
from emu.text.clip import clip_preprocess, load_clip_vision
from emu.text.encoder import MultilingualImageEmbedding, TextImageEmbedding
from emu.variants.inpaint import INPAINT_WHOLE, inpaint_condition, latent_mask, paste_known, random_masks
from emu.variants.prior import load_prior

KANDINSKY_PRESETS = {
    # the toy U-Net (emu.models.unet.PRESETS["toy"]) with the image embedding as 4 context tokens: 2.5M parameters
    "toy": UNetConfig(),
    # Kandinsky's decoder is 1.22B parameters (kandinsky_paper.txt, Table 2). The widths are the
    # released Kandinsky 2.1 U-Net's as we recall them (384 channels, multipliers 1, 2, 3, 4, attention
    # at the three lower levels, 64-wide heads, 10 image-embedding tokens), with two ResBlocks a level
    # where it has three: our transformer blocks carry a feed-forward layer its attention blocks lack.
    # 1.26B parameters with CLIP ViT-L and T5-XXL as the text towers, on MoVQ's 4-channel latents.
    "kandinsky": UNetConfig(in_channels=4, model_channels=384, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                            attention_levels=(1, 2, 3), head_dim=64, context_dim=768, clip_dim=768, t5_dim=4096,
                            pooled_dim=768, image_embed_dim=768, image_tokens=10),
}
INPAINT = "-inpaint"  # preset suffix: the U-Net also reads the masked image's latents and the mask


def decoder_config(preset, latent_channels, text_encoder):
    """The decoder U-Net's config for `preset` ("toy", "toy-inpaint", "kandinsky", ...), its widths set
    by the first stage's latent channels and the towers (text_encoder: an ImageTextEncoder). With a
    multilingual tower, the decoder reads its tokens and vector in place of CLIP's and T5's."""
    base, inpaint = preset.removesuffix(INPAINT), preset.endswith(INPAINT)
    towers = (dict(xlmr_dim=text_encoder.xlmr.dim, pooled_dim=text_encoder.xlmr.vector_dim) if text_encoder.xlmr else
              dict(clip_dim=text_encoder.clip_dim, t5_dim=text_encoder.t5_dim, pooled_dim=text_encoder.pooled_dim))
    return dataclasses.replace(KANDINSKY_PRESETS[base], in_channels=latent_channels, image_embed_dim=text_encoder.image_dim,
                               cond_channels=latent_channels + 1 if inpaint else 0, **towers)


class MoVQLatents(nn.Module):
    """A MoVQ tokenizer (emu.models.vq.VQTokenizer with spatial_norm) as a latent diffusion model's first
    stage. encode() gives the encoder's continuous output, before the codebook, scaled by the
    config's latent_scale (train_ae.py --arch kandinsky sets it to 1 / the std of held-out latents,
    as for the autoencoder); decode() snaps the latents to their nearest codes, then decodes:
    Kandinsky found quantising at inference adds diversity and quality (section 4, Table 3).
    """
    kind = "movq"

    def __init__(self, tokenizer, quantize=True):
        super().__init__()
        if getattr(tokenizer, "kind", None) != "vq" or not tokenizer.cfg.spatial_norm:
            raise EmuError("Kandinsky's decoder needs a MoVQ tokenizer as its first stage (python train_ae.py --arch kandinsky)")
        self.tokenizer, self.quantize = tokenizer, quantize
        self.scale = tokenizer.cfg.latent_scale

    @property
    def downsample_factor(self):
        return self.tokenizer.downsample_factor

    @property
    def latent_channels(self):
        return self.tokenizer.cfg.code_dim

    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, D, H/f, W/f)."""
        return self.tokenizer.encode_latents(images) * self.scale

    def decode(self, latents):
        """Latents (B, D, h, w) -> images (B, 3, h*f, w*f)."""
        z = latents / self.scale
        if self.quantize:  # the nearest codes
            z = self.tokenizer.quantizer.lookup(self.tokenizer.nearest_ids(z))
        return self.tokenizer.decode_codes(z)


class ImageTextEncoder(nn.Module):
    """The decoder's conditioning: the text towers' embeddings of the captions (emu.text.encoder.TextEncoder,
    or a text cache) plus one CLIP image embedding per caption, as a TextImageEmbedding. With `xlmr`
    (an emu.text.encoder.MultilingualTextEncoder), Kandinsky 2.1's multilingual tower, the captions
    reach the decoder through it instead, as a MultilingualImageEmbedding, and the CLIP and T5 towers
    only feed the image prior.

    The image embedding is, in order of precedence: the one given (fusion); CLIP's vision tower's
    embedding of the image given (training, variations); or, from a caption alone, the image prior's
    prediction (text to image), except for the empty caption, which gets zeros: `encode([""])` is the
    unconditional input, the one caption dropout trains and classifier-free guidance compares against.
    """
    reads_images = True  # emu.training.loop.conditioning passes the batch's images
    # The diffusion prior samples with `prior_steps` DDIM steps at guidance `prior_cfg` (4, the
    # released Kandinsky 2 pipelines' default), seeded by `seed` at every call.

    def __init__(self, text_encoder, vision, prior=None, prior_steps=25, prior_cfg=4.0, seed=0, xlmr=None):
        super().__init__()
        self.text_encoder, self.vision, self.prior, self.xlmr = text_encoder, vision, prior, xlmr
        self.prior_steps, self.prior_cfg, self.seed = prior_steps, prior_cfg, seed
        if prior is not None and (prior.cfg_dims() != (self.pooled_dim, self.image_dim)):
            raise EmuError(f"the image prior maps {prior.cfg_dims()[0]}-wide text embeddings to {prior.cfg_dims()[1]}-wide "
                           f"image embeddings; these CLIP towers have {self.pooled_dim} and {self.image_dim}")

    @property
    def clip_dim(self):
        return self.text_encoder.clip_dim

    @property
    def t5_dim(self):
        return self.text_encoder.t5_dim

    @property
    def pooled_dim(self):
        return self.text_encoder.pooled_dim

    @property
    def image_dim(self):
        return self.vision.config.projection_dim

    @torch.no_grad()
    def embed_images(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> CLIP image embeddings (B, E), float32."""
        device = self.vision.visual_projection.weight.device
        pixels = clip_preprocess(images.to(device), self.vision.config.image_size)
        return self.vision(pixels.to(self.vision.visual_projection.weight.dtype))[1].float()

    @torch.no_grad()
    def encode(self, captions, images=None, image_embeds=None):
        """Captions (and their images, or image embeddings) -> a TextImageEmbedding, or with `xlmr` a
        MultilingualImageEmbedding."""
        text = None  # CLIP's and T5's embeddings, computed only where something reads them
        if self.xlmr is None or (image_embeds is None and images is None):
            text = self.text_encoder.encode(captions)
        if self.xlmr is not None:
            states, mask, vector = self.xlmr.encode(captions)
        if image_embeds is None and images is not None:
            image_embeds = self.embed_images(images)
        elif image_embeds is None:  # text alone: the prior's prediction, and zeros for the empty caption
            device = text.pooled.device
            empty = torch.tensor([c == "" for c in captions], device=device)
            image_embeds = torch.zeros(len(captions), self.image_dim, device=device)
            if not empty.all():
                if self.prior is None:
                    raise EmuError("text to image with Kandinsky's decoder needs an image prior (train_prior.py; --prior PATH)")
                uncond = self.text_encoder.encode([""] * len(captions))
                gen = torch.Generator(device).manual_seed(self.seed)
                predicted = self.prior.generate(self.prior_input(text, vector if self.xlmr is not None else None), uncond,
                                                steps=self.prior_steps, cfg_scale=self.prior_cfg, generator=gen)
                image_embeds = torch.where(empty[:, None], image_embeds, predicted.float())
        if self.xlmr is None:
            return TextImageEmbedding(**vars(text), image=image_embeds.float().to(text.pooled.device))
        return MultilingualImageEmbedding(xlmr=states, xlmr_mask=mask, pooled=vector,
                                          image=image_embeds.float().to(vector.device))

    def prior_input(self, text, vector=None):
        """What the image prior reads of the captions: CLIP's text embedding; or, with the multilingual tower
        and a linear prior (which reads the pooled vector alone), M-CLIP's `vector` in its place. M-CLIP
        was trained to put a caption in any language where CLIP's text tower puts the English one, so a
        prompt in Russian reaches the prior too, where CLIP's tokenizer would read it as unknown pieces.
        A diffusion prior also reads CLIP's token states, which M-CLIP does not give: it keeps CLIP's."""
        if vector is None or getattr(self.prior, "kind", None) != "linear" or vector.shape[-1] != self.prior.cfg_dims()[0]:
            return text
        return dataclasses.replace(text, pooled=vector.to(text.pooled.device, text.pooled.dtype))


def load_kandinsky_parts(tokenizer, text_encoder, clip_dir, prior_path, device, dtype, xlmr=None):
    """(MoVQLatents, ImageTextEncoder) around a loaded MoVQ tokenizer and text encoder: CLIP's vision
    tower from `clip_dir` (the same CLIP directory the text tower comes from), the image prior
    at `prior_path` (train_prior.py's prior.pt), if given, and the multilingual tower `xlmr` (a loaded
    emu.text.encoder.MultilingualTextEncoder, or a text cache's view of one), if given."""
    vision = load_clip_vision(clip_dir, dtype=dtype, device=device)
    prior = load_prior(prior_path, device) if prior_path else None
    return MoVQLatents(tokenizer), ImageTextEncoder(text_encoder, vision, prior, xlmr=xlmr)


class InpaintingDiffusion:
    """The inpainting U-Net's objective (UNetConfig.cond_channels = latent channels + 1): the
    denoising loss of `diffusion`, with the latents outside a random mask and the mask itself as
    extra inputs. The masks (emu.variants.inpaint.random_masks: rectangles, brush strokes, borders, or the
    whole image) are drawn at latent resolution, where the model sees them. The loss covers the whole
    image, as Kandinsky's and Stable Diffusion's inpainting models are trained. `whole` is the share of
    masks that are the whole image: the only ones where the text alone says where things go."""

    def __init__(self, diffusion, whole=INPAINT_WHOLE):
        self.diffusion = diffusion
        self.whole = whole

    def training_noise(self, latents, noise_offset=0.0, generator=None):
        """The diffusion's draws and a random mask per image: {"t", "noise", "mask"}."""
        B, _, h, w = latents.shape
        return {**self.diffusion.training_noise(latents, noise_offset, generator),
                "mask": random_masks(B, h, w, generator, latents.device, self.whole)}

    def training_loss(self, model, latents, text, t, noise, mask):
        cond = inpaint_condition(latents, mask)
        return self.diffusion.training_loss(lambda x, t, text: model(x, t, text, cond=cond), latents, text, t=t, noise=noise)

    @torch.no_grad()
    def check_loss(self, model, latents, text, seed=1234):
        """GaussianDiffusion.check_loss with the same seeded masks at every call."""
        B, _, h, w = latents.shape
        cond = inpaint_condition(latents, random_masks(B, h, w, torch.Generator(latents.device).manual_seed(seed), latents.device,
                                                        self.whole))
        return self.diffusion.check_loss(lambda x, t, text: model(x, t, text, cond=cond), latents, text, seed)


@torch.no_grad()
def decoder_generate(model, ae, diffusion, text, uncond, seeds, size, cfg_scale, steps, sampler, eta, inpaint=None,
                     callback=None, cfg_rescale=0.0):
    """Images from the decoder U-Net for the conditioning in `text` (a TextImageEmbedding).

    :param size: the image's (height, width) in pixels.
    :param inpaint: for an inpainting U-Net, (images (B, 3, H, W) in [-1, 1], masks (B, 1, H, W), 1 in the
        hole): the model fills the holes, and the images are kept outside them (emu.variants.inpaint.paste_known).
        An inpainting U-Net without it draws the whole image (a mask of all ones).
    :param callback, cfg_rescale: guided_images'.
    :return: (B, 3, H, W).
    """
    kwargs = {}
    if model.cfg.cond_channels:
        images, masks = inpaint if inpaint is not None else (torch.zeros(len(seeds), 3, *size), torch.ones(len(seeds), 1, *size))
        images, masks = images.to(text.pooled.device), masks.to(text.pooled.device)
        kwargs["cond"] = inpaint_condition(ae.encode(images * (1 - masks)), latent_mask(masks, ae.downsample_factor))
    elif inpaint is not None:
        raise EmuError("inpainting and outpainting need an inpainting decoder (pretrain.py --arch kandinsky --preset toy-inpaint)")
    out = guided_images(model, ae, diffusion, text, uncond, seeds, size, cfg_scale, steps, sampler, eta, kwargs, callback,
                        cfg_rescale)
    return out if inpaint is None else paste_known(out.clamp(-1, 1), images, masks)


def fuse_embeddings(embeddings, weights):
    """Kandinsky's fusion: a weighted mix of CLIP embeddings (of images, or of images and captions
    through the prior) (K, E) -> (E,). Each is unit-normalised first, so the weights, not the norms,
    decide the mix; the result is given the weighted mean norm, the scale the decoder was trained on."""
    weights = torch.as_tensor(weights, dtype=torch.float32, device=embeddings.device)
    if len(weights) != len(embeddings) or weights.sum() <= 0:
        raise EmuError(f"fusion needs one positive weight per input: {len(embeddings)} inputs, weights {weights.tolist()}")
    weights = weights / weights.sum()
    norms = embeddings.norm(dim=-1, keepdim=True)
    mixed = (weights[:, None] * embeddings / norms).sum(0)
    return F.normalize(mixed, dim=-1) * (weights[:, None] * norms).sum()
