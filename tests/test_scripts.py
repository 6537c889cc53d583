"""End-to-end smoke runs of every script on a tiny toy world, through their command lines."""
import csv
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from emu import EmuError
from emu.arch import get_arch
from emu.checkpoint import read_metrics
from emu.diffusion import GUIDANCE_RESCALE
from emu.evaluation.metrics import seed_variety
from emu.pipeline import TextToImage, read_training_checkpoint
from emu.datasets import toyworld
from emu.datasets.shards import pack_folder
from experiments.common import copy_examples
from launch import run, script

pytestmark = pytest.mark.slow  # the scripts' end-to-end runs: not in the quick tier


@pytest.fixture(scope="module")
def world(toy_world):
    """The session's toy world: 96 images, its towers, a 2-step autoencoder and a 6-step pretrained model."""
    return toy_world


def test_pretrain_qtune_sample_eval_end_to_end(world, tmp_path):
    """Quality-tuning, sampling and the pairwise evaluation, whose faithfulness judge is trained here
    because its --judge file is missing."""
    w, _ = world
    out = run("qtune.py", "--pretrained", f"{w}/pre/ckpt.pt", "--data", f"{w}/haystack", "--out", f"{tmp_path}/qt",
              "--curate-top", "24", "--holdout", "8", "--bs", "8", "--iters", "4", "--eval-every", "2",
              "--accuracy", f"{w}/judge.pt")
    assert "curated 24 of 96 images" in out and "prompt accuracy" in out
    checks = [r for r in read_metrics(f"{tmp_path}/qt/metrics.jsonl") if "heldout" in r and r["iter"] > 0]
    assert [r["iter"] for r in checks] == [2, 4]
    for r in checks:  # the check's 8 samples of the held-out captions, read by the judge's classifier
        assert set(r["prompt_accuracy"]) == {"shape", "color", "count", "position", "background", "all"}
        assert all(v is None or 0 <= v <= 1 for v in r["prompt_accuracy"].values())
    curated = json.load(open(f"{tmp_path}/qt/curated.json"))
    assert len(curated["images"]) == 24 and curated["images"][0]["score"] >= curated["images"][-1]["score"]
    assert os.path.exists(f"{tmp_path}/qt/best.pt") and torch.load(f"{tmp_path}/qt/ckpt.pt", weights_only=True)["step"] == 4

    out = run("sample.py", "--ckpt", f"{tmp_path}/qt/best.pt", "--prompt", "a red circle in the center on a white background",
              "--n", "2", "--steps", "3", "--out", f"{tmp_path}/samples", "--accuracy", f"{w}/judge.pt")
    assert f"prompt accuracy, read by {w}/judge.pt:\n| images | shape | color | count | position | background | all |" in out
    assert out.strip().splitlines()[-1].startswith(f"| {tmp_path}/qt/best.pt | ")
    images = np.stack([np.array(Image.open(f"{tmp_path}/samples/{k:04d}.png")) for k in range(2)])
    assert f"variety over seeds: two images of one prompt differ by {seed_variety(images, 2)['seeds']:.3f} RMS" in out
    png = Image.open(f"{tmp_path}/samples/0001.png")
    assert png.size == (32, 32)
    assert png.text["prompt"] == "a red circle in the center on a white background" and png.text["seed"] == "1"
    assert png.text["cfg"] == "5.0" and png.text["cfg_rescale"] == str(GUIDANCE_RESCALE) and png.text["checkpoint"].endswith("best.pt")
    assert Image.open(f"{tmp_path}/samples/grid.png").size == (64, 32)

    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("Prompt\tCategory\n" + "".join("a blue square at the top on a pink background\tA\n"
                                                      "two green circles on the left on a black background\tB\n" for _ in range(3)))
    out = run("eval_pairs.py", "--a", f"{tmp_path}/qt/best.pt", "--b", f"{w}/pre/ckpt.pt", "--prompts", str(prompts), "--steps", "2",
        "--judge", f"{tmp_path}/judge.pt", "--judge-steps", "5", "--n-boot", "50", "--out", f"{tmp_path}/eval")
    results = json.load(open(f"{tmp_path}/eval/results.json"))
    assert set(results) == {"study", "judge", "prompt_accuracy"}  # no people have voted yet
    accuracy = results["prompt_accuracy"]
    assert list(accuracy) == ["quality-tuned (A)", "pretrained (B)", "real images of the prompts"]
    for table in accuracy.values():  # 6 prompts, each stating every attribute
        assert all(table[c]["n"] == 6 and 0 <= table[c]["accuracy"] <= 100 for c in ("shape", "background", "all"))
    assert "## Prompt accuracy (toy world)" in open(f"{tmp_path}/eval/results.md").read()
    assert "training the faithfulness judge's attribute classifier" in out and os.path.exists(f"{tmp_path}/judge.pt")
    assert results["study"]["a"] == f"{tmp_path}/qt/best.pt" and results["study"]["steps"] == "2"
    assert results["study"]["cfg_rescale"] == str(GUIDANCE_RESCALE) and f"guidance 5.0, rescaled {GUIDANCE_RESCALE}" in open(f"{tmp_path}/eval/results.md").read()
    for task in ("visual appeal", "text faithfulness"):
        rates = results["judge"]["summary"]["all"][task]
        assert rates["win"] + rates["tie"] + rates["lose"] == pytest.approx(100.0) and rates["n"] == 6
    assert set(results["judge"]["summary"]) == {"all", "A", "B"}
    votes = list(csv.DictReader(open(f"{tmp_path}/eval/votes.csv")))
    assert len(votes) == 6 * (5 + 3) and {v["kind"] for v in votes} == {"judge"}
    assert "| all | visual appeal | 6 |" in open(f"{tmp_path}/eval/results.md").read()
    assert sorted(os.listdir(f"{tmp_path}/eval/images")) == sorted(f"{i:04d}-{s}.png" for i in range(6) for s in "ab")
    again = run("eval_pairs.py", "report", "--study", f"{tmp_path}/eval", "--n-boot", "50")
    assert "| all | text faithfulness | 6 |" in again


def test_pretrain_resume_is_bitwise_identical(world, tmp_path):
    w, frozen = world
    common = ["--data", f"{w}/haystack", "--bs", "8", "--save-every", "2", *frozen]
    out = run("pretrain.py", *common, "--out", f"{tmp_path}/straight", "--steps", "4", "--sample-n", "3",
              "--accuracy", f"{w}/judge.pt")
    run("pretrain.py", *common, "--out", f"{tmp_path}/split", "--steps", "2")
    run("pretrain.py", *common, "--out", f"{tmp_path}/split", "--steps", "4", "--resume", "auto")
    a = torch.load(f"{tmp_path}/straight/ckpt.pt", weights_only=True)
    b = torch.load(f"{tmp_path}/split/ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # the metrics log kept both runs, each marked, in order
    log = read_metrics(f"{tmp_path}/split/metrics.jsonl")
    assert [(r.get("event"), r["step"]) for r in log] == [("start", 0), (None, 2), ("resume", 2), (None, 4)]
    # with --accuracy, the final sample grid's prompt accuracy is logged too: its first three toy prompts
    # state all five attributes, so every entry is a share of 3 images
    assert "step 4: prompt accuracy of the sample grid shape" in out
    logged = [r for r in read_metrics(f"{tmp_path}/straight/metrics.jsonl") if "prompt_accuracy" in r]
    assert [r["step"] for r in logged] == [4]
    assert set(logged[0]["prompt_accuracy"]) == {"shape", "color", "count", "position", "background", "all"}
    assert all(min(abs(v - k / 3) for k in range(4)) < 1e-3 for v in logged[0]["prompt_accuracy"].values())


@pytest.mark.parametrize("workers", ["0", "2"])
def test_pretrain_on_tar_shards_resumes_where_the_streams_stopped(world, tmp_path, workers):
    """Shards of 20 samples (the last one 16), several epochs of them, a stop mid-epoch: the resumed
    run's weights equal an unbroken run's, bit for bit."""
    w, frozen = world
    pack_folder(f"{w}/haystack", tmp_path / "shards", samples_per_shard=20)
    common = ["--data", str(tmp_path / "shards"), "--bs", "8", "--save-every", "7", "--workers", workers,
              "--shuffle-buffer", "6", *frozen]
    run("pretrain.py", *common, "--out", f"{tmp_path}/straight", "--steps", "16")
    run("pretrain.py", *common, "--out", f"{tmp_path}/split", "--steps", "7")
    out = run("pretrain.py", *common, "--out", f"{tmp_path}/split", "--steps", "16", "--resume", "auto")
    assert "5 tar shards" in out
    a = torch.load(f"{tmp_path}/straight/ckpt.pt", weights_only=True)
    b = torch.load(f"{tmp_path}/split/ckpt.pt", weights_only=True)
    assert a["data_position"] == b["data_position"] and a["data_position"][0]["epoch"] >= 1
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def resume_from_copy(checkpoint, out):
    """A run folder `out` holding only a copy of another run's rolling checkpoint (a file, or FSDP's
    directory): what a run stopped right after writing it leaves, for `--resume auto` to continue.
    Asked for the same steps (the same learning-rate schedule, the same data order), continuing it must
    give the unbroken run's later steps."""
    os.makedirs(out)
    target = os.path.join(out, os.path.basename(checkpoint))
    (shutil.copytree if os.path.isdir(checkpoint) else shutil.copy)(checkpoint, target)


def test_pretrain_cools_the_learning_rate_down_and_resumes_inside_the_cooldown(world, tmp_path):
    """--cooldown 4 of 6 steps: the rate falls linearly to 0 at the end, and a run stopped inside the
    cooldown (at step 3) continues to the unbroken run's weights. By default an eighth of the steps cool down."""
    w, frozen = world
    common = ["--data", f"{w}/haystack", "--bs", "8", "--save-every", "3", "--sample-every", "0", "--warmup", "1",
              "--steps", "6", *frozen]
    run("pretrain.py", *common, "--out", f"{tmp_path}/straight", "--cooldown", "4")
    resume_from_copy(f"{tmp_path}/straight/ckpt-000000003.pt", f"{tmp_path}/split")  # as if stopped at step 3
    run("pretrain.py", *common, "--out", f"{tmp_path}/split", "--cooldown", "4", "--resume", "auto")
    a, b = (read_training_checkpoint(f"{tmp_path}/{r}/ckpt-000000006.pt") for r in ("straight", "split"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    halfway = read_training_checkpoint(f"{tmp_path}/straight/ckpt-000000003.pt")
    assert halfway["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 3 / 4)  # step 3 of 6, 3 steps left of 4
    assert a["opt"]["param_groups"][0]["lr"] == 0.0 and a["args"]["cooldown"] == 4
    # the default: an eighth of the steps, recorded in the checkpoint; a cooldown longer than the run is refused
    run("pretrain.py", *common, "--out", f"{tmp_path}/default", "--steps", "16", "--save-every", "16")
    default = read_training_checkpoint(f"{tmp_path}/default/ckpt-000000016.pt")
    assert default["args"]["cooldown"] == 2 and default["args"]["ema_decay"] == 0.98
    assert default["opt"]["param_groups"][0]["lr"] == 0.0
    proc = script("pretrain.py", *common, "--out", f"{tmp_path}/bad", "--cooldown", "7")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "error: --cooldown 7: must lie in 0 .. 6, the steps of the whole run")


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_train_and_resume_bitwise(world, tmp_path, engine):
    """torchrun, 2 processes over gloo on tar shards: resuming from the step-3 checkpoint and going on to
    step 6 equals 6 steps in one go (model, EMA and each rank's data position). DDP: the replicas agree at the end. FSDP: each rank
    saves its pieces into ckpt-<step>/ directories, and the whole weights are exported as ckpt.pt; it trains in aspect
    buckets (--buckets), each rank batching its own shards' samples by bucket, and the checkpoint it resumes from
    holds samples still waiting in a bucket."""
    w, frozen = world
    if engine == "fsdp":
        pack_folder(mixed_folder(w, tmp_path / "mixed"), tmp_path / "shards", samples_per_shard=5)
        data = ["--buckets", "--bs", "4", "--fsdp"]
    else:
        pack_folder(f"{w}/haystack", tmp_path / "shards", samples_per_shard=12)
        data = ["--bs", "8"]
    common = ["--data", str(tmp_path / "shards"), *data, "--save-every", "3", "--shuffle-buffer", "4",
              "--sample-every", "0", *frozen]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "pretrain.py"]
    out = run(*launch, *common, "--out", f"{tmp_path}/straight", "--steps", "6")
    assert "2 rank(s)" in out and ("the replicas' weights agree" in out) == (engine == "ddp")
    suffix = ".pt" if engine == "ddp" else ""
    if engine == "fsdp":
        assert "4 tar shards in aspect buckets" in out
        halfway = read_training_checkpoint(f"{tmp_path}/straight/ckpt-000000003")["data_position"]
        assert any(where["waiting"] for rank in halfway for where in rank["consumed"].values())
    resume_from_copy(f"{tmp_path}/straight/ckpt-000000003{suffix}", f"{tmp_path}/split")  # as if stopped at step 3
    run(*launch, *common, "--out", f"{tmp_path}/split", "--steps", "6", "--resume", "auto")
    newest = "ckpt-000000006" + suffix
    assert os.path.isdir(f"{tmp_path}/split/{newest}") == (engine == "fsdp")
    a, b = (read_training_checkpoint(f"{tmp_path}/{run_}/{newest}") for run_ in ("straight", "split"))
    assert len(a["data_position"]) == 2 and a["data_position"] == b["data_position"] and a["step"] == 6
    exported = torch.load(f"{tmp_path}/split/ckpt.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        assert all(torch.equal(exported[key][k], b[key][k]) for k in a[key]), key


def test_resume_auto_passes_over_a_corrupt_newest_checkpoint_and_keeps_the_last_n(world, tmp_path):
    w, frozen = world
    common = ["--data", f"{w}/haystack", "--bs", "8", "--save-every", "2", "--keep", "2", *frozen, "--out", f"{tmp_path}/pre"]
    run("pretrain.py", *common, "--steps", "6")
    assert sorted(os.listdir(f"{tmp_path}/pre")) == ["ckpt-000000004.pt", "ckpt-000000006.pt", "ckpt.pt", "loss.png",
                                                     "metrics.jsonl", "samples"]
    newest = f"{tmp_path}/pre/ckpt-000000006.pt"
    assert os.path.samefile(newest, f"{tmp_path}/pre/ckpt.pt")
    data = open(newest, "rb").read()
    with open(newest, "wb") as f:  # a crash that damaged the newest file after it was renamed
        f.write(data[:len(data) // 2])
    out = run("pretrain.py", *common, "--steps", "8", "--resume", "auto")
    assert f"warning: {newest}: not an intact checkpoint" in out and "at step 4" in out
    assert torch.load(f"{tmp_path}/pre/ckpt.pt", weights_only=True)["step"] == 8


def test_pretrain_skips_and_counts_broken_images_and_resumes_with_the_count(world, tmp_path):
    w, frozen = world
    data = tmp_path / "haystack"
    shutil.copytree(f"{w}/haystack", data)
    png = (data / "000005.png").read_bytes()
    (data / "000005.png").write_bytes(png[:len(png) // 2])  # truncated
    (data / "000009.png").write_bytes(b"")  # empty
    common = ["--data", str(data), "--bs", "8", "--save-every", "2", *frozen, "--out", f"{tmp_path}/pre"]
    out = run("pretrain.py", *common, "--steps", "2")
    assert f"skipping {data / '000005.png'}: truncated or corrupt" in out
    assert "skipped 2 unusable samples (" in out and "truncated or corrupt: 1" in out and "empty file: 1" in out
    assert "94 images, encoded once" in out
    # resumed, and now streaming batch by batch: the count comes back from the checkpoint
    out = run("pretrain.py", *common, "--steps", "4", "--resume", "auto", "--cache-mb", "0")
    assert "resumed from" in out and "encoded batch by batch" in out and "skipped 2 unusable samples" in out
    assert torch.load(f"{tmp_path}/pre/ckpt.pt", weights_only=True)["skipped"] == {
        str(data / "000005.png"): "truncated or corrupt", str(data / "000009.png"): "empty file"}


def test_pretrain_stops_after_too_many_non_finite_steps_with_a_valid_checkpoint(world, tmp_path):
    """An absurd learning rate blows the weights up after one step; every step after it has a
    non-finite loss, is skipped and counted, and the run stops in one line, its checkpoint loadable."""
    w, frozen = world
    proc = script("pretrain.py", "--data", f"{w}/haystack", "--bs", "8", "--steps", "30",
                           "--lr", "1e30", "--warmup", "1", "--max-bad-steps", "3", "--out", f"{tmp_path}/pre",
                  *frozen)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 4 steps in a row had a non-finite loss or gradient")
    ckpt = torch.load(f"{tmp_path}/pre/ckpt.pt", weights_only=True)
    assert ckpt["bad_steps"]["in_a_row"] == 4 and ckpt["step"] == ckpt["bad_steps"]["total"] + 1


def test_scripts_report_bad_input_in_one_line(world, tmp_path):
    w, frozen = world
    for argv, message in [
        (["pretrain.py", "--data", f"{tmp_path}/none", *frozen], "data folder not found"),
        (["pretrain.py", "--data", f"{w}/haystack", "--ae", f"{tmp_path}/no-ae", "--clip", f"{w}/towers/clip", "--t5", f"{w}/towers/t5"], "no-ae"),
        (["sample.py", "--ckpt", f"{tmp_path}/missing.pt"], "missing.pt: checkpoint not found"),
        (["sample.py", "--ckpt", f"{w}/pre/ckpt.pt", "--accuracy", f"{tmp_path}/none.pt"], "none.pt"),
        (["sample.py", "--ckpt", f"{w}/pre/ckpt.pt", "--mode", "variations", "--image", f"{w}/haystack/000001.png",
          "--accuracy", f"{w}/judge.pt"], "--accuracy measures text to image"),
        (["qtune.py", "--pretrained", f"{w}/ae/model.safetensors"], "model.safetensors"),
        (["eval_pairs.py", "report", "--study", f"{tmp_path}"], "study.sqlite: no rating study here"),
        (["eval_pairs.py", "serve", "--study", f"{tmp_path}/none"], "no rating study here"),
        (["pretrain.py", "--arch", "pixel", "--data", f"{w}/haystack", *frozen], "--arch pixel works on pixels and has no autoencoder"),
        (["pretrain.py", "--arch", "muse", "--preset", "emu", "--data", f"{w}/haystack"], "--arch muse has presets muse, toy"),
        (["pretrain.py", "--arch", "muse", "--schedule", "cosine", "--data", f"{w}/haystack"], "not --arch muse"),
        (["pretrain.py", "--arch", "muse", "--data", f"{w}/haystack", *frozen], "--arch muse needs a VQ tokenizer as --ae"),
        (["qtune.py", "--arch", "muse", "--pretrained", f"{w}/pre/ckpt.pt"], f"--arch muse: {w}/pre/ckpt.pt holds a model of --arch ldm"),
        (["sample.py", "--arch", "pixel", "--ckpt", f"{w}/pre/ckpt.pt"], f"--arch pixel: {w}/pre/ckpt.pt holds a model of --arch ldm"),
        (["train_ae.py", "--arch", "muse", "--latent-channels", "4", "--data", f"{w}/haystack"], "the VQ tokenizer has none"),
        (["train_prior.py", "--data", f"{tmp_path}/none", "--out", f"{tmp_path}/prior"], "data folder not found"),
    ]:
        proc = script(*argv)
        assert proc.returncode != 0
        err = proc.stderr.strip()
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("script", ["train_ae.py", "pretrain.py", "qtune.py", "sample.py", "eval_pairs.py", "train_prior.py", "data/make_toy.py",
                                    "data/embed_captions.py", "data/curate.py", "bench/load_tower.py", "bench/load_sd_unet.py",
                                    "bench/train_mfu.py"])
def test_every_script_explains_its_flags(script):
    out = run(script, "--help")
    assert "usage:" in out and "--" in out


def test_progressive_resolution_resumes_inside_a_stage_and_at_its_end(world, tmp_path):
    """Two stages (16 px at batch 4, then 32 px at batch 8): a run resumed in the middle of the first
    stage, or exactly where the second begins, ends bitwise where the unbroken run ends."""
    w, frozen = world
    common = ["pretrain.py", "--data", f"{w}/haystack", "--stages", "16:3:4,32:3:8", "--save-every", "1", "--keep", "9",
              "--warmup", "2", *frozen]
    out = run(*common, "--out", f"{tmp_path}/straight")
    assert "stage 1/2: 16 px, batch 4, steps 0-3, noise offset 0.0" in out
    assert "stage 2/2: 32 px, batch 8, steps 3-6, noise offset 0.02" in out
    sizes = {r["step"]: r["image_size"] for r in read_metrics(f"{tmp_path}/straight/metrics.jsonl") if "loss" in r}
    assert sizes[3] == 16 and sizes[6] == 32
    final = torch.load(f"{tmp_path}/straight/ckpt.pt", weights_only=True)
    assert final["args"]["image_size"] == 32 and final["args"]["steps"] == 6 and final["stage"] == 1
    for resume_at in (2, 3):
        os.makedirs(f"{tmp_path}/from{resume_at}")
        shutil.copy(f"{tmp_path}/straight/ckpt-{resume_at:09d}.pt", f"{tmp_path}/from{resume_at}/ckpt-{resume_at:09d}.pt")
        out = run(*common, "--out", f"{tmp_path}/from{resume_at}", "--resume", "auto")
        assert f"at step {resume_at}" in out and ("stage 1/2" in out) == (resume_at < 3)
        resumed = torch.load(f"{tmp_path}/from{resume_at}/ckpt.pt", weights_only=True)
        for part in ("model", "ema"):
            assert all(torch.equal(final[part][k], resumed[part][k]) for k in final[part]), (resume_at, part)


def test_qtune_on_curated_shards_holds_out_and_resumes_bitwise(world, tmp_path):
    """--curate-top 0: the shards are the curated set. The first --holdout samples are held out (never
    trained on); the run writes a loss curve and sample grids; 2 + resume + 2 iterations equal 4."""
    w, _ = world
    curated = copy_examples(w / "haystack", sorted(p.stem for p in (w / "haystack").glob("*.png"))[:30], tmp_path / "curated")
    shards = pack_folder(curated, tmp_path / "shards", samples_per_shard=10)
    common = ["qtune.py", "--pretrained", f"{w}/pre/ckpt.pt", "--data", str(tmp_path / "shards"), "--curate-top", "0",
              "--holdout", "4", "--bs", "4", "--eval-every", "2", "--shuffle-buffer", "5", "--iters", "4"]
    out = run(*common, "--out", f"{tmp_path}/straight")
    assert "training data: 3 tar shards" in out and "appeal" in out
    assert os.path.exists(f"{tmp_path}/straight/loss.png") and Image.open(f"{tmp_path}/straight/samples/iter-000004.png").size == (4 * 32, 32)
    run(*common[:-1], "2", "--out", f"{tmp_path}/split")
    out = run(*common, "--out", f"{tmp_path}/split", "--resume", "auto")
    assert "resumed from" in out
    a, b = (torch.load(f"{tmp_path}/{run_}/ckpt.pt", weights_only=True) for run_ in ("straight", "split"))
    assert a["data_position"] == b["data_position"] and a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(a["opt"]["state"][i][m], b["opt"]["state"][i][m]) for i in a["opt"]["state"] for m in ("exp_avg", "exp_avg_sq"))
    # the held-out samples are the first 4 of the first shard, and no stream ever reads them
    from emu.datasets.shards import ShardDataset, first_samples
    _, _, names = first_samples(shards, 4, 32)
    assert names == [f"{shards[0]}:{key}" for key in sorted(p.stem for p in curated.glob("*.png"))[:4]]
    assert len(list(ShardDataset(shards, 32, exclude=names))) == 30 - 4


def test_qtune_checks_on_a_separate_folder_and_repeats_a_set_smaller_than_the_batch(world, tmp_path):
    """--heldout-data: every image of --data is trained on and the other folder checks early stopping;
    3 training images fill batches of 8 with repeats instead of shrinking the batch."""
    w, _ = world
    keys = sorted(p.stem for p in (w / "haystack").glob("*.png"))
    for folder, some in (("train", keys[:3]), ("check", keys[3:5])):
        copy_examples(w / "haystack", some, tmp_path / folder)
    out = run("qtune.py", "--pretrained", f"{w}/pre/ckpt.pt", "--data", str(tmp_path / "train"), "--curate-top", "0",
              "--heldout-data", str(tmp_path / "check"), "--bs", "8", "--iters", "2", "--eval-every", "1", "--out", f"{tmp_path}/qt")
    assert "training data: 3 images" in out and "3 training images for batch size 8: each batch repeats them" in out
    assert Image.open(f"{tmp_path}/qt/samples/iter-000002.png").size == (2 * 32, 32)  # the check set's 2 captions
    checks = [r for r in read_metrics(f"{tmp_path}/qt/metrics.jsonl") if "heldout" in r]
    assert [r["iter"] for r in checks] == [0, 1, 2] and checks[0]["heldout"] == checks[0]["best"]
    proc = script("qtune.py", "--curate-top", "0", "--heldout-data", f"{tmp_path}/nope")
    assert proc.returncode != 0 and proc.stderr.strip() == f"error: --heldout-data {tmp_path}/nope: folder not found"


@pytest.mark.parametrize("arch", ["pixel", "muse"])
def test_other_architectures_pretrain_resume_on_two_ranks_qtune_sample_and_evaluate(world, tmp_path, arch):
    """--arch pixel (the Imagen-like cascade) and --arch muse (the Muse-like masked transformer on a VQ
    tokenizer from train_ae.py --arch muse) go through the same scripts as the latent model: 2 + resume
    + 2 pretraining steps equal 4, two ranks under torchrun (DDP, FSDP), then quality-tuning, sampling
    and the pairwise evaluation."""
    w, frozen = world
    first_stage = []
    if arch == "muse":
        out = run("train_ae.py", "--arch", "muse", "--data", f"{w}/haystack", "--out", f"{tmp_path}/vq", "--steps", "4",
                  "--bs", "8", "--holdout", "8")
        assert "VQ tokenizer: " in out and "tokens (8, 8) from 256 codes" in out and "codebook usage" in out
        assert json.load(open(f"{tmp_path}/vq/config.json"))["kind"] == "vq"
        first_stage = ["--ae", f"{tmp_path}/vq"]
    common = ["pretrain.py", "--arch", arch, "--data", f"{w}/haystack", "--bs", "8", "--save-every", "2", "--sample-every", "4",
              "--sample-n", "2", *first_stage, *frozen[2:]]  # the text towers, not the autoencoder
    out = run(*common, "--steps", "4", "--out", f"{tmp_path}/straight")
    assert f"{arch} model: " in out
    assert Image.open(f"{tmp_path}/straight/samples/step-000000004.png").size == (2 * 32, 32)
    run(*common, "--steps", "2", "--out", f"{tmp_path}/split")
    assert "resumed from" in run(*common, "--steps", "4", "--out", f"{tmp_path}/split", "--resume", "auto")
    a, b = (torch.load(f"{tmp_path}/{run_}/ckpt.pt", weights_only=True) for run_ in ("straight", "split"))
    assert a["arch"] == b["arch"] == arch and a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # two ranks: DDP over the cascade (one forward covers both U-Nets); FSDP over the transformer's blocks
    engine = ["--fsdp"] if arch == "muse" else []
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common, "--steps", "2",
              "--sample-every", "0", *engine, "--out", f"{tmp_path}/ranks")
    assert "2 rank(s)" in out and ("the replicas' weights agree" in out) == (not engine)
    exported = torch.load(f"{tmp_path}/ranks/ckpt.pt", weights_only=True)
    assert exported["arch"] == arch and exported["model"].keys() == a["model"].keys()

    out = run("qtune.py", "--pretrained", f"{tmp_path}/straight/ckpt.pt", "--arch", arch, "--data", f"{w}/haystack",
              "--out", f"{tmp_path}/qt", "--curate-top", "16", "--holdout", "4", "--bs", "8", "--iters", "2", "--eval-every", "2")
    assert "held-out loss before quality-tuning" in out and torch.load(f"{tmp_path}/qt/ckpt.pt", weights_only=True)["arch"] == arch
    run("sample.py", "--ckpt", f"{tmp_path}/qt/best.pt", "--arch", arch, "--prompt", "a red circle in the center on a white background",
        "--n", "2", "--steps", "3", "--out", f"{tmp_path}/samples")
    assert Image.open(f"{tmp_path}/samples/0001.png").size == (32, 32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square at the top on a pink background\ntwo green circles on the left on a black background\n")
    run("eval_pairs.py", "--a", f"{tmp_path}/qt/best.pt", "--b", f"{tmp_path}/straight/ckpt.pt", "--arch", arch, "--prompts",
        str(prompts), "--steps", "2", "--judge", f"{w}/judge.pt", "--judge-steps", "5", "--n-boot", "50", "--out", f"{tmp_path}/eval")
    rates = json.load(open(f"{tmp_path}/eval/results.json"))["judge"]["summary"]["all"]["visual appeal"]
    assert rates["n"] == 2 and rates["win"] + rates["tie"] + rates["lose"] == pytest.approx(100.0)
    if arch == "pixel":  # the cascade's upsampler enlarges curated images below the target size
        small = tmp_path / "small"
        small.mkdir()
        for key in ("000001", "000002"):
            Image.open(w / "haystack" / f"{key}.png").resize((16, 16)).save(small / f"{key}.png")
            shutil.copy(w / "haystack" / f"{key}.txt", small)
        run("data/curate.py", "--data", str(small), "--clip", f"{w}/towers/clip", "--out", f"{tmp_path}/curate",
            "--target-size", "32", "--upsampler", f"{tmp_path}/straight/ckpt.pt")
        assert Image.open(f"{tmp_path}/curate/curated/000001.png").size == (32, 32)
        record = json.load(open(f"{tmp_path}/curate/curated/000002.json"))
        assert record["upsampled"] == f"pixel diffusion upsampler {tmp_path}/straight/ckpt.pt from 16x16 to 32x32"
        # a human stage's export (here simulated raters) upsamples the same way: the settings are in the store
        run("data/curate.py", "simulate", "--stage", "generalists", "--out", f"{tmp_path}/curate")
        kept = glob.glob(f"{tmp_path}/curate/curated/*.json")
        assert kept and all(json.load(open(path))["upsampled"] == record["upsampled"] for path in kept)


def test_train_prior_fits_the_linear_prior_and_resumes_the_diffusion_prior_bitwise(world, tmp_path):
    """train_prior.py on the toy world: the linear prior in closed form; the diffusion prior, 2 steps +
    resume + 2 steps equal to 4, the embeddings computed once and reused."""
    from emu.variants.prior import DiffusionPrior, LinearPrior, build_prior
    w, _ = world
    common = ["train_prior.py", "--data", f"{w}/haystack", "--clip", f"{w}/towers/clip", "--holdout", "16"]
    out = run(*common, "--kind", "linear", "--out", f"{tmp_path}/linear")
    assert "96 pairs: 80 to train on, 16 held out" in out and "centred cosine" in out
    saved = torch.load(f"{tmp_path}/linear/prior.pt", weights_only=True)
    assert isinstance(build_prior(saved["config"]), LinearPrior)
    assert "| centred cosine |" in open(f"{tmp_path}/linear/results.md").read()
    flags = [*common, "--bs", "8", "--eval-every", "2", "--save-every", "2", "--sample-steps", "2"]
    run(*flags, "--steps", "4", "--out", f"{tmp_path}/straight")
    run(*flags, "--steps", "2", "--out", f"{tmp_path}/split")
    out = run(*flags, "--steps", "4", "--out", f"{tmp_path}/split", "--resume", "auto")
    assert "resumed from" in out and "embedding again" not in out
    a, b = (torch.load(f"{tmp_path}/{name}/prior.pt", weights_only=True) for name in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert isinstance(build_prior(a["config"]), DiffusionPrior)


def test_kandinsky_movq_prior_decoder_inpainting_and_every_sample_mode(world, tmp_path):
    """Kandinsky's decoder through the scripts: MoVQ (train_ae.py --arch kandinsky), the linear prior,
    the decoder pretrained 2 + resume + 2 steps equal to 4, quality-tuned, and sampled in every mode;
    the inpainting decoder keeps what is not in the hole and outpainting widens the canvas."""
    w, frozen = world
    clip = ["--clip", f"{w}/towers/clip"]
    out = run("train_ae.py", "--arch", "kandinsky", "--data", f"{w}/haystack", "--out", f"{tmp_path}/movq", "--steps", "4",
              "--bs", "8", "--holdout", "8")
    config = json.load(open(f"{tmp_path}/movq/config.json"))
    assert config["kind"] == "vq" and config["spatial_norm"] and config["latent_scale"] > 0 and "latent_scale" in out
    run("train_prior.py", "--kind", "linear", "--data", f"{w}/haystack", *clip, "--holdout", "16", "--out", f"{tmp_path}/prior")
    common = ["pretrain.py", "--arch", "kandinsky", "--data", f"{w}/haystack", "--bs", "8", "--save-every", "2", "--sample-n", "2",
              "--ae", f"{tmp_path}/movq", "--prior", f"{tmp_path}/prior/prior.pt", *frozen[2:]]
    out = run(*common, "--steps", "4", "--sample-every", "4", "--out", f"{tmp_path}/straight")
    assert "kandinsky model: " in out and Image.open(f"{tmp_path}/straight/samples/step-000000004.png").size == (64, 32)
    run(*common, "--steps", "2", "--out", f"{tmp_path}/split")
    assert "resumed from" in run(*common, "--steps", "4", "--out", f"{tmp_path}/split", "--resume", "auto")
    a, b = (torch.load(f"{tmp_path}/{run_}/ckpt.pt", weights_only=True) for run_ in ("straight", "split"))
    assert a["arch"] == "kandinsky" and a["model_config"]["image_embed_dim"] == 64 and a["step"] == b["step"] == 4
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    run("qtune.py", "--pretrained", f"{tmp_path}/straight/ckpt.pt", "--data", f"{w}/haystack", "--out", f"{tmp_path}/qt",
        "--curate-top", "16", "--holdout", "4", "--bs", "8", "--iters", "2", "--eval-every", "2")
    run(*common, "--preset", "toy-inpaint", "--steps", "2", "--sample-every", "0", "--whole-masks", "0.25",
        "--out", f"{tmp_path}/inpaint")
    # the share of whole-image masks is recorded, and the objective rebuilt from the checkpoint draws it
    assert TextToImage.from_checkpoint(f"{tmp_path}/inpaint/ckpt.pt").objective.whole == 0.25
    proc = script(*common, "--preset", "toy-inpaint", "--steps", "2", "--whole-masks", "1.5", "--out", f"{tmp_path}/bad")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "error: --whole-masks 1.5: a share, must lie in 0 .. 1"
    # Kandinsky 2.1's multilingual decoder reads XLM-R in place of CLIP's and T5's tokens; the checkpoints record it
    run(*common, "--steps", "2", "--sample-every", "0", "--xlmr", f"{w}/towers/xlmr", "--out", f"{tmp_path}/multi")
    run("qtune.py", "--pretrained", f"{tmp_path}/multi/ckpt.pt", "--data", f"{w}/haystack", "--out", f"{tmp_path}/multi-qt",
        "--curate-top", "16", "--holdout", "4", "--bs", "8", "--iters", "2", "--eval-every", "2")
    for path in ("multi/ckpt.pt", "multi-qt/best.pt"):
        m = torch.load(f"{tmp_path}/{path}", weights_only=True)
        assert m["args"]["xlmr"] == f"{w}/towers/xlmr" and m["model_config"]["xlmr_dim"] == 64, path
        assert "xlmr_proj.weight" in m["ema"] and "clip_proj.weight" not in m["ema"] and "t5_proj.weight" not in m["ema"]
    # from a text cache that holds XLM-R's embeddings: the same training
    run("data/embed_captions.py", "--data", f"{w}/haystack", "--out", f"{tmp_path}/cache", "--xlmr", f"{w}/towers/xlmr",
        "--device", "cpu", *frozen[2:])
    run(*common, "--steps", "2", "--sample-every", "0", "--xlmr", f"{w}/towers/xlmr", "--out", f"{tmp_path}/multi-cache",
        "--text-cache", f"{tmp_path}/cache")
    a, b = (torch.load(f"{tmp_path}/{name}/ckpt.pt", weights_only=True) for name in ("multi", "multi-cache"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    multi = TextToImage.from_checkpoint(f"{tmp_path}/multi-qt/best.pt")
    assert multi.text_encoder.xlmr is not None
    run("sample.py", "--ckpt", f"{tmp_path}/multi-qt/best.pt", "--n", "1", "--steps", "3", "--out", f"{tmp_path}/multi-samples",
        "--prompt", "a red circle in the center on a white background", "--prompt", "красный круг в центре на белом фоне")
    assert Image.open(f"{tmp_path}/multi-samples/0001.png").size == (32, 32)
    proc = script("pretrain.py", "--data", f"{w}/haystack", "--xlmr", f"{w}/towers/xlmr", "--steps", "1", "--out", f"{tmp_path}/no")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "error: --xlmr is for Kandinsky's decoder (--arch kandinsky), not --arch ldm")

    decoder, inpaint, image = f"{tmp_path}/qt/best.pt", f"{tmp_path}/inpaint/ckpt.pt", f"{w}/haystack/000003.png"
    sample = lambda ckpt, name, *flags: run("sample.py", "--ckpt", ckpt, "--n", "2", "--steps", "3", "--out",
                                            f"{tmp_path}/{name}", *flags)
    sample(decoder, "text", "--prompt", "a red circle in the center on a white background")
    sample(decoder, "variations", "--mode", "variations", "--image", image)
    sample(decoder, "fusion", "--mode", "fusion", "--image", image, "--image", f"{w}/haystack/000004.png", "--mix", "0.7,0.3")
    sample(decoder, "fusion-text", "--mode", "fusion", "--image", image, "--prompt", "a blue square")
    for name in ("text", "variations", "fusion", "fusion-text"):
        assert Image.open(f"{tmp_path}/{name}/0001.png").size == (32, 32), name
    assert Image.open(f"{tmp_path}/fusion/0000.png").text["mode"] == "fusion"
    original = np.asarray(Image.open(image).convert("RGB")).astype(int)
    sample(inpaint, "inpaint", "--mode", "inpaint", "--image", image, "--box", "0.25,0.25,0.75,0.75", "--prompt", "a red circle")
    filled = np.asarray(Image.open(f"{tmp_path}/inpaint/0000.png")).astype(int)
    hole = np.zeros((32, 32), bool)
    hole[8:24, 8:24] = True
    assert np.abs(filled - original)[~hole].max() <= 1 and np.abs(filled - original)[hole].mean() > 5
    sample(inpaint, "outpaint", "--mode", "outpaint", "--image", image, "--extend", "0,0,16,16")
    wide = np.asarray(Image.open(f"{tmp_path}/outpaint/0001.png")).astype(int)
    assert wide.shape == (32, 64, 3) and np.abs(wide[:, 16:48] - original).max() <= 1

    proc = script("sample.py", "--ckpt", decoder, "--mode", "inpaint", "--image", image, "--box", "0.2,0.2,0.5,0.5")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "error: inpainting and outpainting need an inpainting decoder (pretrain.py --arch kandinsky --preset toy-inpaint)")
    proc = script("sample.py", "--ckpt", f"{w}/pre/ckpt.pt", "--mode", "variations", "--image", image)
    assert proc.returncode != 0 and "needs Kandinsky's decoder" in proc.stderr


def test_sample_draws_other_aspect_ratios_and_refuses_sizes_the_model_cannot_draw(world, tmp_path):
    """--aspect and --size: the latent model draws non-square images (its U-Net is convolutional), each
    PNG recording its size, and --accuracy reads them; a side its U-Net cannot halve, both flags at once,
    a side too small for the classifier, and the architectures that draw squares only are one-line errors."""
    w, _ = world
    ckpt = f"{w}/pre/ckpt.pt"
    run("sample.py", "--ckpt", ckpt, "--prompt", "a red circle on the left", "--aspect", "9:16", "--n", "1", "--steps", "2",
        "--out", f"{tmp_path}/tall")
    tall = Image.open(f"{tmp_path}/tall/0000.png")
    assert tall.size == (24, 40) and tall.text["aspect"] == "9:16"  # 32-pixel training images, sides in steps of 8
    run("sample.py", "--ckpt", ckpt, "--prompt", "a red circle on the left", "--size", "64x16", "--n", "2", "--steps", "2",
        "--out", f"{tmp_path}/wide")
    assert Image.open(f"{tmp_path}/wide/0001.png").size == (64, 16)
    assert Image.open(f"{tmp_path}/wide/grid.png").size == (128, 16)
    out = run("sample.py", "--ckpt", ckpt, "--prompt", "a red circle on the left", "--aspect", "16:9", "--n", "2", "--steps", "2",
              "--accuracy", f"{w}/judge.pt", "--out", f"{tmp_path}/measured")  # read relative to the 40 x 24 frame
    assert "prompt accuracy, read by" in out and "| shape | color | count | position | background | all |" in out
    for argv, message in [(["--size", "60x16"], "--size 60x16: each side must be a positive multiple of 8 pixels"),
                          (["--size", "wide"], "--size wide: give WIDTHxHEIGHT"),
                          (["--size", "64x16", "--aspect", "16:9"], "give --size or --aspect, not both"),
                          (["--size", "8x8", "--accuracy", f"{w}/judge.pt"],
                           "--size 8x8: the attribute classifier reads sides of at least 16")]:
        proc = script("sample.py", "--ckpt", ckpt, "--steps", "2", "--out", f"{tmp_path}/bad", *argv)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    for name, why in (("pixel", "cascade_generate"), ("muse", "muse_generate")):
        with pytest.raises(EmuError, match=f"40x24: this architecture draws square images only: .*{why}"):
            get_arch(name).generate(None, None, None, None, None, [0], (24, 40), 5.0, 2, "ddim", 0.0)


def test_latent_models_sample_with_guidance_rescale_unless_told_otherwise(world):
    w, _ = world
    model = TextToImage.from_checkpoint(f"{w}/pre/ckpt.pt")
    assert model.cfg_rescale == GUIDANCE_RESCALE == 0.7
    prompts, seeds = ["two red circles on the left on a teal background"] * 2, [0, 1]
    draw = lambda **kw: model.generate(prompts, seeds, 5.0, 3, **kw)
    default, plain = draw(), draw(cfg_rescale=0.0)
    assert torch.equal(default, draw(cfg_rescale=GUIDANCE_RESCALE))
    assert not torch.equal(default, plain)  # (slightly: the 6-step model barely reads its caption)
    with pytest.raises(EmuError, match=r"guidance rescale 1.5: must be in \[0, 1\] \(0 is plain guidance\)"):
        draw(cfg_rescale=1.5)
    for name, why in (("pixel", "dynamically"), ("muse", "logits")):
        assert get_arch(name).cfg_rescale == 0.0
        with pytest.raises(EmuError, match=f"guidance rescale 0.7: this architecture has none: .*{why}"):
            get_arch(name).generate(None, None, None, None, None, [0], 24, 5.0, 2, "ddim", 0.0, cfg_rescale=0.7)


def mixed_folder(w, folder):
    """The toy world's first 20 images resized to five aspect ratios in turn (16:9, 9:16, 1:1, 3:2, 2:3),
    with their captions, in `folder`."""
    folder.mkdir()
    sizes = [(64, 36), (36, 64), (32, 32), (48, 32), (32, 48)]
    for i in range(20):
        image = Image.open(f"{w}/haystack/{i:06d}.png").resize(sizes[i % 5], Image.BICUBIC)
        image.save(folder / f"{i:03d}.png")
        shutil.copy(f"{w}/haystack/{i:06d}.txt", folder / f"{i:03d}.txt")
    return folder


def test_pretrain_on_aspect_buckets_resumes_bitwise_and_qtune_takes_them_too(world, tmp_path):
    """--buckets: a folder of images at five aspect ratios trains in batches of one bucket each (the
    toy sizes: 24x40, 32x32, 40x24); 2 steps + resume + 2 equal 4 in one go, and qtune.py tunes on the same folder."""
    w, frozen = world
    folder = mixed_folder(w, tmp_path / "mixed")
    common = ["pretrain.py", "--data", str(folder), "--buckets", "--bs", "4", "--save-every", "2", "--sample-every", "0", *frozen]
    out = run(*common, "--steps", "4", "--out", f"{tmp_path}/straight")
    # at 32 pixels 9:16 and 2:3 are both 24x40, 3:2 and 16:9 both 40x24: an image goes to the first of equals
    assert "20 images in aspect buckets (9:16 24x40: 8, 1:1 32x32: 4, 3:2 40x24: 8), encoded once, up front" in out
    run(*common, "--steps", "2", "--out", f"{tmp_path}/split")
    run(*common, "--steps", "4", "--out", f"{tmp_path}/split", "--resume", "auto")
    a, b = (torch.load(f"{tmp_path}/{name}/ckpt.pt", weights_only=True) for name in ("straight", "split"))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    out = run("qtune.py", "--pretrained", f"{tmp_path}/straight/ckpt.pt", "--data", str(folder), "--curate-top", "0",
              "--caption-field", "", "--buckets", "--holdout", "4", "--bs", "4", "--iters", "2", "--eval-every", "2",
              "--out", f"{tmp_path}/qt")
    assert "in aspect buckets" in out and torch.load(f"{tmp_path}/qt/ckpt.pt", weights_only=True)["step"] == 2
    out = run(*common, "--steps", "2", "--cache-mb", "0", "--out", f"{tmp_path}/streamed")  # the same batches, encoded as they come
    assert "encoded batch by batch" in out
    streamed = torch.load(f"{tmp_path}/streamed/ckpt.pt", weights_only=True)["model"]
    cached = torch.load(f"{tmp_path}/split/ckpt-000000002.pt", weights_only=True)["model"]
    assert all(torch.allclose(streamed[k], cached[k], atol=1e-5) for k in cached)
    proc = script("pretrain.py", "--arch", "pixel", "--data", str(folder), "--buckets", "--steps", "1", "--bs", "4",
                  "--sample-every", "0", *frozen[2:], "--out", f"{tmp_path}/pixel")
    assert proc.returncode != 0 and proc.stderr.strip() == \
        "error: --buckets is for the latent models (--arch ldm, kandinsky); --arch pixel trains on squares"


def test_pretrain_on_bucketed_tar_shards_resumes_bitwise_and_qtune_takes_them_too(world, tmp_path):
    """--buckets on tar shards of images at five aspect ratios: the stream batches its samples by bucket. The
    checkpoint after 2 steps holds samples still waiting in a bucket; resuming from it to step 4 equals 4 steps
    in one go, bit for bit, with the same data positions; and qtune.py tunes on the same shards. (Two ranks
    under FSDP on such shards: test_two_ranks_train_and_resume_bitwise.)"""
    w, frozen = world
    shards = tmp_path / "shards"
    pack_folder(mixed_folder(w, tmp_path / "mixed"), shards, samples_per_shard=5)
    common = ["pretrain.py", "--data", str(shards), "--buckets", "--bs", "4", "--shuffle-buffer", "4",
              "--save-every", "2", "--sample-every", "0", *frozen]
    out = run(*common, "--steps", "4", "--out", f"{tmp_path}/straight")
    assert "1 rank(s)" in out and ("4 tar shards in aspect buckets (9:16 24x40, 2:3 24x40, 1:1 32x32, 3:2 40x24, "
                                   "16:9 40x24), read and encoded batch by batch") in out
    halfway = read_training_checkpoint(f"{tmp_path}/straight/ckpt-000000002.pt")["data_position"]
    assert len(halfway) == 1 and any(where["waiting"] for where in halfway[0]["consumed"].values())
    resume_from_copy(f"{tmp_path}/straight/ckpt-000000002.pt", f"{tmp_path}/split")  # as if stopped at step 2
    run(*common, "--steps", "4", "--out", f"{tmp_path}/split", "--resume", "auto")
    a, b = (read_training_checkpoint(f"{tmp_path}/{name}/ckpt-000000004.pt") for name in ("straight", "split"))
    assert a["step"] == b["step"] == 4 and a["data_position"] == b["data_position"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    out = run("qtune.py", "--pretrained", f"{tmp_path}/straight/ckpt.pt", "--data", str(shards), "--curate-top", "0",
              "--caption-field", "", "--buckets", "--holdout", "4", "--bs", "4", "--iters", "2", "--eval-every", "2",
              "--out", f"{tmp_path}/qt")
    assert "training data: 4 tar shards in aspect buckets" in out
    assert torch.load(f"{tmp_path}/qt/ckpt.pt", weights_only=True)["step"] == 2


def test_sample_outpaints_a_window_slid_off_the_image_and_refuses_windows_it_cannot_draw(world, kandinsky_world, tmp_path):
    """--window left,top,width,height: the image grows to cover the window, which is drawn where the image
    is not; a window inside the image, off it, or of a size the model cannot draw is a one-line error."""
    w, _ = world
    ckpt, image = f"{kandinsky_world}/inpaint/ckpt.pt", f"{w}/haystack/000003.png"
    run("sample.py", "--ckpt", ckpt, "--mode", "outpaint", "--image", image, "--window=-8,16,24,40", "--n", "1", "--steps", "2",
        "--out", f"{tmp_path}/grown")
    grown = Image.open(f"{tmp_path}/grown/0000.png")
    assert grown.size == (40, 56) and grown.text["window"] == "-8,16,24,40"
    pixels, original = np.asarray(grown), np.asarray(Image.open(image).convert("RGB"))
    assert np.array_equal(pixels[:32, 8:], original) and (pixels[:16, :8] == 128).all()  # off the window: grey
    for window, problem in [("0,0,16,16", "lies inside the picture; outpainting draws past its edges"),
                            ("32,0,16,16", "must overlap the picture, or nothing guides what it draws"),
                            ("-4,0,12,16", "must have sides that are positive multiples of 8 (it is 12x16)")]:
        proc = script("sample.py", "--ckpt", ckpt, "--mode", "outpaint", "--image", image, f"--window={window}")
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == f"error: --window {window}: the window {problem}"
    proc = script("sample.py", "--ckpt", ckpt, "--mode", "outpaint", "--image", image, "--window=-8,0,16,16", "--extend", "0,0,8,0")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "error: --mode outpaint needs either --extend or --window"


def test_make_toy_writes_another_haystack_of_the_same_world_without_touching_the_towers(world, tmp_path):
    """--towers none: a haystack only, here with a share at other ratios and half its captions in Russian; its square
    images are the world's own, and a square one's Russian caption says what the world's English one says."""
    w, _ = world
    out = run("data/make_toy.py", "--n", "96", "--aspect-share", "0.5", "--russian-share", "0.5", "--towers", "none",
              "--ratings", "0", "--out", tmp_path / "ratios")
    assert "wrote 96 images" in out and "towers" not in out
    assert sorted(os.listdir(tmp_path)) == ["ratios"]
    sizes = {Image.open(p).size for p in (tmp_path / "ratios").glob("*.png")}
    assert (32, 32) in sizes and len(sizes) > 2
    square = [p.name for p in (tmp_path / "ratios").glob("*.png") if Image.open(p).size == (32, 32)]
    assert square and all((tmp_path / "ratios" / n).read_bytes() == open(f"{w}/haystack/{n}", "rb").read() for n in square)
    russian = [p for p in (tmp_path / "ratios").glob("*.json") if json.loads(p.read_text()).get("language") == "ru"]
    assert 30 <= len(russian) <= 66
    for p in russian:
        text = p.with_suffix(".txt").read_text()
        assert any("а" <= ch <= "я" for ch in text), text
        if p.stem + ".png" in square:  # the same draws as the world's English caption (a larger image draws more noise)
            english = open(f"{w}/haystack/{p.stem}.txt").read()
            assert toyworld.parse_caption(text) == toyworld.parse_caption(english), (text, english)
