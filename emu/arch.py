"""The three architectures quality-tuning is shown on, behind one small interface.

Emu is a latent diffusion model; section 4.2 of the paper (Figure 10) re-trains a pixel diffusion
model like Imagen and a masked generative transformer like Muse and quality-tunes both on the same
curated set, to show the recipe is not specific to latent diffusion. `--arch` picks one of them in
pretrain.py (qtune.py, sample.py and eval_pairs.py read it from the checkpoint):

    ldm    autoencoder latents  -> emu.models.unet.UNet            -> GaussianDiffusion    (emu/diffusion.py)
    pixel  the pixels           -> base U-Net + upsampler   -> CascadeDiffusion     (emu/variants/pixel.py)
    muse   VQ token ids         -> MaskedTransformer        -> MaskedTokens, MaskGIT (emu/variants/muse.py)

Beside them, Kandinsky's decoder (kandinsky_paper.txt; emu/variants/kandinsky.py), the other system this
code reproduces:

    kandinsky  MoVQ latents     -> UNet + a CLIP image embedding -> GaussianDiffusion (or, with a
                                   "-inpaint" preset, InpaintingDiffusion)

Everything else is shared: the text towers, the data and its batches, the training step, EMA,
checkpoints and resuming, distributed training, curation, quality-tuning and evaluation. What
differs is four things, each a method here:

  * build / from_config: the trained model from a preset, or from the config a checkpoint recorded;
  * objective: what train_step optimises (training_noise and training_loss, see emu/training/loop.py),
    and check_loss, the fixed-draw loss qtune's early stopping watches;
  * generate: text embeddings and seeds -> images (and `cfg_rescale`, the guidance rescale its
    samples get unless told otherwise: emu.diffusion.GUIDANCE_RESCALE for the latent models, none for
    the cascade, which has Imagen's dynamic thresholding instead, or for MaskGIT's logits);
  * the frozen first stage (the --ae directory): an autoencoder, none (PixelSpace), or a VQ tokenizer
    (for Kandinsky, MoVQ used for its continuous latents: emu.pipeline.load_frozen_parts).
"""
import dataclasses

from emu import EmuError
from emu.checkpoint import config_from_dict, config_to_dict
from emu.datasets.buckets import make_buckets
from emu.diffusion import GUIDANCE_RESCALE, GaussianDiffusion, guided_images
from emu.models.unet import PRESETS, UNet, UNetConfig
from emu.variants.inpaint import INPAINT_WHOLE_BEFORE
from emu.variants.kandinsky import INPAINT, KANDINSKY_PRESETS, InpaintingDiffusion, decoder_config, decoder_generate
from emu.variants.muse import (TRANSFORMER_PRESETS, MaskedTokens, MaskedTransformer, MaskedTransformerConfig,
                               muse_generate)
from emu.variants.pixel import (BASE_PRESETS, CascadeDiffusion, build_cascade, cascade_config_dict, cascade_from_config,
                                cascade_generate, size_multiple)


class LatentDiffusion:
    """Emu itself: a U-Net denoising autoencoder latents, conditioned on CLIP and T5."""
    name, presets, default_ae = "ldm", tuple(sorted(PRESETS)), "runs/ae"
    cfg_rescale = GUIDANCE_RESCALE

    def build(self, preset, ae, text_encoder):
        """A U-Net from a preset, its in/out width set by the autoencoder's latent channels and its
        conditioning widths by the text towers."""
        cfg = dataclasses.replace(PRESETS[preset], in_channels=ae.cfg.latent_channels, clip_dim=text_encoder.clip_dim,
                                  t5_dim=text_encoder.t5_dim, pooled_dim=text_encoder.pooled_dim)
        return UNet(cfg)

    def config(self, model):
        return config_to_dict(model.cfg)

    def from_config(self, d):
        return UNet(config_from_dict(UNetConfig, d))

    def objective(self, model, args):
        return diffusion_from_args(args)

    def diffusion_defaults(self, preset):
        """The noise schedule, prediction and min-SNR weighting: Stable Diffusion's (scaled_linear,
        predicting the noise, unweighted) for Emu, whose paper does not give them. The toy preset
        predicts v with min-SNR-5 weighting instead: with eps on its 8x8 latents the clean-sample
        estimate at the noisy steps, where a caption decides the picture, is 5 to 11 times the network's
        error, and the samples came out as the same texture whatever the prompt (README, "What made the
        toy model follow its prompts")."""
        return ("scaled_linear", "v", 5.0) if preset == "toy" else ("scaled_linear", "eps", 0.0)

    def generate(self, model, ae, objective, text, uncond, seeds, image_size, cfg_scale, steps, sampler, eta, callback=None,
                 cfg_rescale=0.0):
        """Images of `image_size`: one side (a square), or (height, width). `callback` and `cfg_rescale` are
        guided_images'."""
        return guided_images(model, ae, objective, text, uncond, seeds, hw(image_size), cfg_scale, steps, sampler, eta,
                             callback=callback, cfg_rescale=cfg_rescale)


class PixelDiffusion(LatentDiffusion):
    """Imagen-like: a base U-Net on pixels at 1/factor of the image size, conditioned on T5 alone,
    and a diffusion upsampler to the full size, trained together (emu.variants.pixel.PixelCascade)."""
    name, presets, default_ae = "pixel", tuple(sorted(BASE_PRESETS)), None
    cfg_rescale = 0.0  # Imagen's own answer to over-saturated guidance is dynamic thresholding

    def build(self, preset, ae, text_encoder):
        return build_cascade(preset, text_encoder.t5_dim)

    def config(self, model):
        return cascade_config_dict(model)

    def from_config(self, d):
        return cascade_from_config(d)

    def objective(self, model, args):
        return CascadeDiffusion(diffusion_from_args(args), model.factor)

    def diffusion_defaults(self, preset):
        """The preset's own schedule and prediction (the toy cascade learns to upsample only predicting v)."""
        return BASE_PRESETS[preset].schedule, BASE_PRESETS[preset].prediction, 0.0

    def generate(self, model, ae, objective, text, uncond, seeds, image_size, cfg_scale, steps, sampler, eta, cfg_rescale=0.0):
        square_only(image_size, "the cascade makes its base image and the upsampler's input at one side (cascade_generate)")
        no_rescale(cfg_rescale, "the cascade thresholds its guided samples dynamically instead (Imagen)")
        return cascade_generate(model, objective.diffusion, text, uncond, seeds, hw(image_size)[0], steps, cfg_scale,
                                sampler, eta)


class MaskedGenerative:
    """Muse-like: a bidirectional transformer over VQ token ids, trained to fill in masked tokens and
    sampled by MaskGIT's parallel decoding (emu/variants/muse.py). No diffusion: no schedule, no sampler."""
    name, presets, default_ae = "muse", tuple(sorted(TRANSFORMER_PRESETS)), "runs/vq"
    cfg_rescale = 0.0  # MaskGIT guides logits, not a prediction with a spread to keep

    def build(self, preset, tokenizer, text_encoder):
        if getattr(tokenizer, "kind", None) != "vq":
            raise EmuError("--arch muse needs a VQ tokenizer as --ae (python train_ae.py --arch muse), not an autoencoder")
        cfg = dataclasses.replace(TRANSFORMER_PRESETS[preset], codebook_size=tokenizer.cfg.codebook_size,
                                  clip_dim=text_encoder.clip_dim, t5_dim=text_encoder.t5_dim)
        return MaskedTransformer(cfg)

    def config(self, model):
        return config_to_dict(model.cfg)

    def from_config(self, d):
        return MaskedTransformer(config_from_dict(MaskedTransformerConfig, d))

    def objective(self, model, args):
        return MaskedTokens(model.cfg.codebook_size)

    def diffusion_defaults(self, preset):
        return None, None, None  # no diffusion

    def generate(self, model, tokenizer, objective, text, uncond, seeds, image_size, cfg_scale, steps, sampler, eta,
                 cfg_rescale=0.0):
        square_only(image_size, "MaskGIT decodes a square grid of tokens (muse_generate)")
        no_rescale(cfg_rescale, "MaskGIT guides the tokens' logits (muse_generate)")
        return muse_generate(model, tokenizer, text, uncond, seeds, hw(image_size)[0], steps, cfg_scale)


class KandinskyDecoder(LatentDiffusion):
    """Kandinsky's decoder: a U-Net on MoVQ latents conditioned on a CLIP image embedding and the text
    (emu/variants/kandinsky.py). Its conditioning is an emu.text.encoder.TextImageEmbedding: the first stage and the
    text encoder it is given are emu.variants.kandinsky.MoVQLatents and ImageTextEncoder. A "-inpaint" preset
    is the inpainting U-Net, trained on random masks."""
    name, default_ae = "kandinsky", "runs/movq"
    presets = tuple(sorted([*KANDINSKY_PRESETS, *(p + INPAINT for p in KANDINSKY_PRESETS)]))

    def build(self, preset, ae, text_encoder):
        if getattr(ae, "kind", None) != "movq":
            raise EmuError("--arch kandinsky needs MoVQ as --ae (python train_ae.py --arch kandinsky), not an autoencoder")
        return UNet(decoder_config(preset, ae.latent_channels, text_encoder))

    def objective(self, model, args):
        diffusion = diffusion_from_args(args)
        if not model.cfg.cond_channels:
            return diffusion
        return InpaintingDiffusion(diffusion, flag_values(args).get("whole_masks", INPAINT_WHOLE_BEFORE))

    def diffusion_defaults(self, preset):
        """Kandinsky 2.2's decoder predicts the noise on a schedule linear in beta from 0.00085 to
        0.012 (its released scheduler config, as we recall it); Stable Diffusion's scaled_linear has
        the same end points and is the nearest of ours. (DDPM's linear schedule, 1e-4 to 0.02, ends
        so near pure noise that 25 DDIM steps of a noise-predicting toy decoder blow up.) The toy decoders,
        inpainting or not, predict v with min-SNR-5 weighting, as Emu's toy U-Net does and for the same
        reason: on 8x8 latents a noise-predicting model does not learn to read its conditioning."""
        return super().diffusion_defaults(preset.removesuffix(INPAINT))

    def generate(self, model, ae, objective, text, uncond, seeds, image_size, cfg_scale, steps, sampler, eta, inpaint=None,
                 callback=None, cfg_rescale=0.0):
        size = tuple(inpaint[0].shape[-2:]) if inpaint is not None else hw(image_size)
        diffusion = getattr(objective, "diffusion", objective)
        return decoder_generate(model, ae, diffusion, text, uncond, seeds, size, cfg_scale, steps, sampler, eta, inpaint,
                                callback, cfg_rescale)


LATENT_ARCHS = ("ldm", "kandinsky")  # convolutional U-Nets on latents: they draw, and train on, any size they can halve


def image_multiple(model, first_stage):
    """What an image side must be a multiple of for a latent model: the first stage's downsampling
    times the U-Net's, whose every level halves the latents."""
    return size_multiple(model) * first_stage.downsample_factor


def training_buckets(arch, model, first_stage, image_size):
    """The aspect buckets of --buckets at `image_size`: sizes whose sides the model's U-Net can halve at
    every level, in latents (emu.datasets.buckets.make_buckets). The latent models only."""
    if arch.name not in LATENT_ARCHS:
        raise EmuError(f"--buckets is for the latent models (--arch ldm, kandinsky); --arch {arch.name} trains on squares")
    return make_buckets(image_size, image_multiple(model, first_stage))


def hw(image_size):
    """(height, width) of an image size given as one side (a square) or as (height, width)."""
    return tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)


def square_only(image_size, why):
    """A one-line EmuError for a size that is not square, for the architectures that draw squares only."""
    height, width = hw(image_size)
    if height != width:
        raise EmuError(f"{width}x{height}: this architecture draws square images only: {why}")


def no_rescale(cfg_rescale, why):
    """A one-line EmuError for a guidance rescale asked of an architecture that has none."""
    if cfg_rescale:
        raise EmuError(f"guidance rescale {cfg_rescale}: this architecture has none: {why}")


ARCHS = {arch.name: arch for arch in (LatentDiffusion(), PixelDiffusion(), MaskedGenerative(), KandinskyDecoder())}


def get_arch(name):
    """The architecture called `name` ("ldm", "pixel", "muse")."""
    if name not in ARCHS:
        raise EmuError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[name]


def resolve_arch_flags(args):
    """Fill in the flags whose defaults depend on --arch and check the others apply to it: --preset,
    --ae (the first stage: an autoencoder, none, or a VQ tokenizer), --schedule, --prediction, --prior and --xlmr."""
    arch = get_arch(args.arch)
    if args.preset not in arch.presets:
        raise EmuError(f"--preset {args.preset}: --arch {arch.name} has presets {', '.join(arch.presets)}")
    if args.ae is None:
        args.ae = arch.default_ae
    elif arch.default_ae is None:
        raise EmuError(f"--ae {args.ae}: --arch {arch.name} works on pixels and has no autoencoder")
    if arch.name == "muse" and getattr(args, "grad_checkpoint", False):
        raise EmuError("--grad-checkpoint is for the U-Nets (--arch ldm or pixel), not --arch muse")
    if arch.name == "kandinsky":
        args.prior = getattr(args, "prior", None) or "runs/prior/prior.pt"
    elif getattr(args, "prior", None) or getattr(args, "xlmr", None):
        flag = "--prior" if getattr(args, "prior", None) else "--xlmr"
        raise EmuError(f"{flag} is for Kandinsky's decoder (--arch kandinsky), not --arch {arch.name}")
    schedule, prediction, gamma = arch.diffusion_defaults(args.preset)
    if schedule is None and (args.schedule or args.prediction or args.min_snr_gamma is not None):
        raise EmuError(f"--schedule, --prediction and --min-snr-gamma are for diffusion models, not --arch {arch.name}")
    args.schedule, args.prediction = args.schedule or schedule, args.prediction or prediction
    args.min_snr_gamma = gamma if args.min_snr_gamma is None else args.min_snr_gamma
    return arch


def flag_values(args):
    """A script's flags (an argparse Namespace) or a checkpoint's saved args dict, as a dict."""
    return args if isinstance(args, dict) else vars(args)


def diffusion_from_args(args):
    """The GaussianDiffusion described by a script's flags (or a checkpoint's saved args dict)."""
    values = flag_values(args)
    return GaussianDiffusion(values["schedule"], values["timesteps"], values["prediction"],
                             values.get("min_snr_gamma") or 0.0)  # runs from before the weighting: unweighted
