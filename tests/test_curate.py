"""The curation funnel's automatic stages: each filter on constructed images, counts, provenance, resume."""
import json
import os
from contextlib import closing

import numpy as np
import pytest
import torch
from PIL import Image

import emu.curation.funnel as curate
import emu.curation.heads as heads
from emu import EmuError
from emu.curation.funnel import FunnelConfig, export_curated, open_store, register_images, run_automatic, summary, why
from emu.text.encoder import make_toy_towers
from launch import script
from test_filters import photo_like, with_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red ball on a green lawn", "a quiet lake at dawn", "nsfw picture of a beach", "a blank grey card",
            "a poster covered in words", "a very wide banner", "a tiny thumbnail", "a sunset over the hills"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    clip_dir, _, _ = make_toy_towers(CAPTIONS * 3, tmp_path_factory.mktemp("towers"), seed=0)
    return str(clip_dir)


def write(folder, key, image, caption, likes=None):
    Image.fromarray(image).save(folder / f"{key}.png")
    (folder / f"{key}.txt").write_text(caption + "\n")
    if likes is not None:
        (folder / f"{key}.json").write_text(json.dumps({"likes": likes}))


@pytest.fixture
def haystack(tmp_path):
    """Eight kinds of image, each built to be caught by one filter, plus six near-duplicates."""
    d = tmp_path / "haystack"
    d.mkdir()
    write(d, "good-1", photo_like(64, seed=1), "a red ball on a green lawn", likes=120)
    write(d, "good-2", photo_like(64, seed=2), "a quiet lake at dawn", likes=80)
    write(d, "offensive", photo_like(64, seed=3), "nsfw picture of a beach", likes=500)
    write(d, "blank", np.full((64, 64, 3), 128, np.uint8), "a blank grey card", likes=90)
    write(d, "text", with_text(np.full((128, 128, 3), 235, np.uint8), 40)[0], "a poster covered in words", likes=90)
    write(d, "wide", np.array(Image.fromarray(photo_like(64, seed=4)).resize((240, 40))), "a very wide banner", likes=90)
    write(d, "tiny", photo_like(16, seed=5), "a tiny thumbnail", likes=90)
    write(d, "unpopular", photo_like(64, seed=6), "a sunset over the hills", likes=3)
    write(d, "no-likes", photo_like(64, seed=7), "a sunset over the hills")
    for i in range(6):  # one scene six times: the balancing stage keeps two
        write(d, f"dup-{i}", photo_like(64, seed=8), "a sunset over the hills", likes=60 + i)
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "broken.txt").write_text("a broken file\n")
    return d


def config(tmp_path, towers, **overrides):
    """Every automatic stage on, with a head trained to rate the blank card low and everything else high."""
    with closing(open_store(tmp_path / "out")) as conn:
        register_images(conn, str(tmp_path / "haystack"))
        keys = [k for (k,) in conn.execute("SELECT key FROM images WHERE unusable IS NULL")]
        emb = curate.Measurer(conn, towers).embed(keys)
    ratings = [1.0 if k == "blank" else 8.0 for k in keys]
    head = heads.train_aesthetic_head(torch.from_numpy(np.stack([emb[k] for k in keys])), ratings, steps=300)
    heads.save_head(head, str(tmp_path / "aesthetic.safetensors"))
    cfg = dict(blocklist=("nsfw", "gore"), aesthetic_head=str(tmp_path / "aesthetic.safetensors"), aesthetic_min=4.5,
               text_max_words=4, clip_min=-1.0, min_size=32, max_aspect=3.0, clusters=4, per_cluster=2, min_likes=10)
    return FunnelConfig(**{**cfg, **overrides})


def decisions(conn):
    return {(k, s): (bool(kept), w) for k, s, kept, w in conn.execute("SELECT key, stage, kept, why FROM decisions")}


def test_each_filter_drops_the_image_built_for_it(haystack, tmp_path, towers):
    cfg = config(tmp_path, towers)
    with closing(open_store(tmp_path / "out")) as conn:
        kept, _ = run_automatic(conn, cfg, towers)
        d = decisions(conn)
        assert d[("broken", "usable")][0] is False and "image" in d[("broken", "usable")][1]
        assert d[("offensive", "offensive")] == (False, "caption has blocklisted word 'nsfw'")
        assert d[("blank", "aesthetic")][0] is False and d[("blank", "aesthetic")][1].startswith("aesthetic score ")
        assert d[("text", "text")][0] is False and "text words" in d[("text", "text")][1]
        assert d[("wide", "size")] == (False, "240x40: aspect ratio 6.00 > 3.0")
        assert d[("tiny", "size")] == (False, "16x16: shorter side 16 < 32")
        assert d[("unpopular", "popularity")] == (False, "3 likes < 10")
        assert d[("no-likes", "popularity")] == (True, "no likes in its metadata")
        dups = [k for k in kept if k.startswith("dup-")]
        assert len(dups) == 2  # the six copies form one cluster, capped at two
        assert {"good-1", "good-2", "no-likes"} <= set(kept)
        assert not {"offensive", "blank", "text", "wide", "tiny", "unpopular", "broken"} & set(kept)
        for key in ("good-1", "dup-0"):  # every stage reached has its decision on record
            stages = [s for s, _, _ in why(conn, key)[0]]
            assert stages == ["usable", "offensive", "aesthetic", "text", "clip", "size", "balance", "popularity"][:len(stages)]


def test_counts_add_up_and_every_dropped_image_has_its_reason(haystack, tmp_path, towers):
    with closing(open_store(tmp_path / "out")) as conn:
        kept, _ = run_automatic(conn, config(tmp_path, towers), towers)
        rows = summary(conn)
        assert rows[0] == ("usable", 16, 15)
        for (_, _, out), (_, n_in, _) in zip(rows, rows[1:]):
            assert n_in == out  # a stage sees exactly what the one before kept
        assert rows[-1][2] == len(kept)
        dropped = sum(n_in - out for _, n_in, out in rows)
        assert dropped + len(kept) == 16
        for (key,) in conn.execute("SELECT key FROM images"):
            path, verdict = why(conn, key)
            assert verdict.startswith("dropped at ") == (key not in kept)
            if key not in kept:
                stage, _, reason = next(p for p in path if not p[1])
                assert verdict == f"dropped at {stage}: {reason}"
        export_curated(conn, kept, str(tmp_path / "curated"))
        with pytest.raises(EmuError, match="nope: not in the curation store"):
            why(conn, "nope")
    files = sorted(os.listdir(tmp_path / "curated"))
    assert files == sorted(f"{k}.{ext}" for k in kept for ext in ("png", "txt", "json"))
    record = json.load(open(tmp_path / "curated" / "good-1.json"))
    assert [s["stage"] for s in record["funnel"]][-1] == "popularity" and all(s["kept"] for s in record["funnel"])


def test_an_interrupted_funnel_resumes_without_measuring_anything_twice(haystack, tmp_path, towers, monkeypatch):
    cfg = config(tmp_path, towers)
    seen = []
    real = curate.text_word_count

    def counting(images):
        seen.append(images.shape)
        if len(seen) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the text stage
        return real(images)
    monkeypatch.setattr(curate, "CHUNK", 2)
    monkeypatch.setattr(curate, "text_word_count", counting)
    with closing(open_store(tmp_path / "out")) as conn:
        with pytest.raises(KeyboardInterrupt):
            run_automatic(conn, cfg, towers)
    measured_before = len(seen) - 1  # the third never finished
    with closing(open_store(tmp_path / "out")) as conn:
        kept, embedded = run_automatic(conn, cfg, towers)
        n_text = conn.execute("SELECT COUNT(*) FROM scores WHERE name = 'text_words'").fetchone()[0]
    assert embedded == 0  # every embedding was made before the interruption (and by config())
    assert len(seen) - 3 == n_text - measured_before  # the rest of the text stage, and only the rest
    with closing(open_store(tmp_path / "out")) as conn:  # a new threshold: decided again from the stored scores
        count = len(seen)
        kept_strict, embedded = run_automatic(conn, FunnelConfig(**{**cfg.__dict__, "per_cluster": 1}), towers)
    assert embedded == 0 and len(seen) == count
    assert len([k for k in kept_strict if k.startswith("dup-")]) == 1 and set(kept_strict) < set(kept)


@pytest.mark.slow
def test_the_script_curates_explains_and_refuses_bad_input_in_one_line(haystack, tmp_path, towers):
    cfg = config(tmp_path, towers)
    out = str(tmp_path / "out")
    argv = ["data/curate.py", "--data", str(haystack), "--clip", towers, "--out", out,
           "--blocklist", os.path.join(ROOT, "data", "blocklist.txt"), "--aesthetic-head", cfg.aesthetic_head,
           "--aesthetic-min", "4.5", "--text-max-words", "4", "--min-size", "32", "--max-aspect", "3",
           "--clusters", "4", "--per-cluster", "2", "--min-likes", "10"]
    proc = script(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "| usable | 16 | 15 | 1 |" in proc.stdout and "| popularity |" in proc.stdout
    assert open(os.path.join(out, "summary.md")).read() in proc.stdout
    proc = script("data/curate.py", "why", "--out", out, "wide", "good-1")
    assert "wide: dropped at size: 240x40: aspect ratio 6.00 > 3.0" in proc.stdout
    assert "good-1: kept by every stage it reached" in proc.stdout
    for argv, message in [(["--blocklist", str(tmp_path / "none.txt")], "none.txt: blocklist not found"),
                          (["--aesthetic-min", "1"], "needs --aesthetic-head"),
                          (["--aesthetic-head", str(haystack / "good-1.txt"), "--aesthetic-min", "1"], "not a head"),
                          (["--clusters", "3"], "--clusters and --per-cluster go together")]:
        proc = script("data/curate.py", "--data", str(haystack), "--clip", towers, "--out", str(tmp_path / "other"), *argv)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_an_unsafe_content_head_from_local_weights_drops_what_it_flags(haystack, tmp_path, towers):
    """The offensive stage's optional image classifier: a head on CLIP image embeddings read from a
    safetensors file. Fitted here to flag one picture, it drops that one and keeps the rest."""
    with closing(open_store(tmp_path / "out")) as conn:
        register_images(conn, str(haystack))
        keys = [k for (k,) in conn.execute("SELECT key FROM images WHERE unusable IS NULL")]
        emb = curate.Measurer(conn, towers).embed(keys)
        logits = [6.0 if k == "good-2" else -6.0 for k in keys]  # the unsafe logit the head should give
        head = heads.train_aesthetic_head(torch.from_numpy(np.stack([emb[k] for k in keys])), logits)
        heads.save_head(head, str(tmp_path / "unsafe.safetensors"))
        kept, _ = run_automatic(conn, FunnelConfig(unsafe_head=str(tmp_path / "unsafe.safetensors"), unsafe_max=0.5), towers)
        d = decisions(conn)
    assert d[("good-2", "offensive")][0] is False and d[("good-2", "offensive")][1] == "unsafe probability 1.00 > 0.5"
    assert d[("good-1", "offensive")] == (True, f"caption clean, unsafe probability {d[('good-1', 'offensive')][1][-4:]}")
    assert set(kept) == set(keys) - {"good-2"}


def test_a_changed_image_or_another_clip_is_measured_again(haystack, tmp_path, towers, tmp_path_factory):
    cfg = config(tmp_path, towers)
    with closing(open_store(tmp_path / "out")) as conn:
        run_automatic(conn, cfg, towers)
        write(haystack, "good-1", photo_like(64, seed=99), "a red ball on a green lawn", likes=120)  # replaced
        register_images(conn, str(haystack))
        _, embedded = run_automatic(conn, cfg, towers)
        assert embedded == 1
        other, _, _ = make_toy_towers(CAPTIONS * 3, tmp_path_factory.mktemp("other-towers"), seed=1)
        _, embedded = run_automatic(conn, cfg, str(other))
        assert embedded == 14  # every usable image past the blocklist, with the new tower
        names = {n for (n,) in conn.execute("SELECT DISTINCT name FROM scores")}
        assert any(n.startswith("aesthetic ") for n in names) and "clip" in names
