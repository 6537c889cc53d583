import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from emu import EmuError
from emu.checkpoint import (append_metrics, load_checkpoint, load_state_dict_checked, load_weights, read_metrics,
                            save_checkpoint, save_weights)


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


# ----------------------------------------------------------------------------------------------------
# A full disk, a kill, a crash


@pytest.fixture
def disk_full_after(request):
    """Make every file this process writes fail past `limit` bytes, as a full disk does (EFBIG from
    the file-size limit, SIGXFSZ ignored so the write returns the error); restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("writer", ["checkpoint", "weights"])
def test_full_disk_keeps_the_previous_file_and_says_so_in_one_line(tmp_path, disk_full_after, writer):
    path = tmp_path / ("c.pt" if writer == "checkpoint" else "w.safetensors")
    save, load = {"checkpoint": (save_checkpoint, load_checkpoint), "weights": (save_weights, load_weights)}[writer]
    save(path, {"w": torch.ones(10)})
    disk_full_after(100_000)
    with pytest.raises(EmuError) as error:
        save(path, {"w": torch.zeros(1_000_000)})  # 4 MB
    message = str(error.value)
    assert message.startswith(str(path)) and "File too large" in message and "previous file" in message
    assert "\n" not in message
    assert torch.equal(load(path)["w"], torch.ones(10)) and os.listdir(tmp_path) == [path.name]


KILLED_WRITER = """
import sys, torch
from emu.checkpoint import save_checkpoint
print("saving", flush=True)
for step in range(1, 10**6):
    save_checkpoint(sys.argv[1], {"step": step, "w": torch.full((2_000_000,), float(step))})
"""


def test_kill_during_saving_always_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL a process that saves checkpoint after checkpoint, at several moments: what is on
    disk is always one whole checkpoint, and the next save clears the killed write's temporary file."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 0, "w": torch.zeros(2_000_000)})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (0.05, 0.3):  # each save takes a few tens of ms
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=root, stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"saving\n"
        time.sleep(delay)
        child.kill()
        child.wait()
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["step"]))), delay
    save_checkpoint(path, {"step": -1})
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_metrics_log_is_append_only_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 1, "loss": 0.5})
    append_metrics(path, {"step": 2, "loss": 0.25})
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a crash in the middle of a line
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    append_metrics(path, {"step": 3, "loss": 0.125})
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]
    assert path.read_text().splitlines()[:2] == ['{"loss": 0.5, "step": 1}', '{"loss": 0.25, "step": 2}']
