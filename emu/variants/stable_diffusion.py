"""Stable Diffusion's published U-Net and VAE, in the diffusers layout, read into our own U-Net and autoencoder.

Emu's U-Net is Stable Diffusion's design grown wider (emu_paper.txt, section 3.1), so a published
Stable Diffusion U-Net is emu/models/unet.py's network with a few settings changed, not a second
network (UNetConfig's fields after xlmr_dim):

    ours (Emu, toy)                              Stable Diffusion (unet/config.json)
    timestep embedding as FiLM after the norm    added to the features after the first conv (emb_add)
    GroupNorm epsilon 1e-6                       1e-5 (norm_eps)
    groups set by the width                      32 groups everywhere (norm_groups)
    heads = width // head_dim                    8 heads at every level in v1 (num_heads; v2 keeps
                                                 64-wide heads, which is head_dim)
    CLIP and T5 tokens, projected to one width   CLIP's tokens alone, as they are (t5_dim 0, context_dim 0)
    a pooled CLIP vector added to the timestep   none (pooled_dim 0)
    linear proj_in / proj_out                    1x1 convolutions in v1: the same numbers, reshaped

Its VAE is emu/models/autoencoder.py's network without the Fourier features and the toy shortcuts,
with 1x1 convolutions around the latents (quant_convs), biases on the mid block's attention
projections (attn_qkv_bias), downsampling that pads after the image only (pad_after) and 32 groups per
GroupNorm (norm_groups); its `scaling_factor` (0.18215 for v1) is our scale_factor.

The folders are diffusers' `unet/` and `vae/`: config.json and diffusion_pytorch_model.safetensors
(single or sharded; the half-precision copy diffusion_pytorch_model.fp16.safetensors if that is all
there is). unet_key_map and vae_key_map name every one of our parameters by its published key;
emu.text.hf.load_hf_weights then checks every key and shape before reading any tensor, and refuses pickles.
"""
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from emu import EmuError
from emu.diffusion import GaussianDiffusion
from emu.models.autoencoder import Autoencoder, AutoencoderConfig
from emu.models.unet import UNet, UNetConfig
from emu.text.clip import clip_clean, load_clip_text
from emu.text.encoder import TextEmbedding
from emu.checkpoint import save_weights
from emu.text.hf import empty_model, find_weight_files, load_hf_weights, read_config, tokenize

WEIGHT_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")

# config.json entries that change the network: the values our U-Net implements (diffusers' defaults,
# which every Stable Diffusion v1 and v2 U-Net uses)
FIXED = {"act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
         "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
         "conv_out_kernel": 3, "downsample_padding": 1, "mid_block_scale_factor": 1, "dual_cross_attention": False,
         "only_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
         "encoder_hid_dim": None, "time_cond_proj_dim": None, "transformer_layers_per_block": 1,
         "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
         "attention_type": "default", "cross_attention_norm": None, "timestep_post_act": None}


# ----------------------------------------------------------------------------------------------------
# Config


def check_fixed(raw, fixed, file):
    """Every entry of `fixed` that a config (the dict read from `file`) sets has the value we implement."""
    for key, value in fixed.items():
        if raw.get(key, value) != value:
            raise EmuError(f"{file}: {key} {raw[key]!r} is not supported (only {value!r}, Stable Diffusion's)")


def unet_config_from_diffusers(raw, file):
    """Our UNetConfig for a diffusers UNet2DConditionModel config.json (a dict read from `file`)."""
    def need(key):
        if key not in raw:
            raise EmuError(f"{file}: missing entry {key!r}")
        return raw[key]
    check_fixed(raw, FIXED, file)
    widths, down, up = need("block_out_channels"), need("down_block_types"), need("up_block_types")
    if len(down) != len(widths) or len(up) != len(widths) or widths[-1] % widths[0] or any(w % widths[0] for w in widths):
        raise EmuError(f"{file}: block_out_channels {widths} must be multiples of the first, one per down and up block")
    attention_levels = tuple(i for i, kind in enumerate(down) if kind == "CrossAttnDownBlock2D")
    if any(kind not in ("CrossAttnDownBlock2D", "DownBlock2D") for kind in down) or list(up) != [
            "CrossAttnUpBlock2D" if level in attention_levels else "UpBlock2D" for level in reversed(range(len(widths)))]:
        raise EmuError(f"{file}: down_block_types {down} and up_block_types {up} are not Stable Diffusion's mirrored "
                       "CrossAttn*Block2D / *Block2D")
    if need("in_channels") != need("out_channels"):
        raise EmuError(f"{file}: in_channels {raw['in_channels']} and out_channels {raw['out_channels']} differ")
    # diffusers reads "attention_head_dim" as the number of heads when "num_attention_heads" is absent
    heads = raw.get("num_attention_heads") or need("attention_head_dim")
    num_heads, head_dim = (heads, UNetConfig.head_dim) if isinstance(heads, int) else (0, None)
    if not isinstance(heads, int):  # one count per level: the same head width everywhere (v2: 64)
        head_dims = {w // h for w, h in zip(widths, heads)}
        if len(heads) != len(widths) or len(head_dims) != 1 or any(w % h for w, h in zip(widths, heads)):
            raise EmuError(f"{file}: attention_head_dim {heads} does not give one head width for block_out_channels {widths}")
        head_dim = head_dims.pop()
    return UNetConfig(in_channels=raw["in_channels"], model_channels=widths[0],
                      channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=need("layers_per_block"),
                      attention_levels=attention_levels, transformer_depth=1, head_dim=head_dim,
                      context_dim=0, clip_dim=need("cross_attention_dim"), t5_dim=0, pooled_dim=0,
                      emb_add=True, norm_eps=raw.get("norm_eps", 1e-5), norm_groups=raw.get("norm_num_groups", 32),
                      num_heads=num_heads)


# ----------------------------------------------------------------------------------------------------
# Keys

# our name inside each kind of module -> the published one
RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
            "skip": "conv_shortcut"}
TRANSFORMER = {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out", "blocks": "transformer_blocks"}
BLOCK = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "self_attn": "attn1", "cross_attn": "attn2",
         "q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0", "ff.proj": "ff.net.0.proj", "ff.out": "ff.net.2"}


def module_names(cfg):
    """{our module: the published module} for every ResBlock, transformer and resampling convolution,
    in the order UNet.__init__ builds them."""
    names, i = {}, 0
    for level in range(len(cfg.channel_mult)):
        for r in range(cfg.num_res_blocks):
            names[f"down.{i}.res"] = f"down_blocks.{level}.resnets.{r}"
            names[f"down.{i}.attn"] = f"down_blocks.{level}.attentions.{r}"
            i += 1
        if level != len(cfg.channel_mult) - 1:
            names[f"down.{i}.conv"] = f"down_blocks.{level}.downsamplers.0.conv"
            i += 1
    names.update({"mid.0.res": "mid_block.resnets.0", "mid.0.attn": "mid_block.attentions.0",
                  "mid.1.res": "mid_block.resnets.1"})
    i = 0
    for block, level in enumerate(reversed(range(len(cfg.channel_mult)))):
        for r in range(cfg.num_res_blocks + 1):
            names[f"up.{i}.res"] = f"up_blocks.{block}.resnets.{r}"
            names[f"up.{i}.attn"] = f"up_blocks.{block}.attentions.{r}"
            i += 1
        if level != 0:
            names[f"up.{i}.conv"] = f"up_blocks.{block}.upsamplers.0.conv"
            i += 1
    names.update({"time_mlp.0": "time_embedding.linear_1", "time_mlp.2": "time_embedding.linear_2",
                  "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"})
    return names


def key_map(model, modules, rename):
    """{published key: our parameter name} for every parameter of `model`: each name's longest prefix that
    is a module in `modules` becomes that module's published name, and `rename(prefix, rest)` renames the
    parts after it (e.g. "up.4.attn" and ["blocks", "0", "cross_attn", "q", "weight"])."""
    out = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        cut = next(cut for cut in range(len(parts) - 1, 0, -1) if ".".join(parts[:cut]) in modules)
        prefix = ".".join(parts[:cut])
        out[".".join([modules[prefix], *rename(prefix, parts[cut:])])] = name
    return out


def unet_rename(prefix, rest):
    """The parts of a U-Net parameter's name inside a ResBlock or a transformer, published."""
    if prefix.endswith(".res"):
        return [RESBLOCK[rest[0]], *rest[1:]]
    if prefix.endswith(".attn"):
        rest = [TRANSFORMER[rest[0]], *rest[1:]]
        if rest[0] == "transformer_blocks":  # transformer_blocks.{d}.<inside a block>
            inside = ".".join(rest[2:-1])
            rest = rest[:2] + ([BLOCK[inside]] if inside in BLOCK else [BLOCK[p] for p in rest[2:-1]]) + rest[-1:]
    return rest


def unet_key_map(model):
    """{published key: our parameter name} for every parameter of a U-Net built from a Stable Diffusion config."""
    return key_map(model, module_names(model.cfg), unet_rename)


# ----------------------------------------------------------------------------------------------------
# Loading


def load_sd_unet(path, dtype=torch.float32, device="cpu"):
    """Our UNet holding the Stable Diffusion U-Net in the diffusers folder `path` (its unet/)."""
    raw, config_file = read_config(path)
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise EmuError(f"{config_file}: a {raw['_class_name']}, not a UNet2DConditionModel")
    model = empty_model(UNet, unet_config_from_diffusers(raw, config_file), dtype, device)
    load_hf_weights(model, path, unet_key_map(model), stems=WEIGHT_STEMS)
    return model


# ----------------------------------------------------------------------------------------------------
# The VAE

VAE_FIXED = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
             "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}
ATTENTION = {"norm": "group_norm", "attn.q": "to_q", "attn.k": "to_k", "attn.v": "to_v", "attn.out": "to_out.0"}


def vae_config_from_diffusers(raw, file):
    """Our AutoencoderConfig for a diffusers AutoencoderKL config.json (a dict read from `file`)."""
    check_fixed(raw, VAE_FIXED, file)
    widths = raw.get("block_out_channels")
    down, up = raw.get("down_block_types"), raw.get("up_block_types")
    if (not widths or any(w % widths[0] for w in widths) or down != ["DownEncoderBlock2D"] * len(widths)
            or up != ["UpDecoderBlock2D"] * len(widths)):
        raise EmuError(f"{file}: not Stable Diffusion's VAE layout (block_out_channels {widths}, down_block_types "
                       f"{down}, up_block_types {up})")
    for key in ("latent_channels", "layers_per_block"):
        if key not in raw:
            raise EmuError(f"{file}: missing entry {key!r}")
    return AutoencoderConfig(latent_channels=raw["latent_channels"], base_channels=widths[0],
                             channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=raw["layers_per_block"],
                             fourier=False, shortcuts=False, quant_convs=True, attn_qkv_bias=True, pad_after=True,
                             norm_groups=raw.get("norm_num_groups", 32))


def vae_module_names(cfg):
    """{our module: the published module} for the autoencoder's blocks, in the order they are built."""
    levels = len(cfg.channel_mult)
    names, i = {}, 0
    for level in range(levels):
        for r in range(cfg.num_res_blocks):
            names[f"encoder.down.{i}"] = f"encoder.down_blocks.{level}.resnets.{r}"
            i += 1
        if level != levels - 1:
            names[f"encoder.down.{i}.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
            i += 1
    i = 0
    for block, level in enumerate(reversed(range(levels))):
        for r in range(cfg.num_res_blocks + 1):
            names[f"decoder.up.{i}"] = f"decoder.up_blocks.{block}.resnets.{r}"
            i += 1
        if level != 0:
            names[f"decoder.up.{i}.conv"] = f"decoder.up_blocks.{block}.upsamplers.0.conv"
            i += 1
    for part in ("encoder", "decoder"):
        names.update({f"{part}.mid.res1": f"{part}.mid_block.resnets.0", f"{part}.mid.res2": f"{part}.mid_block.resnets.1",
                      f"{part}.mid.attn": f"{part}.mid_block.attentions.0", f"{part}.conv_in": f"{part}.conv_in",
                      f"{part}.norm_out": f"{part}.conv_norm_out", f"{part}.conv_out": f"{part}.conv_out"})
    names.update({"encoder.quant_conv": "quant_conv", "decoder.post_quant_conv": "post_quant_conv"})
    return names


def vae_rename(prefix, rest):
    """The parts of an autoencoder parameter's name inside a ResBlock or the mid block's attention, published."""
    inside, leaf = ".".join(rest[:-1]), rest[-1]
    if not inside:
        return [leaf]
    return [ATTENTION[inside] if prefix.endswith(".attn") else RESBLOCK[inside], leaf]


def vae_key_map(model):
    """{published key: our parameter name} for every parameter of an autoencoder built from a Stable Diffusion VAE config."""
    return key_map(model, vae_module_names(model.cfg), vae_rename)


def load_sd_vae(path, dtype=torch.float32, device="cpu"):
    """Our Autoencoder holding the Stable Diffusion VAE in the diffusers folder `path` (its vae/), with its
    scaling_factor as our scale_factor: encode() gives the latents the U-Net was trained on."""
    raw, config_file = read_config(path)
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise EmuError(f"{config_file}: a {raw['_class_name']}, not an AutoencoderKL")
    model = empty_model(Autoencoder, vae_config_from_diffusers(raw, config_file), dtype, device)
    load_hf_weights(model, path, vae_key_map(model), stems=WEIGHT_STEMS)
    model.scale_factor.fill_(raw.get("scaling_factor", 0.18215))  # not in the weights; the v1 value if absent
    return model


# ----------------------------------------------------------------------------------------------------
# The text tower, the scheduler, the whole folder


class SDTextEncoder(nn.Module):
    """Stable Diffusion's conditioning as a TextEmbedding: CLIP's last hidden states at all 77 positions,
    every one of them attended (Stable Diffusion was trained without a padding mask, so its U-Net sees
    the end-of-text tokens that pad each caption), no T5 tokens and no pooled vector."""

    def __init__(self, clip, tokenizer):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer

    @torch.no_grad()
    def encode(self, captions):
        ids, _ = tokenize(self.tokenizer, captions, self.clip.token_embedding.weight.device, clean=clip_clean)  # (B, 77)
        hidden, _ = self.clip(ids)
        B, L = ids.shape
        return TextEmbedding(clip=hidden.float(), clip_mask=torch.ones(B, L, dtype=torch.bool, device=ids.device),
                             t5=hidden.new_zeros(B, 0, 0).float(), t5_mask=torch.zeros(B, 0, dtype=torch.bool, device=ids.device),
                             pooled=hidden.new_zeros(B, 0).float())


SCHEDULER_FIXED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def diffusion_from_scheduler(path, spacing="trailing"):
    """Our GaussianDiffusion for the folder's scheduler/scheduler_config.json: Stable Diffusion's
    scaled_linear betas and its prediction type (v1: epsilon; v2 at 768 pixels: v_prediction). The
    sampler is ours (DDIM or DDPM, timesteps spaced by `spacing`), whichever scheduler the folder names."""
    raw, file = read_config(path, "scheduler_config.json")
    check_fixed(raw, SCHEDULER_FIXED, file)
    if raw.get("prediction_type", "epsilon") not in PREDICTIONS:
        raise EmuError(f"{file}: prediction_type {raw['prediction_type']!r} is not one of {sorted(PREDICTIONS)}")
    return GaussianDiffusion("scaled_linear", 1000, PREDICTIONS[raw.get("prediction_type", "epsilon")], spacing=spacing)


def export_stable_diffusion(unet, base, out):
    """Write `unet` (a tuned copy of the U-Net of the Stable Diffusion folder `base`) as a whole folder in
    the diffusers layout at `out`, for any tool that reads one: `base`'s other parts as they are (hard
    links where the file system allows, else copies), its unet/config.json, and the U-Net's weights under
    their published names and shapes (v1's 1x1 convolutions back from our linear layers) in
    unet/diffusion_pytorch_model.safetensors, in the U-Net's dtype."""
    base, out = Path(base), Path(out)
    if out.exists():
        raise EmuError(f"{out}: already exists; give a new folder to export to")
    published, _ = find_weight_files(base / "unet", WEIGHT_STEMS)  # {key: file}: the published shapes
    names = unet_key_map(unet)
    if set(names) != set(published):
        raise EmuError(f"{base / 'unet'}: its keys are not this U-Net's; export a U-Net tuned from this folder")
    state = unet.state_dict()
    weights = {key: state[ours].detach().reshape(published[key].entries[key][1]).contiguous().cpu()
               for key, ours in names.items()}

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("unet"), copy_function=link_or_copy)
    (out / "unet").mkdir()
    shutil.copy2(base / "unet" / "config.json", out / "unet" / "config.json")
    save_weights(out / "unet" / "diffusion_pytorch_model.safetensors", weights, metadata={"format": "pt"})
    return out


def load_stable_diffusion(folder, dtype=torch.float32, device="cpu", unet=True):
    """(U-Net, VAE, text encoder, diffusion) of a Stable Diffusion folder in the diffusers layout:
    unet/, vae/, text_encoder/ with tokenizer/ beside it, scheduler/. With unet=False the U-Net is not
    read (None): a quality-tuned checkpoint brings its own."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise EmuError(f"{folder}: not a Stable Diffusion folder in the diffusers layout (no model_index.json or unet/)")
    unet = load_sd_unet(folder / "unet", dtype, device) if unet else None
    vae = load_sd_vae(folder / "vae", dtype, device)
    clip, tokenizer = load_clip_text(folder / "text_encoder", dtype, device, projection=False)
    return unet, vae, SDTextEncoder(clip, tokenizer), diffusion_from_scheduler(folder / "scheduler")


def image_tower_folder(folder):
    """The folder of the CLIP image tower a Stable Diffusion v1 folder publishes: safety_checker/, whose
    CLIP ViT-L/14 image tower and projection (emu.text.clip.load_clip_vision reads them) embed images for
    the curation funnel, and whose concept check can be its unsafe-image filter (emu.curation.heads)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise EmuError(f"{folder}: not a Stable Diffusion folder in the diffusers layout (no model_index.json or unet/)")
    if not (folder / "safety_checker" / "config.json").is_file():
        raise EmuError(f"{folder}: no safety_checker/, the CLIP image tower the funnel would embed with "
                       f"(v2 folders publish none); give --clip with a CLIP model's folder instead")
    return folder / "safety_checker"
