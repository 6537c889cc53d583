import os

import pytest
import torch

from emu import EmuError
from emu.checkpoint import load_checkpoint, load_state_dict_checked, load_weights, save_checkpoint, save_weights


def test_round_trip(tmp_path):
    obj = {"model": {"w": torch.randn(3, 4)}, "step": 7, "args": {"lr": 0.1, "name": "x"}, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "c.pt", obj)
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["step"] == 7 and back["args"] == obj["args"]


def test_failed_write_keeps_the_old_checkpoint_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})  # cannot be pickled
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmuError, match=r"evil\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_and_garbage_files_name_the_file(tmp_path):
    with pytest.raises(EmuError, match=r"nope\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(EmuError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(EmuError, match=r"junk\.safetensors: not a safetensors file"):
        load_weights(tmp_path / "junk.safetensors")


def test_safetensors_round_trip(tmp_path):
    sd = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    save_weights(tmp_path / "w.safetensors", sd)
    back = load_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_state_dict_mismatch_is_a_one_line_error():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(EmuError, match=r"ck\.pt: shape mismatch for weight: checkpoint \(2, 4\), model \(2, 3\)"):
        load_state_dict_checked(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "ck.pt")
    with pytest.raises(EmuError, match=r"ck\.pt: state dict does not match the model \(missing 1: \['bias'\]"):
        load_state_dict_checked(model, {"weight": torch.zeros(2, 3)}, "ck.pt")
