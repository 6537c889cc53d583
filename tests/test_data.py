import os

import numpy as np
import pytest
import torch
from PIL import Image

from emu import EmuError
from emu.datasets import toyworld
from emu.datasets.folders import EpochBatches, ImageCaptionFolder, make_grid, read_prompts, save_png, to_uint8


@pytest.fixture
def folder(tmp_path):
    toyworld.write_folder(tmp_path, toyworld.make_haystack(6, seed=0))
    return tmp_path


def test_reads_images_in_range_with_captions(folder):
    data = ImageCaptionFolder(str(folder), 32)
    image, caption = data[0]
    assert len(data) == 6 and image.shape == (3, 32, 32)
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert caption == (folder / "000000.txt").read_text().strip()
    assert (to_uint8(image[None])[0] == np.asarray(Image.open(folder / "000000.png").convert("RGB"))).all()


def test_resizes_and_centre_crops_other_sizes(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a red thing")
    image, _ = ImageCaptionFolder(str(tmp_path), 16)[0]
    assert image.shape == (3, 16, 16)


def test_caption_from_metadata_field(folder):
    data = ImageCaptionFolder(str(folder), 32, caption_field="true_caption")
    assert data.captions[0] == toyworld.make_haystack(6, seed=0)[0][2]["true_caption"]


def test_empty_caption_is_a_one_line_error_naming_the_file(folder):
    (folder / "000002.txt").write_text("  \n")
    with pytest.raises(EmuError, match=r"000002\.txt: caption is empty"):
        ImageCaptionFolder(str(folder), 32)


def test_missing_caption_and_corrupt_image_name_the_file(folder):
    (folder / "000001.txt").unlink()
    with pytest.raises(EmuError, match=r"000001\.txt: caption file not found"):
        ImageCaptionFolder(str(folder), 32)
    (folder / "000001.txt").write_text("fine")
    (folder / "000003.png").write_bytes(b"not a png")
    data = ImageCaptionFolder(str(folder), 32)
    with pytest.raises(EmuError, match=r"000003\.png: not a readable image"):
        data[3]


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(EmuError, match="data folder not found"):
        ImageCaptionFolder(str(tmp_path / "nope"), 32)


def test_epoch_batches_resume_where_an_uninterrupted_run_would_be():
    full = EpochBatches(10, 3, seed=4)
    it = iter(full)
    straight = [next(it) for _ in range(8)]  # crosses two epoch boundaries (3 batches per epoch)
    it = iter(EpochBatches(10, 3, seed=4, start_step=5))
    assert [next(it) for _ in range(3)] == straight[5:]
    assert sorted(sum(straight[:3], [])) == sorted(set(sum(straight[:3], [])))  # no repeats in an epoch
    with pytest.raises(EmuError, match="batch size"):
        EpochBatches(2, 3, seed=0)


def test_epoch_batches_repeat_a_set_smaller_than_the_batch_evenly_and_resume():
    it = iter(EpochBatches(3, 8, seed=2, repeat=True))
    straight = [next(it) for _ in range(5)]
    for batch in straight:  # 8 = 3 + 3 + 2: every example two or three times, a whole epoch before any third
        assert len(batch) == 8 and sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]
        assert sorted(batch.count(i) for i in range(3)) == [2, 3, 3]
    assert len({tuple(b) for b in straight}) > 1  # a fresh order each batch
    it = iter(EpochBatches(3, 8, seed=2, start_step=3, repeat=True))
    assert [next(it) for _ in range(2)] == straight[3:]
    assert next(iter(EpochBatches(10, 3, seed=4, repeat=True))) == next(iter(EpochBatches(10, 3, seed=4)))  # no change when it fits
    with pytest.raises(EmuError, match="only 0 examples"):
        EpochBatches(0, 8, seed=0, repeat=True)


def test_read_prompts_tsv_and_text(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\na red circle\tBasic\tSimple\t\ntwo squares\tCount\tCounting\t\n")
    assert read_prompts(str(tsv)) == [("a red circle", "Basic"), ("two squares", "Count")]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_prompts(str(txt)) == [("one", ""), ("two", "")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\nx\n")
    with pytest.raises(EmuError, match=r"bad\.tsv: .*'Prompt' column"):
        read_prompts(str(bad))
    windows = tmp_path / "w.tsv"  # saved by a spreadsheet: byte-order mark, CRLF, quotes inside a prompt
    windows.write_bytes('\ufeffPrompt\tCategory\tChallenge\tNote\r\na sign that says "caf\u00e9"\tText\tWriting\t\r\n'.encode())
    assert read_prompts(str(windows)) == [('a sign that says "caf\u00e9"', "Text")]


@pytest.mark.parametrize("name, n, categories", [
    ("oui.tsv", 120, {"People", "Animals", "Food", "Landscapes", "Architecture", "Vehicles", "Fantasy", "Art styles",
                      "Objects", "Events", "Plants", "Abstract"}),
    ("general.tsv", 80, {"People", "Animals", "Food & Beverage", "Outdoor Scenes", "Indoor Scenes", "Artifacts", "Vehicles",
                         "Illustrations", "Arts", "Abstract"}),
])
def test_shipped_prompt_sets_have_every_prompt_categorised_once(name, n, categories):
    prompts = read_prompts(os.path.join(os.path.dirname(__file__), "..", "data", "prompts", name))
    assert len(prompts) == n and len({p.lower() for p, _ in prompts}) == n
    assert {c for _, c in prompts} == categories


def test_png_metadata_and_grid(tmp_path):
    images = to_uint8(torch.rand(5, 3, 4, 4) * 2 - 1)
    grid = make_grid(images, ncol=2)
    assert grid.shape == (12, 8, 3) and (grid[:4, 4:] == images[1]).all() and (grid[8:, 4:] == 0).all()
    save_png(tmp_path / "x.png", images[0], {"prompt": "a red circle", "seed": 3})
    assert Image.open(tmp_path / "x.png").text == {"prompt": "a red circle", "seed": "3"}
