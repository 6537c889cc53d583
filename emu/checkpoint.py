"""Checkpoints: written atomically, read without running pickled code.

A checkpoint is a dict {model, ema, opt, step, args, rng, ...} saved with torch.save. Writing goes
to a temporary file in the same directory, is fsync'ed, then renamed over the target, so a crash
mid-write never leaves a truncated checkpoint behind. Reading uses `weights_only=True`: tensors,
numbers, strings, lists and dicts only.
"""
import os
import tempfile

import torch
from safetensors.torch import save_file

from emu import EmuError
from emu.hf import read_safetensors


def _atomic_write(path, write):
    """Call write(tmp_path), fsync it, then rename it to `path` (and fsync the directory)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, obj):
    """Atomically torch.save `obj` (a dict of tensors / plain Python values) to `path`."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint, refusing pickled code.

    Raises EmuError with the file name for a missing, truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmuError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmuError(f"{path}: not a readable checkpoint ({first_line[:200]})") from None
    if not isinstance(obj, dict):
        raise EmuError(f"{path}: not an emu checkpoint (expected a dict, got {type(obj).__name__})")
    return obj


def save_weights(path, state_dict, metadata=None):
    """Atomically write a state dict as safetensors (tensors only, contiguous copies)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(path):
    """Read a safetensors file into a CPU state dict; EmuError naming the file (and the tensor) if it
    is missing, truncated or malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmuError(f"{path}: weights file not found")
    return read_safetensors(path)


def load_state_dict_checked(model, state_dict, path):
    """model.load_state_dict with one-line errors that name the file and the offending keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise EmuError(f"{path}: state dict does not match the model "
                       f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})")
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise EmuError(f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict(state_dict)


def rng_state():
    """Every RNG state training depends on, as tensors (safe for weights_only loading)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
