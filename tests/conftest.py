import fcntl
import os
import shutil
import sys

import pytest
import torch

# Tests import the library and the top-level scripts from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import copy_examples  # noqa: E402
from launch import run  # noqa: E402

# Under pytest-xdist each worker has a core of its own: torch's own threads would only wait for each other.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run of seconds or more; `-m 'not slow'` is the quick tier")


def pytest_collection_modifyitems(config, items):
    """The slow tests first (in file order), so that pytest-xdist starts the longest work on both cores
    and ends with short tests that fill the gaps."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests. Tiny convolutions run fastest on one thread, and on a
    busy two-core machine two OpenMP threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Built once per test session, on disk: the toy world the scripts' and experiments' tests share.
# Under pytest-xdist the workers share one copy: the first to need it builds it while holding a file
# lock, the others wait for it. Tests read these folders and never write into them.

def listing(folder):
    """Every file under `folder` with its size and modification time: what a test must not change."""
    return sorted(f"{p.relative_to(folder)} {p.stat().st_size} {p.stat().st_mtime_ns}"
                  for p in folder.rglob("*") if p.is_file() and p.name != ".built")


def build_once(tmp_path_factory, name, build):
    """The folder `name`, shared by every worker of this session, made by build(folder) the first time;
    and its listing when it was made."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, above the workers'
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").write_text("\n".join(listing(folder)))
    return folder, (folder / ".built").read_text().split("\n")


def assert_unchanged(folder, made):
    """A shared folder is read only: a test that wrote into it would change what the others see."""
    now = listing(folder)
    changed = sorted(set(now) ^ set(made))
    assert not changed, f"{folder} was changed by a test: {changed[:5]}"


def _build_world(w):
    from emu.evaluation.faithfulness import save_classifier, train_attribute_classifier
    run("data/make_toy.py", "--n", "96", "--out", f"{w}/haystack", "--towers", f"{w}/towers", "--tower-steps", "3")
    run("train_ae.py", "--data", f"{w}/haystack", "--out", f"{w}/ae", "--steps", "2", "--bs", "8", "--holdout", "8")
    frozen = ["--ae", f"{w}/ae", "--clip", f"{w}/towers/clip", "--t5", f"{w}/towers/t5"]
    run("pretrain.py", "--data", f"{w}/haystack", "--out", f"{w}/pre", "--steps", "6", "--bs", "8", *frozen)
    # a 48-image haystack (the world's first 48 samples) and a 2-step model on it, for the experiments
    copy_examples(w / "haystack", sorted(p.stem for p in (w / "haystack").glob("*.png"))[:48], w / "haystack48")
    run("pretrain.py", "--data", f"{w}/haystack48", "--out", f"{w}/pre48", "--steps", "2", "--bs", "4", *frozen,
        "--sample-every", "0")
    # the faithfulness judge's attribute classifier, as `eval_pairs.py --judge-steps 5` trains it when missing
    save_classifier(train_attribute_classifier(steps=5), str(w / "judge.pt"))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """(folder, the frozen parts' flags) of a 96-image toy world with its text towers (towers/), a 2-step
    autoencoder (ae/), a 6-step pretrained model (pre/ckpt.pt), the first 48 images (haystack48/) with a
    2-step model on them (pre48/ckpt.pt), and the judges' attribute classifier (judge.pt). Read only."""
    w, made = build_once(tmp_path_factory, "toy-world", _build_world)
    yield w, ["--ae", f"{w}/ae", "--clip", f"{w}/towers/clip", "--t5", f"{w}/towers/t5"]
    assert_unchanged(w, made)


def _build_kandinsky(w, world):
    towers = ["--clip", f"{world}/towers/clip", "--t5", f"{world}/towers/t5"]
    run("train_ae.py", "--arch", "kandinsky", "--data", f"{world}/haystack", "--out", f"{w}/movq", "--steps", "2", "--bs", "8",
        "--holdout", "8")
    run("train_prior.py", "--kind", "linear", "--data", f"{world}/haystack", *towers[:2], "--holdout", "16", "--out", f"{w}/prior")
    run("pretrain.py", "--arch", "kandinsky", "--preset", "toy-inpaint", "--data", f"{world}/haystack", "--out", f"{w}/inpaint",
        "--steps", "2", "--bs", "8", "--sample-every", "0", "--ae", f"{w}/movq", "--prior", f"{w}/prior/prior.pt", *towers)


@pytest.fixture(scope="session")
def kandinsky_world(tmp_path_factory, toy_world):
    """The toy world's Kandinsky parts: MoVQ (movq/, 2 steps), the linear prior (prior/prior.pt) and a
    2-step inpainting decoder (inpaint/ckpt.pt), which has every mode of the demo. Read only."""
    w, made = build_once(tmp_path_factory, "kandinsky-world", lambda folder: _build_kandinsky(folder, toy_world[0]))
    yield w
    assert_unchanged(w, made)
