"""Putting the parts together: first stage + text towers + model + objective = text to image.

`load_frozen_parts` loads what a model is trained against (its first stage and the text towers);
`TextToImage` loads a training checkpoint of any architecture (emu/arch.py; the checkpoint records
it, and where its first stage and text towers live) and turns prompts and seeds into images with
classifier-free guidance.
"""
import os

import torch
from PIL import Image

from emu import EmuError
from emu.arch import LATENT_ARCHS, get_arch
from emu.checkpoint import load_checkpoint, load_state_dict_checked
from emu.datasets.folders import from_pil, make_grid, save_png, to_uint8
from emu.models.first_stage import load_autoencoder
from emu.text.cache import load_text_cache
from emu.text.encoder import TEXT_DTYPES, MultilingualTextEncoder, TextEncoder
from emu.text.hf import read_config
from emu.variants.kandinsky import load_kandinsky_parts
from emu.variants.pixel import PixelSpace, size_multiple, upsample
from emu.variants.stable_diffusion import load_stable_diffusion


def load_frozen_parts(ae_dir, clip_dir, t5_dir, device, text_dtype="bfloat16", text_cache=None, arch="ldm", prior=None,
                      xlmr=None):
    """The frozen first stage and text encoder a model of architecture `arch` is trained against.

    The first stage is the autoencoder (or the VQ tokenizer) in `ae_dir`; None means the model works
    on pixels (PixelSpace). The towers run in `text_dtype` ("bfloat16" or "float32"; embeddings come
    out float32 either way). With `text_cache` (a directory written by data/embed_captions.py) the
    towers are not loaded: the cache, checked to come from the towers in clip_dir and t5_dir in that
    dtype, supplies every embedding.

    Kandinsky's decoder (arch "kandinsky") uses its MoVQ for continuous latents, and its conditioning
    adds a CLIP image embedding: from CLIP's vision tower in clip_dir for the batch's images, or from
    the image prior at `prior` (train_prior.py's prior.pt) for a caption alone (emu/variants/kandinsky.py).
    With `xlmr`, the directory of Kandinsky 2.1's multilingual tower, the decoder reads the captions
    through it, and CLIP's and T5's text towers only feed the prior.
    """
    ae = load_autoencoder(ae_dir, device=device) if ae_dir else PixelSpace().to(device)
    dtype = TEXT_DTYPES[text_dtype]
    if text_cache:
        text_encoder = load_text_cache(text_cache, clip_dir, t5_dir, dtype, xlmr)
    else:
        text_encoder = TextEncoder.load(clip_dir, t5_dir, dtype=dtype, device=device)
    if arch == "kandinsky":
        multilingual = None
        if xlmr:  # the cache's XLM-R embeddings, or the tower itself
            multilingual = text_encoder.multilingual() if text_cache else MultilingualTextEncoder.load(xlmr, dtype, device)
        return load_kandinsky_parts(ae, text_encoder, clip_dir, prior, device, dtype, multilingual)
    return ae, text_encoder


def load_base(folder, device="cpu", unet=True):
    """A published Stable Diffusion folder as (U-Net or None, VAE, text encoder, diffusion, native image
    size: the U-Net's sample_size latents in pixels). The VAE and the text encoder come frozen."""
    unet_, vae, text_encoder, diffusion = load_stable_diffusion(folder, device=device, unet=unet)
    image_size = read_config(os.path.join(folder, "unet"))[0].get("sample_size", 64) * vae.downsample_factor
    return unet_, vae.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), diffusion, image_size


def read_training_checkpoint(path):
    """What a training checkpoint holds: a .pt file, or the whole weights (and the plain part) of a
    sharded checkpoint directory that pretrain.py --fsdp writes (ckpt-<step>/)."""
    if os.path.isdir(path):
        from emu.training.fsdp import load_full_weights  # torch.distributed.checkpoint: loaded only when needed
        return load_full_weights(path)
    return load_checkpoint(path)


def model_from_checkpoint(ckpt, path, weights="ema"):
    """(architecture, model) recorded in a training checkpoint, with its `weights` ('ema' or 'model')
    loaded, in eval mode and frozen. Checkpoints from before --arch are latent diffusion models
    whose configuration is under "unet_config"."""
    config = ckpt.get("model_config", ckpt.get("unet_config"))
    for key, value in (("model_config", config), (weights, ckpt.get(weights)), ("args", ckpt.get("args"))):
        if value is None:
            raise EmuError(f"{path}: not a training checkpoint of pretrain.py or qtune.py (no '{key}' entry)")
    arch = get_arch(ckpt.get("arch", "ldm"))
    try:
        model = arch.from_config(config)
    except TypeError as e:
        raise EmuError(f"{path}: its {arch.name} model configuration does not fit this code ({e})") from None
    load_state_dict_checked(model, ckpt[weights], path)
    return arch, model.eval().requires_grad_(False)


class TextToImage:
    """A trained model of any architecture, ready to sample.

    `cfg_rescale` is the guidance rescale its samples get unless generate() is told otherwise: by default
    its architecture's (emu.diffusion.GUIDANCE_RESCALE for our latent models); a published Stable
    Diffusion U-Net, quality-tuned or not, gets none, as diffusers' pipelines sample it by default."""

    def __init__(self, arch, model, ae, text_encoder, objective, image_size, name="", cfg_rescale=None):
        self.arch, self.model, self.ae, self.text_encoder, self.objective = arch, model, ae, text_encoder, objective
        self.image_size, self.name = image_size, name
        self.cfg_rescale = arch.cfg_rescale if cfg_rescale is None else cfg_rescale

    @classmethod
    def from_checkpoint(cls, path, device="cpu", weights="ema", arch=None, prior=None):
        """The model in a training checkpoint; `arch`, if given, is checked against the one it records.
        `prior` (Kandinsky's decoder) is the image prior to use instead of the one it was trained beside."""
        ckpt = read_training_checkpoint(path)
        arch_, model = model_from_checkpoint(ckpt, path, weights)
        if arch not in (None, arch_.name):
            raise EmuError(f"--arch {arch}: {path} holds a model of --arch {arch_.name}")
        arch = arch_
        args = ckpt["args"]
        model = model.to(device)
        if args.get("base"):  # a quality-tuned Stable Diffusion U-Net: the rest is the published folder's
            _, vae, text_encoder, diffusion, _ = load_base(args["base"], device, unet=False)
            return cls(arch, model, vae, text_encoder, diffusion, args["image_size"], name=str(path), cfg_rescale=0.0)
        # Checkpoints from before --text-dtype ran their towers in float32.
        ae, text_encoder = load_frozen_parts(args["ae"], args["clip"], args["t5"], device, args.get("text_dtype", "float32"),
                                             arch=arch.name, prior=prior or args.get("prior"), xlmr=args.get("xlmr"))
        return cls(arch, model, ae, text_encoder, arch.objective(model, args), args["image_size"], name=str(path))

    @classmethod
    def load(cls, path, device="cpu", weights="ema", arch=None):
        """A training checkpoint of ours (from_checkpoint), or a published Stable Diffusion folder
        (from_stable_diffusion): what eval_pairs.py compares, e.g. a quality-tuned base against the base."""
        if os.path.isfile(os.path.join(path, "model_index.json")):
            if arch not in (None, "ldm"):
                raise EmuError(f"--arch {arch}: {path} is a Stable Diffusion folder, a latent diffusion model (--arch ldm)")
            return cls.from_stable_diffusion(path, device)
        return cls.from_checkpoint(path, device, weights, arch)

    @classmethod
    def from_stable_diffusion(cls, folder, device="cpu"):
        """A published Stable Diffusion folder (diffusers layout: unet/, vae/, text_encoder/, tokenizer/,
        scheduler/) in our own modules (emu/variants/stable_diffusion.py), at the resolution it was trained
        at: the U-Net's sample_size latents."""
        unet, vae, text_encoder, diffusion, image_size = load_base(folder, device)
        return cls(get_arch("ldm"), unet.eval().requires_grad_(False), vae, text_encoder, diffusion, image_size, name=str(folder),
                   cfg_rescale=0.0)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts, seeds, cfg_scale=5.0, steps=25, sampler="ddim", eta=0.0, batch_size=64,
                 image_embeds=None, inpaint=None, size=None, callback=None, cfg_rescale=None):
        """Images for `prompts` (one per prompt, seeded by `seeds`) as (B, 3, H, W) in [-1, 1], at the
        training resolution or at `size`, (width, height) (the latent models; the others draw squares).
        `sampler` and `eta` are the diffusion sampler's; MaskGIT decoding takes `steps` alone.

        Kandinsky's decoder also takes, one row per prompt, `image_embeds` (B, E): the CLIP image
        embeddings to decode (variations, fusion) instead of the prior's; and `inpaint`, (images
        (B, 3, H, W), masks (B, 1, H, W)) for an inpainting decoder: the holes are filled, the rest kept.

        `callback(step, steps, x0, first_stage)` is called after every sampling step of the latent models
        (emu.diffusion.guided_images); an exception it raises stops the generation. `cfg_rescale` is guidance
        rescale's phi (emu.diffusion.classifier_free_guidance), None for the model's own (self.cfg_rescale)."""
        if (image_embeds is not None or inpaint is not None) and self.arch.name != "kandinsky":
            raise EmuError(f"image embeddings and inpainting are for Kandinsky's decoder, not --arch {self.arch.name}")
        rescale = self.cfg_rescale if cfg_rescale is None else cfg_rescale
        if not 0.0 <= rescale <= 1.0:
            raise EmuError(f"guidance rescale {rescale}: must be in [0, 1] (0 is plain guidance)")
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds, rows = prompts[i:i + batch_size], seeds[i:i + batch_size], slice(i, i + batch_size)
            given = {} if image_embeds is None else {"image_embeds": image_embeds[rows]}
            text = self.text_encoder.encode(list(chunk), **given).to(self.device)
            uncond = self.text_encoder.encode([""] * len(chunk)).to(self.device)
            extra = {"cfg_rescale": rescale}
            if inpaint is not None:
                extra["inpaint"] = (inpaint[0][rows], inpaint[1][rows])
            if callback is not None:
                if self.arch.name not in LATENT_ARCHS:
                    raise EmuError(f"step-by-step progress is for the latent models (--arch ldm, kandinsky), not --arch {self.arch.name}")
                extra["callback"] = callback
            images = self.arch.generate(self.model, self.ae, self.objective, text, uncond, chunk_seeds,
                                        self.image_size if size is None else (size[1], size[0]), cfg_scale, steps, sampler,
                                        eta, **extra)
            out.append(images.clamp(-1, 1).cpu())
        return torch.cat(out)


def sample_grid(path, arch, model, ae, text_encoder, objective, image_size, prompts, steps=25, cfg_scale=5.0, write=True):
    """Sample one image per prompt (seeds 0, 1, ...: the same starting noise every time, so the grids
    of successive checkpoints show what training changed), write them as one PNG grid at `path` if
    `write`, and return them as (N, H, W, 3) uint8. `model` is in eval mode (training keeps its EMA so)."""
    images = to_uint8(TextToImage(arch, model, ae, text_encoder, objective, image_size).generate(
        prompts, list(range(len(prompts))), cfg_scale, steps))
    if write:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_png(path, make_grid(images, ncol=min(8, len(images))), {"prompts": " | ".join(prompts)})
    return images


class DiffusionUpsampler:
    """The pixel cascade's diffusion upsampler as a tool for curated images smaller than the target
    size (emu_paper.txt, section 3.3: "We trained a pixel diffusion upsampler inspired by the
    architecture proposed in [30] to upsample these images when necessary"). Called as
    export_curated's upsampler: (PIL image, (width, height), caption) -> PIL image of that size.

    The U-Net is convolutional: it upsamples to any size whose sides it can halve at each level, so
    the image is made at the nearest such size and resized the last few pixels (bicubic) if needed.
    """

    def __init__(self, path, device="cpu", steps=25, cfg_scale=1.0, aug_level=0.1, seed=0):
        model = TextToImage.from_checkpoint(path, device=device, arch="pixel")
        self.upsampler, self.diffusion = model.model.upsampler, model.objective.diffusion
        self.text_encoder, self.steps, self.cfg_scale, self.aug_level, self.seed = (
            model.text_encoder, steps, cfg_scale, aug_level, seed)
        self.uncond = self.text_encoder.encode([""]).to(model.device)  # the same for every image
        self.description = f"pixel diffusion upsampler {path}"

    @torch.no_grad()
    def __call__(self, image, size, caption):
        device = next(self.upsampler.parameters()).device
        factor = size_multiple(self.upsampler)
        made = tuple(max(factor, round(side / factor) * factor) for side in size)  # (width, height)
        low = from_pil(image)[None].to(device)  # (1, 3, h, w) in [-1, 1]
        text = self.text_encoder.encode([caption]).to(device)
        gen = torch.Generator(device).manual_seed(self.seed)
        out = upsample(self.upsampler, self.diffusion, low, made[::-1], text, self.uncond, self.steps, self.cfg_scale,
                       self.aug_level, gen)
        result = Image.fromarray(to_uint8(out.cpu())[0])
        return result if result.size == tuple(size) else result.resize(size, Image.BICUBIC)
