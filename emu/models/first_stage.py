"""The first stage on disk: a directory with config.json and model.safetensors, holding the autoencoder
(config kind "kl", emu/models/autoencoder.py) or a VQ tokenizer (kind "vq", emu/models/vq.py), so a
script's --ae flag takes either."""
import json
import os
from dataclasses import asdict

from emu import EmuError
from emu.checkpoint import load_state_dict_checked, load_weights, save_weights
from emu.models.autoencoder import Autoencoder, AutoencoderConfig
from emu.models.vq import VQConfig, VQTokenizer


def save_autoencoder(ae, path_dir):
    """Write `config.json` and `model.safetensors` (atomically) into the directory `path_dir`.
    `ae` is an Autoencoder (kind "kl") or the Muse-like model's VQ tokenizer (kind "vq", emu/models/vq.py)."""
    os.makedirs(path_dir, exist_ok=True)
    with open(os.path.join(path_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"kind": getattr(ae, "kind", "kl"), **asdict(ae.cfg)}, f, indent=2)
    save_weights(os.path.join(path_dir, "model.safetensors"), ae.state_dict())


def load_autoencoder(path_dir, device="cpu"):
    """Load a directory written by save_autoencoder as a frozen Autoencoder (or VQTokenizer) in eval mode.

    Raises EmuError naming the file for a missing directory, config or weights, an unreadable
    config, or weights that do not fit the config (missing keys, wrong shapes).
    """
    if not os.path.isdir(path_dir):
        raise EmuError(f"{path_dir}: autoencoder directory not found (run python train_ae.py first)")
    config_path = os.path.join(path_dir, "config.json")
    if not os.path.isfile(config_path):
        raise EmuError(f"{config_path}: autoencoder config not found")
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
        fields["channel_mult"] = tuple(fields["channel_mult"])  # JSON has no tuples
        kind = fields.pop("kind", "kl")  # configs written before the VQ tokenizer existed have no kind
        if kind == "vq":
            model_class, cfg = VQTokenizer, VQConfig(**fields)
        elif kind == "kl":
            model_class, cfg = Autoencoder, AutoencoderConfig(**fields)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except (ValueError, TypeError, KeyError) as e:
        raise EmuError(f"{config_path}: not a valid autoencoder config ({type(e).__name__}: {str(e)[:120]})") from None
    ae = model_class(cfg)
    weights_path = os.path.join(path_dir, "model.safetensors")
    state = load_weights(weights_path)
    patch = state.get("encoder.patch.weight")
    if kind == "kl" and patch is not None and patch.shape[1] != ae.encoder.patch_channels * cfg.downsample_factor ** 2:
        raise EmuError(f"{weights_path}: its encoder's patch path reads the Fourier features too; this autoencoder was "
                       f"trained before the patch path read RGB only (emu/models/autoencoder.py, Encoder): train it again "
                       f"with train_ae.py")
    load_state_dict_checked(ae, state, weights_path)
    return ae.to(device).eval().requires_grad_(False)
