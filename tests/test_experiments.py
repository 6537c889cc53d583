"""The experiment scripts in experiments/, run at the smallest size: they finish, write their table and
plots, and the parts that must be deterministic are."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import architectures  # noqa: E402
import common  # noqa: E402
import qtune_overfitting  # noqa: E402
import table1_autoencoder  # noqa: E402
from emu.datasets.folders import from_uint8  # noqa: E402
from emu.evaluation.pairwise import summarize_outcomes  # noqa: E402
from emu.datasets.toyworld import parse_caption  # noqa: E402
from launch import run, script  # noqa: E402


def write_photos(folder):
    """Four smooth 72x96 'photographs' (b.jpg a JPEG), from formulas so every run has the same ones."""
    os.makedirs(folder)
    yy, xx = np.mgrid[0:72, 0:96]
    for i, name in enumerate(["a.png", "b.jpg", "c.png", "held.png"]):
        image = np.stack([128 + 100 * np.sin(xx / (3 + i) + c) * np.cos(yy / (4 + c)) for c in range(3)], -1)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, name))


def folder_args(tmp_path, *argv):
    return table1_autoencoder.parse_args(["--photos", str(tmp_path / "photos"), "--heldout", "held.png", *argv])


def test_table1_dataset_is_random_crops_then_every_held_out_tile_and_repeats_for_a_seed(tmp_path):
    write_photos(tmp_path / "photos")
    args = folder_args(tmp_path, "--photo-size", "48", "--crops", "10")
    train, held = table1_autoencoder.find_photos(args)
    assert [p.name for p in train] == ["a.png", "b.jpg", "c.png"] and [p.name for p in held] == ["held.png"]
    n_held, photos = table1_autoencoder.write_dataset(str(tmp_path / "d1"), train, held, 16, args)
    assert photos["held.png"].shape == (48, 64, 3)  # the shorter side resized to 48
    assert n_held == (48 // 16) * (64 // 16)
    names = sorted(n for n in os.listdir(tmp_path / "d1") if n.endswith(".png"))
    assert len(names) == 10 + n_held
    # train_ae.py --holdout N holds out the last N images in name order: they must be the held-out tiles
    assert all(n.startswith("0-train-") for n in names[:10]) and all(n.startswith("1-heldout-held-") for n in names[10:])
    first_tile = np.asarray(Image.open(tmp_path / "d1" / "1-heldout-held-0000.png"))
    assert np.array_equal(first_tile, photos["held.png"][:16, :16])
    table1_autoencoder.write_dataset(str(tmp_path / "d2"), train, held, 16, args)
    for name in names:
        assert (tmp_path / "d1" / name).read_bytes() == (tmp_path / "d2" / name).read_bytes()


def test_table1_variants_differ_only_in_the_flags_they_name(tmp_path):
    """Every row is train_ae.py with AE-16's command line but for its own flags; both scales likewise."""
    import train_ae
    write_photos(tmp_path / "photos")
    args = folder_args(tmp_path)
    named = {"--latent-channels": "latent_channels", "--fourier": "fourier", "--no-fourier": "fourier",
             "--adversarial": "adversarial", "--no-adversarial": "adversarial"}
    for scale in (8, 4):
        parsed = {name: vars(train_ae.build_parser().parse_args(table1_autoencoder.train_command(name, scale, "d", "o", 7, args)[1:]))
                  for name, _ in table1_autoencoder.VARIANTS}
        base = parsed["AE-16"]
        assert base["preset"] == {8: "toy-f8", 4: "toy"}[scale] and base["image_size"] == {8: 64, 4: 32}[scale]
        assert base["holdout"] == 7 and base["fourier"] is False and base["adversarial"] is False
        for name, flags in table1_autoencoder.VARIANTS:
            differs = {k for k in base if parsed[name][k] != base[k]}
            assert differs <= {named[f] for f in flags if f.startswith("--")}, (name, differs)
        assert {k for k in base if parsed["Fourier-AE-16 + adversarial"][k] != base[k]} == {"fourier", "adversarial"}
        assert {k for k in base if parsed["AE-4"][k] != base[k]} == {"latent_channels"}
    from emu.models.autoencoder import PRESETS
    # the 8x preset is the toy one with one more level, nothing else
    assert PRESETS["toy-f8"].downsample_factor == 8 and PRESETS["toy"].downsample_factor == 4
    assert dataclasses.replace(PRESETS["toy-f8"], channel_mult=PRESETS["toy"].channel_mult) == PRESETS["toy"]


def test_table1_bad_input_gets_one_line(tmp_path):
    write_photos(tmp_path / "photos")
    for argv, message in [(["--photos", str(tmp_path / "nowhere"), "--heldout", "x.png"], "photo folder not found"),
                          (["--photos", str(tmp_path / "photos")], "--photos needs --heldout"),
                          (["--photos", str(tmp_path / "photos"), "--heldout", "gone.png"], "gone.png: photograph not found"),
                          (["--sources", "mate", "--debian-root", str(tmp_path / "nowhere")],
                           "not found; the mate photographs need `apt-get install mate-backgrounds"),
                          (["--scales", "16"], "--scales: 16 needs to be one of [4, 8]"),
                          (["--variants", "AE-32"], "unknown variant 'AE-32'")]:
        proc = script("experiments/table1_autoencoder.py", "--out", str(tmp_path / "out"), *argv)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_table1_trains_each_variant_and_writes_the_table_and_plots(tmp_path):
    write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    run("experiments/table1_autoencoder.py", "--photos", str(tmp_path / "photos"), "--heldout", "held.png", "--out", str(out),
        "--photo-size", "64", "--crops", "16", "--steps", "8:3,4:3", "--bs", "4", "--disc-start", "2",
        "--variants", "AE-4,Fourier-AE-16 + adversarial")
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| AE-") or line.startswith("| Fourier-")]
    # per scale: the main table, the paired differences, then per photograph
    assert [r.split(" | ")[0] for r in rows] == ["| AE-4", "| Fourier-AE-16 + adversarial"] * 4
    assert "| AE-4 | 4 | no | no |" in table and "| Fourier-AE-16 + adversarial | 16 | yes | yes |" in table
    assert "## 8x downsampling: 1 held-out 64x64 tiles, 8x8 latents" in table
    assert "## 4x downsampling: 4 held-out 32x32 tiles, 8x8 latents" in table
    assert "- held.png (held out): licence not given" in table
    # the table's numbers are the trained models' own: recompute AE-4's held-out SSIM and PSNR at 4x
    from emu.models.first_stage import load_autoencoder
    from emu.evaluation.metrics import psnr, ssim
    photo = np.asarray(Image.open(out / "data-f4" / "1-heldout-held-0000.png"))
    ae = load_autoencoder(str(out / "f4" / "AE-4"))
    assert ae.downsample_factor == 4 and load_autoencoder(str(out / "f8" / "AE-4")).downsample_factor == 8
    tiles = table1_autoencoder.tiles(np.asarray(Image.open(tmp_path / "photos" / "held.png").resize((85, 64), Image.BICUBIC)), 32)
    assert np.array_equal(tiles[0], photo)
    x = from_uint8(tiles)
    with torch.no_grad():
        r = table1_autoencoder.reconstruct(ae, x)
    section = table[table.index("## 4x"):]
    assert f"| AE-4 | 4 | no | no | {ssim(r, x).mean().item():.3f} ± " in section
    assert f"{psnr(r, x).mean().item():.2f} ± " in section
    # the paired difference is the mean of per-tile differences
    assert "| Fourier-AE-16 + adversarial − AE-16 |" not in table  # AE-16 was not trained
    for png in ["reconstructions.png", "heldout_psnr_f8.png", "heldout_psnr_f4.png"]:
        with Image.open(out / png) as im:
            assert im.width > 0 and im.height > 0
    with Image.open(out / "reconstructions.png") as im:  # one row per held-out photo, original + 2 models
        assert im.width == 3 * (64 + 4) * 2


# -----------------------------------------------------------------------------
# photographs from installed packages

import photos  # noqa: E402


def fake_debian_root(root, mate=("Aqua.jpg", "Storm.jpg"), plasma=photos.PLASMA_PHOTOS):
    """The files of mate-backgrounds and plasma-workspace-wallpapers that photos.py reads, with small images."""
    nature = root / photos.MATE_FOLDER / "nature"
    nature.mkdir(parents=True)
    for name in mate:
        Image.new("RGB", (40, 30), "green").save(nature / name)
    (root / photos.MATE_COPYRIGHT).parent.mkdir(parents=True)
    (root / photos.MATE_COPYRIGHT).write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: MATE Backgrounds\n\n"
        "Files: *\nCopyright: 2014, Someone Else\nLicense: GPL-2+\n\n"
        "Files: nature/Aqua.jpg\n       nature/Other.jpg\nCopyright: 2008, Charles Barbin <barbinch@free.fr>\n"
        "           2009, A. Second\nLicense: CC-BY-SA-3.0\nComment: holders in AUTHORS\n")
    for i, name in enumerate(plasma):
        images = root / photos.PLASMA_FOLDER / name / "contents" / "images"
        images.mkdir(parents=True)
        for size in ("800x600", "1920x1080", "1080x1920"):
            w, h = map(int, size.split("x"))
            Image.new("RGB", (w // 40, h // 40), "blue").save(images / f"{size}.jpg")
        (images.parent.parent / "metadata.json").write_text(json.dumps(
            {"KPlugin": {"Authors": [{"Name": f"Author {i}", "Name[de]": "x"}], "License": "LGPLv3", "Name": name}}))


def test_photographs_keep_the_licence_their_package_states(tmp_path):
    fake_debian_root(tmp_path)
    found = {p.name: p for p in photos.find_photos(["mate", "plasma"], str(tmp_path))}
    assert sorted(found) == ["mate/Aqua.jpg", "mate/Storm.jpg"] + sorted(f"plasma/{n}" for n in photos.PLASMA_PHOTOS)
    # the last stanza whose Files match rules, holders without e-mail addresses
    assert found["mate/Aqua.jpg"].licence == "CC-BY-SA-3.0 (2008, Charles Barbin 2009, A. Second)"
    assert found["mate/Storm.jpg"].licence == "GPL-2+ (2014, Someone Else)"  # only the "Files: *" stanza matches
    first = photos.PLASMA_PHOTOS[0]
    assert found[f"plasma/{first}"].licence == "LGPLv3 (Author 0)"
    assert found[f"plasma/{first}"].path.endswith("1920x1080.jpg")  # the largest image (1080x1920 has as many pixels; ties by name)
    # every held-out default is a real photograph name of the three sources
    assert all(name.split("/")[0] in photos.SOURCES for name in photos.HELDOUT)


def test_photograph_sources_that_are_missing_say_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="usr/share/wallpapers/BytheWater/metadata.json: not found; the plasma photographs "
                                         "need `apt-get install plasma-workspace-wallpapers"):
        photos.find_photos(["plasma"], str(tmp_path))
    fake_debian_root(tmp_path, plasma=())
    (tmp_path / photos.MATE_COPYRIGHT).write_text("Files: nature/Aqua.jpg\nCopyright: 2008, X\nLicense: GPL-2+\n")
    with pytest.raises(SystemExit, match="copyright: no licence given for nature/Storm.jpg"):
        photos.find_photos(["mate"], str(tmp_path))
    with pytest.raises(SystemExit, match="unknown photograph source 'flickr'"):
        photos.find_photos(["flickr"], str(tmp_path))
    monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"skimage: not installed; the skimage photographs need `pip install --no-deps scikit-image"):
        photos.find_photos(["skimage"])


# -----------------------------------------------------------------------------
# noise offset

import noise_offset  # noqa: E402


def test_luma_stats_and_histogram_on_constructed_images(tmp_path):
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "a.png")  # black: brightness 0, contrast 0
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "b.png")  # white: brightness 1
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, 4:] = 255  # half black, half white: brightness 0.5, contrast 0.5
    Image.fromarray(half).save(tmp_path / "c.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "grid.png")  # the sample grid is not an image of the set
    stats = noise_offset.luma_stats(str(tmp_path))
    assert np.allclose(stats, [[0, 0], [1, 0], [0.5, 0.5]], atol=1e-9)
    hist = noise_offset.histogram(stats[:, 0], 3)
    assert np.allclose([x for x, _ in hist], [1 / 6, 1 / 2, 5 / 6])
    assert np.allclose([f for _, f in hist], [1 / 3, 1 / 3, 1 / 3])  # 1.0 counts in the last bin
    assert np.allclose([f for _, f in noise_offset.histogram(np.array([0.1, 0.2, 0.9, 1.5]), 2)], [0.5, 0.5])


@pytest.mark.slow
def test_noise_offset_experiment_runs_end_to_end(toy_world, tmp_path):
    w, _ = toy_world
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares on the left\n")
    out = tmp_path / "exp"
    run("experiments/noise_offset.py", "--data", f"{w}/haystack48", "--ae", f"{w}/ae", "--clip", f"{w}/towers/clip",
        "--t5", f"{w}/towers/t5", "--prompts", str(tmp_path / "prompts.txt"), "--n", "2", "--steps", "2", "--bs", "4",
        "--out", str(out))
    table = (out / "results.md").read_text()
    assert "| training images | 48 |" in table and "| no offset | 4 |" in table and "| offset 0.1 | 4 |" in table
    b = noise_offset.luma_stats(str(out / "samples-offset-0"))[:, 0]
    assert f"| no offset | 4 | {b.mean():.3f} ± {b.std():.3f} |" in table
    for png in ["brightness.png", "contrast.png"]:
        with Image.open(out / png) as im:
            assert im.size == (640, 400)


# ----------------------------------------------------------------------------------------------------
# The quality-tuning experiments: quality-tuned vs pretrained, set size, overfitting

@pytest.fixture(scope="module")
def tuning_world(toy_world):
    """The session's toy world (its 48-image haystack and the 2-step model on it) and the flags that make each
    experiment's quality-tuning and evaluation as small as they go; the haystack stands in for the curated set."""
    w, _ = toy_world
    flags = ["--pretrained", f"{w}/pre48/ckpt.pt", "--curated", f"{w}/haystack48", "--haystack", f"{w}/haystack48",
             "--heldout", "4", "--prompts", "4", "--iters", "2", "--bs", "4", "--eval-every", "1", "--sample-steps", "2",
             "--judge", f"{w}/judge.pt", "--judge-steps", "5", "--n-boot", "50"]
    return w, flags


def scenes(haystack):
    seen = set()
    for name in os.listdir(haystack):
        if name.endswith(".json"):
            attributes = json.load(open(os.path.join(haystack, name)))["attributes"]
            seen.add(tuple(sorted(attributes.items())))
    return seen


@pytest.mark.slow
def test_unseen_prompts_name_scenes_no_haystack_image_shows(tuning_world):
    w, _ = tuning_world
    prompts = common.unseen_prompts(f"{w}/haystack48", 30, seed=1)
    assert prompts == common.unseen_prompts(f"{w}/haystack48", 30, seed=1) != common.unseen_prompts(f"{w}/haystack48", 30, seed=2)
    assert len({p for p, _ in prompts}) == 30
    seen = scenes(f"{w}/haystack48")
    for prompt, category in prompts:
        attributes = parse_caption(prompt)
        assert tuple(sorted(attributes.items())) not in seen
        assert category == ("Counting" if attributes["count"] > 1 else "Basic")
    with pytest.raises(SystemExit, match="fewer than the 5000 prompts"):
        common.unseen_prompts(f"{w}/haystack48", 5000, seed=0)


def test_early_stop_point_follows_qtunes_patience_rule():
    losses = [(0, 1.0), (25, 0.9), (50, 0.95), (75, 0.8), (100, 0.85), (125, 0.81), (150, 0.9)]
    assert qtune_overfitting.early_stop_point(losses, 3) == (150, 75)
    assert qtune_overfitting.early_stop_point(losses, 4) == (None, 75)
    assert qtune_overfitting.early_stop_point(losses, 1) == (50, 25)


@pytest.mark.slow
def test_qtune_vs_pretrained_pools_its_seeds(tuning_world, tmp_path):
    w, flags = tuning_world
    out = tmp_path / "exp"
    run("experiments/qtune_vs_pretrained.py", *flags, "--seeds", "0,1", "--out", out)
    table = (out / "results.md").read_text()
    for seed in (0, 1):  # each seed tuned on its own split: 44 trained, 4 held out, never trained on
        train = {f for f in os.listdir(out / f"seed-{seed}/train") if f.endswith(".png")}
        assert len(train) == 44 and not train & set(os.listdir(out / f"seed-{seed}/heldout"))
        assert f"| {seed} | visual appeal |" in table and f"| {seed} | text faithfulness |" in table
    assert set(os.listdir(out / "seed-0/heldout")) != set(os.listdir(out / "seed-1/heldout"))
    by_seed = [common.judge_outcomes(out / f"seed-{seed}/eval") for seed in (0, 1)]
    pooled = summarize_outcomes(np.stack([o["visual appeal"] for o in by_seed], axis=1), n_boot=50)
    assert (f"| all 2 pooled (8 pairs) | visual appeal | {pooled['win']:.1f}% [{pooled['ci']['win'][0]:.1f}, "
            f"{pooled['ci']['win'][1]:.1f}] |") in table
    assert "| paper (PartiPrompts) | visual appeal | 82.9% | 1.7% | 15.4% |" in table
    assert Image.open(out / "win_rates.png").size[0] == 640


@pytest.mark.slow
def test_qtune_set_size_tunes_nested_subsets_against_a_stand_in(tuning_world, tmp_path):
    w, flags = tuning_world
    out = tmp_path / "exp"
    stdout = run("experiments/qtune_set_size.py", *flags, "--seeds", "0", "--fractions", "0.05,1", "--out", out)
    assert "--seed 1 --sample-every 0" in stdout  # the stand-in: the pretrained recipe, another seed
    stand_in = torch.load(out / "baseline/ckpt.pt", weights_only=True)
    assert stand_in["args"]["seed"] == 1 and stand_in["args"]["steps"] == 2 and stand_in["args"]["bs"] == 4
    small, large = (sorted(f for f in os.listdir(out / f"seed-0/set-{n}") if f.endswith(".png")) for n in (2, 44))
    assert len(small) == 2 and set(small) <= set(large)
    assert not set(large) & set(os.listdir(out / "heldout"))
    assert torch.load(out / "seed-0/qtune-2/ckpt.pt", weights_only=True)["step"] == 2  # 2 images, batches of 4
    table = (out / "results.md").read_text()
    none = summarize_outcomes(common.judge_outcomes(out / "seed-0/eval-none")["visual appeal"][:, None], n_boot=50)
    assert f"| none (pretrained) | 0 | visual appeal | {none['win']:.1f}% [" in table and "| none: 24.8% |" in table
    assert "| 5% of the pool | 2 | visual appeal |" in table and "| 100: 60.3% |" in table
    assert "| 100% of the pool | 44 | visual appeal |" in table and "| 2000: 67.0% |" in table
    assert Image.open(out / "win_rate_by_size.png").size == (640, 400)


@pytest.mark.slow
def test_qtune_overfitting_keeps_each_milestone_of_one_run(tuning_world, tmp_path):
    w, flags = tuning_world
    out = tmp_path / "exp"
    run("experiments/qtune_overfitting.py", *flags, "--milestones", "2,4", "--out", out)
    for m in (2, 4):
        assert torch.load(out / f"iter-{m}.pt", weights_only=True)["step"] == m
    records = [json.loads(line) for line in open(out / "qtune/metrics.jsonl")]
    assert [r["iter"] for r in records if "heldout" in r] == [0, 1, 2, 3, 4]  # one run, resumed once, checked every iteration
    assert [r["event"] for r in records if "event" in r] == ["start", "resume"]
    train_prompts = (out / "prompts-train.tsv").read_text().splitlines()[1:]
    assert len(train_prompts) == 4 and all(p.split("\t")[1] == "Training" for p in train_prompts)
    table = (out / "results.md").read_text()
    for m in (2, 4):
        for prompts in ("held-out prompts", "training captions"):
            assert f"| {m} |" in table and f"| {prompts} | visual appeal |" in table
    heldout = {r["iter"]: r["heldout"] for r in records if "heldout" in r}
    assert f"| 4 | {heldout[4]:.4f} |" in table and f"Held-out loss before tuning: {heldout[0]:.4f}." in table
    assert Image.open(out / "win_rates_by_iteration.png").size == (640, 400)


@pytest.mark.slow
def test_architectures_tunes_and_judges_each_architecture_on_the_same_splits(tuning_world, tmp_path):
    w, flags = tuning_world
    out = tmp_path / "exp"
    run("experiments/architectures.py", *flags, "--seeds", "0", "--towers", f"{w}/towers", "--pretrain-steps", "2",
           "--pretrain-flags", "--bs 4 --sample-every 0", "--vq-steps", "2", "--vq-flags", "--bs 4 --holdout 8", "--out", out)
    assert json.load(open(out / "muse/vq/config.json"))["kind"] == "vq"
    for arch in ("pixel", "muse"):
        ckpt = torch.load(out / arch / "pretrain/ckpt.pt", weights_only=True)
        assert ckpt["arch"] == arch and ckpt["step"] == 2
        assert torch.load(out / arch / "seed-0/qtune/ckpt.pt", weights_only=True)["arch"] == arch
    splits = [sorted(os.listdir(out / arch / "seed-0/heldout")) for arch in ("ldm", "pixel", "muse")]
    assert splits[0] == splits[1] == splits[2]  # every architecture tuned and checked on the same images
    table = (out / "results.md").read_text()
    for arch, name in (("ldm", "latent diffusion (Emu)"), ("pixel", "pixel diffusion (Imagen-like)"),
                       ("muse", "masked transformer (Muse-like)")):
        s = summarize_outcomes(common.judge_outcomes(out / arch / "seed-0/eval")["visual appeal"][:, None], n_boot=50)
        assert f"| {name} | visual appeal | {s['win']:.1f}% [{s['ci']['win'][0]:.1f}, {s['ci']['win'][1]:.1f}] |" in table
    assert Image.open(out / "win_rates.png").size[0] == 640
    # a second run takes this run's pixel and Muse-like models instead of pretraining them again
    again = architectures.parse_args(["--pretrained-from", str(out), "--out", str(tmp_path / "again")])
    for arch in ("pixel", "muse"):
        assert architectures.pretrain(again, arch, tmp_path / "again" / arch) == os.path.join(out, arch, "pretrain", "ckpt.pt")
    assert not (tmp_path / "again").exists()
    again.pretrained_from = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"nowhere/pixel/pretrain/ckpt.pt: no pretrained --arch pixel model there"):
        architectures.pretrain(again, "pixel", tmp_path / "again" / "pixel")


@pytest.mark.slow
def test_kandinsky_priors_compares_both_priors_and_the_variations(tuning_world, tmp_path):
    w, _ = tuning_world
    run("train_ae.py", "--arch", "kandinsky", "--data", f"{w}/haystack48", "--out", f"{tmp_path}/movq", "--steps", "2",
           "--bs", "8", "--holdout", "8")
    run("pretrain.py", "--arch", "kandinsky", "--data", f"{w}/haystack48", "--out", f"{tmp_path}/decoder", "--steps", "2",
           "--bs", "4", "--ae", f"{tmp_path}/movq", "--clip", f"{w}/towers/clip", "--t5", f"{w}/towers/t5", "--sample-every", "0")
    out = tmp_path / "exp"
    run("experiments/kandinsky_priors.py", "--decoder", f"{tmp_path}/decoder/ckpt.pt", "--haystack", f"{w}/haystack48",
           "--clip", f"{w}/towers/clip", "--holdout", "8", "--prior-steps", "2",
           "--prior-flags", "--bs 4 --eval-every 2 --save-every 2 --sample-steps 2", "--judge", f"{w}/judge.pt",
           "--judge-steps", "5", "--steps", "2", "--variations", "3", "--n-boot", "50", "--compare", f"{w}/pre48/ckpt.pt",
           "--out", out)
    for kind in ("linear", "diffusion"):
        assert torch.load(out / f"prior-{kind}/prior.pt", weights_only=True)["config"]["kind"] == kind
    results = json.load(open(out / "results.json"))
    rows, table = results["rows"], (out / "results.md").read_text()
    assert list(rows) == ["the held-out images themselves", "true image (CLIP)", "linear prior", "diffusion prior",
                          "none (text alone)", f"ldm model {w}/pre48/ckpt.pt (text alone)"]
    for name, row in rows.items():
        assert 0 <= row["faithfulness"] <= 1 and f"| {row['faithfulness']:.3f} |" in table, name
    assert rows["true image (CLIP)"]["centred cosine"] == pytest.approx(1.0, abs=1e-5)
    assert f"| linear prior | {rows['linear prior']['centred cosine']:.3f} |" in table
    pairwise = results["pairwise"]
    assert pairwise["n"] == 8 and pairwise["win"] + pairwise["tie"] + pairwise["lose"] == pytest.approx(100.0)
    variations = results["variations"]
    assert variations["sources"] == 3 and -1 <= variations["own"] <= 1 and 0 <= variations["own nearest"] <= 1
    assert 0 <= variations["others farther"] <= 1
    assert f"to their own source {variations['own']:.3f}" in table


def test_inpainting_hole_stands_around_the_prompts_objects():
    import inpainting
    assert inpainting.hole_box("two red circles on the left on a teal background", 0.4) == pytest.approx((0.05, 0.3, 0.45, 0.7))
    assert inpainting.hole_box("two red circles on the left on a teal background", 0.5) == pytest.approx((0.0, 0.25, 0.5, 0.75))
    assert inpainting.hole_box("a blue square at the bottom on a white background", 0.5) == pytest.approx((0.25, 0.5, 0.75, 1.0))
    assert inpainting.hole_box("a blue square on a white background", 0.8) == pytest.approx((0.1, 0.1, 0.9, 0.9))  # centred, inside


@pytest.mark.slow
def test_inpainting_experiment_fills_holes_and_keeps_the_rest(tuning_world, tmp_path):
    w, _ = tuning_world
    run("train_ae.py", "--arch", "kandinsky", "--data", f"{w}/haystack48", "--out", f"{tmp_path}/movq", "--steps", "2",
        "--bs", "8", "--holdout", "8")
    run("pretrain.py", "--arch", "kandinsky", "--preset", "toy-inpaint", "--data", f"{w}/haystack48", "--out",
        f"{tmp_path}/inpaint", "--steps", "2", "--bs", "4", "--ae", f"{tmp_path}/movq", "--clip", f"{w}/towers/clip",
        "--t5", f"{w}/towers/t5", "--sample-every", "0")
    run("train_prior.py", "--kind", "linear", "--data", f"{w}/haystack48", "--clip", f"{w}/towers/clip", "--holdout", "8",
        "--out", f"{tmp_path}/prior")
    prompts = tmp_path / "prompts.tsv"
    common.write_prompts(prompts, [("two red circles on the left on a teal background", "Counting"),
                                   ("a blue square at the top on a white background", "Basic"),
                                   ("three green diamonds in the center on a black background", "Counting")])
    out = tmp_path / "exp"
    run("experiments/inpainting.py", "--ckpt", f"{tmp_path}/inpaint/ckpt.pt", "--prior", f"{tmp_path}/prior/prior.pt",
        "--prompts", prompts, "--judge", f"{w}/judge.pt",
        "--show", "2", "--steps", "2", "--out", out)
    results = json.load(open(out / "results.json"))
    assert results["prompts"] == 3 and results["changed_outside"] < 1e-5  # only the hole is painted
    assert list(results["rows"]) == ["the real images (ceiling)", "the prompt", "no prompt (the rest of the image guides it)",
                                     "another scene's prompt", "the background colour (floor)",
                                     "another scene's prompt, read against that prompt"]
    table = (out / "results.md").read_text()
    for name, row in results["rows"].items():
        assert row["all"]["n"] == 3 and f"| {name} |" in table
    assert Image.open(out / "inpainting.png").size == (2 * 32 * 3, 6 * 32 * 3)  # 2 prompts; image, hole and 4 fills
    result = script("experiments/inpainting.py", "--ckpt", f"{w}/pre48/ckpt.pt", "--prompts", prompts, "--judge",
                    f"{w}/judge.pt", "--out", tmp_path / "exp2", timeout=120)
    assert result.returncode != 0 and "not an inpainting decoder" in result.stderr


def test_aspect_grid_draws_one_prompt_at_the_five_ratios_as_sample_draws_them(toy_world, tmp_path):
    w, _ = toy_world
    ckpt = f"{w}/pre/ckpt.pt"
    out = run("experiments/aspect_grid.py", "--ckpt", ckpt, "--seeds", "1", "--scale", "1", "--prompt", "a red circle",
              "--out", tmp_path / "grid.png")
    assert "9:16 24x40, 2:3 24x40, 1:1 32x32, 3:2 40x24, 16:9 40x24" in out
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (40, 24 + 24 + 32 + 40 + 40 + 4 * 4, 3)
    run("sample.py", "--ckpt", ckpt, "--prompt", "a red circle", "--aspect", "16:9", "--n", "1", "--out", tmp_path / "wide")
    wide = np.asarray(Image.open(tmp_path / "wide" / "0000.png"))
    assert np.array_equal(grid[:24, -40:], wide) and (grid[24:, -40:] == 255).all()


# ----------------------------------------------------------------------------------------------------
# word_swap.py: does a model read each word of its prompt

import word_swap  # noqa: E402


def test_word_swap_asks_for_one_other_value_and_redraws_with_the_caption_it_is_given(toy_world):
    from emu.datasets import toyworld
    from emu.pipeline import TextToImage
    scene = toyworld.Scene("triangle", "purple", 3, "center", "pink")
    for attribute in toyworld.ATTRIBUTES:
        asked = word_swap.swapped(scene, attribute)
        before, after = parse_caption(toyworld.caption(scene)), parse_caption(toyworld.caption(asked))
        assert [a for a in toyworld.ATTRIBUTES if before[a] != after[a]] == [attribute]
    assert word_swap.swapped(scene, "count").count == 1 and word_swap.swapped(scene, "shape").shape == "diamond"

    model = TextToImage.from_checkpoint(f"{toy_world[0]}/pre/ckpt.pt")
    images = from_uint8([toyworld.make_example(i, 5, 32, photogenic=True)[0] for i in range(2)])
    with torch.no_grad():
        latents = model.ae.encode(images)
    red, blue = ["a red circle in the center on a white background"] * 2, ["a blue square on the left on a black background"] * 2
    # no noise: the autoencoder alone, whatever the caption
    assert torch.equal(word_swap.redraw(model, latents, red, -1, 40, 5.0, 0.7), model.ae.decode(model.ae.encode(images)).clamp(-1, 1))
    assert torch.equal(word_swap.redraw(model, latents, red, -1, 40, 5.0, 0.7), word_swap.redraw(model, latents, blue, -1, 40, 5.0, 0.7))
    # from step 300: the same noise each time, and the caption reaches the model
    once, again = (word_swap.redraw(model, latents, red, 300, 100, 5.0, 0.7) for _ in range(2))
    assert torch.equal(once, again) and not torch.equal(once, word_swap.redraw(model, latents, blue, 300, 100, 5.0, 0.7))
    # the guidance rescale reaches the sampler: plain guidance redraws differently
    assert not torch.equal(once, word_swap.redraw(model, latents, red, 300, 100, 5.0, 0.0))


def test_word_swap_prints_a_row_per_attribute_and_step(toy_world, capsys):
    w, _ = toy_world
    word_swap.main(word_swap.parse_args(["--ckpt", f"{w}/pre/ckpt.pt", "--classifier", f"{w}/judge.pt", "--n", "3",
                                         "--attributes", "shape,count", "--t=-1,100", "--steps-per", "50"]))
    out = capsys.readouterr().out
    assert "guidance 5.0, rescaled 0.7" in out  # the toy model's own rescale by default
    rows = [line for line in out.splitlines() if line.startswith("| shape") or line.startswith("| count")]
    assert [row.split(" | ")[:2] for row in rows] == [["| shape", "-1"], ["| shape", "100"], ["| count", "-1"], ["| count", "100"]]
    own, swapped_own = rows[0].split(" | ")[2:4]
    assert own == swapped_own  # no noise: the caption cannot change the image
    for flags, problem in [(["--attributes", "shape,size"], "error: --attributes size: choose from shape,color,count,position,background"),
                           (["--t", "1000"], "error: --t 1000: each step must lie in -1 .. 999"),
                           (["--cfg-rescale", "1.5"], "error: --cfg-rescale 1.5: must lie in 0 .. 1")]:
        with pytest.raises(SystemExit, match=problem):
            word_swap.main(word_swap.parse_args(["--ckpt", f"{w}/pre/ckpt.pt", "--classifier", f"{w}/judge.pt", *flags]))
