"""The funnel's human stages: recall and precision rules, answers, simulated raters, the page."""
import json
import os
import signal
import subprocess
import sys
from contextlib import closing

import numpy as np
import pytest
from PIL import Image

from browser import Browser, find_chromium
from emu import EmuError
from emu.datasets import toyworld
from emu.curation.funnel import FunnelConfig, export_curated, open_store, register_images, run_automatic, why
from emu.curation.people import (CHECKLIST, add_raters, assign, decide, final_keys, human_captions, prepare,
                                 record_answer, simulate, verdict)
from emu.evaluation.judges import appeal_score
from emu.evaluation.study import VoteError
from launch import free_port, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_PASS = {item: True for item, _, _ in CHECKLIST}


def test_generalists_keep_an_image_any_of_them_keeps():
    assert verdict("generalists", [("a", {"keep": False}), ("b", {"keep": True}), ("c", {"keep": False})]) == (1, "kept by b")
    assert verdict("generalists", [("a", {"keep": False}), ("b", {"keep": False})]) == (0, "no generalist kept it (a, b)")


def test_specialists_keep_an_image_only_if_most_pass_every_guideline():
    one_fails = {**ALL_PASS, "lighting": False}
    assert verdict("specialists", [("s", ALL_PASS)]) == (1, "passes every guideline (s)")
    assert verdict("specialists", [("s", one_fails)]) == (0, "fails lighting (s)")
    # three specialists: an item passes on two ticks of three; one specialist's doubt is outvoted
    assert verdict("specialists", [("a", ALL_PASS), ("b", ALL_PASS), ("c", one_fails)])[0] == 1
    assert verdict("specialists", [("a", ALL_PASS), ("b", one_fails), ("c", {**one_fails, "colour": False})]) == (
        0, "fails lighting (a, b, c)")
    assert verdict("specialists", [("a", ALL_PASS), ("b", one_fails)]) == (0, "fails lighting (a, b)")  # a split fails


@pytest.fixture
def funnel(tmp_path):
    """A 300-image toy haystack (15 needles) through an automatic stage that keeps all but the unpopular."""
    toyworld.write_folder(tmp_path / "haystack", toyworld.make_haystack(300, seed=3, size=32))
    conn = open_store(tmp_path / "out")
    register_images(conn, str(tmp_path / "haystack"))
    run_automatic(conn, FunnelConfig(min_likes=1), clip_dir=None)
    prepare(conn)
    yield conn, tmp_path
    conn.close()


def test_assignments_answers_and_the_first_answer_standing(funnel):
    conn, _ = funnel
    raters = list(add_raters(conn, ["ann", "bob", "cy", "di"], "human"))
    n = assign(conn, "generalists", raters, per_image=3, seed=0)
    tasks = conn.execute("SELECT id, key, rater FROM tasks").fetchall()
    assert n == 300 and len(tasks) == 900
    per_key = {}
    for _, key, rater in tasks:
        per_key.setdefault(key, []).append(rater)
    assert all(len(set(r)) == 3 for r in per_key.values())
    loads = [sum(1 for *_, r in tasks if r == name) for name in raters]
    assert max(loads) - min(loads) <= 1
    assert assign(conn, "generalists", raters, per_image=3) == 0  # nothing new to assign
    with pytest.raises(EmuError, match="5 raters per image, but only 4"):
        assign(conn, "specialists", raters, per_image=5)
    task_id, key, rater = tasks[0]
    with pytest.raises(VoteError, match="keep: true or false"):
        record_answer(conn, rater, task_id, {"keep": "maybe"})
    with pytest.raises(VoteError, match="not one of"):
        record_answer(conn, "nobody", task_id, {"keep": True})
    assert record_answer(conn, rater, task_id, {"keep": True})
    assert not record_answer(conn, rater, task_id, {"keep": False})  # a resubmitted form
    assert decide(conn, "generalists") == (0, 0, 300)  # every image still waits for some answer
    for task_id, key, rater in tasks[1:]:
        record_answer(conn, rater, task_id, {"keep": key == tasks[0][1]})
    assert decide(conn, "generalists")[:2] == (300, 1)
    assert final_keys(conn) == [tasks[0][1]]


def test_simulated_people_finish_the_funnel_with_provenance_and_captions(funnel):
    """Generalists, specialists and caption writers simulated on the toy world: the curated images'
    appeal is far above the haystack's, most of them are true needles, and each has its path."""
    conn, tmp_path = funnel
    for stage, per_image in (("generalists", 3), ("specialists", 1), ("captions", 1)):
        simulate(conn, stage, n_raters=3, per_image=per_image, seed=0)
        decide(conn, stage)
    keys = final_keys(conn)
    files = dict(conn.execute("SELECT key, file FROM images"))
    meta = {k: json.load(open(f.rsplit(".", 1)[0] + ".json")) for k, f in files.items()}

    def appeal(ks):
        return float(appeal_score(np.stack([np.asarray(Image.open(files[k]).convert("RGB")) for k in ks])).mean())
    assert 5 <= len(keys) <= 30
    assert appeal(keys) > appeal(list(files)) + 0.2
    assert np.mean([meta[k]["needle"] for k in keys]) >= 0.8
    captions = human_captions(conn)
    assert all(captions[k] == meta[k]["true_caption"] for k in keys)
    path, verdict_line = why(conn, keys[0])
    assert [s for s, _, _ in path][-3:] == ["generalists", "specialists", "captions"]
    assert "kept by sim-generalists-" in path[-3][2] and path[-1][2].startswith("caption by sim-captions-")
    dropped = next(k for k in files if k not in keys and why(conn, k)[0][-1][0] == "specialists")
    assert why(conn, dropped)[1].startswith("dropped at specialists: fails ")
    export_curated(conn, keys, str(tmp_path / "curated"), captions, target_size=64)
    record = json.load(open(tmp_path / "curated" / f"{keys[0]}.json"))
    assert record["upsampled"] == "bicubic from 32x32 to 64x64" and record["caption_by"] == "person"
    assert Image.open(tmp_path / "curated" / f"{keys[0]}.png").size == (64, 64)
    assert (tmp_path / "curated" / f"{keys[0]}.txt").read_text().strip() == meta[keys[0]]["true_caption"]


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_people_keep_check_and_caption_images_on_the_page(funnel):
    """One person does all three stages in a real browser: keys for the generalists' page, ticks for
    the checklist, typing for the caption; the script then exports what they decided."""
    conn, tmp_path = funnel
    out = str(tmp_path / "out")
    with conn:  # a small funnel: keep only three images past the automatic stage
        conn.execute("UPDATE decisions SET kept = 0 WHERE stage = 'popularity' AND key NOT IN ('000001', '000002', '000003')")
    port = free_port()

    def serve(stage, *flags):
        # Ctrl-C as in a terminal: SIGINT at its default disposition, whatever this process inherited (a shell
        # that starts a job in the background makes it ignore SIGINT, and Python then keeps ignoring it)
        proc = subprocess.Popen([sys.executable, "data/curate.py", "serve", "--out", out, "--stage", stage, "--port", str(port),
                                 "--per-image", "1", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        line = proc.stdout.readline()
        while "/rate?t=" not in line:
            assert proc.poll() is None and line, f"the server did not start: {line}{proc.stdout.read()}"
            line = proc.stdout.readline()
        return proc, line.split("\t")[1].strip()

    def stop(proc):
        """Ctrl-C; a server still running 30 s later prints its threads' stacks (faulthandler) into the failure."""
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"the server was still running 30 s after SIGINT:\n{proc.communicate(timeout=30)[0][-6000:]}")

    with Browser() as b:
        proc, link = serve("generalists", "--raters", "eve")
        b.goto(link)
        for key in ("1", "2", "1"):  # keep, drop, keep
            assert b.evaluate("document.getElementById('question').textContent").startswith("Could this image")
            b.wait_for("document.images[0].complete && document.images[0].naturalWidth === 32")
            b.wait_for_navigation(lambda: b.press(key))
        assert b.evaluate("!!document.getElementById('done')")
        stop(proc)
        with closing(open_store(out)) as c:
            assert decide(c, "generalists")[:2] == (3, 2)

        proc, link = serve("specialists")
        b.goto(link)
        for ticks in (["composition", "lighting", "colour", "subject", "subjective"], ["composition"]):
            for item in ticks:
                b.click(f"input[name={item}]")
            b.wait_for_navigation(lambda: b.click("button[name=done]"))
        stop(proc)
        with closing(open_store(out)) as c:
            assert decide(c, "specialists")[:2] == (2, 1)

        proc, link = serve("captions")
        b.goto(link)
        assert b.evaluate("document.querySelector('textarea').value")  # the web caption, to edit
        b.evaluate("document.querySelector('textarea').value = ''")
        b.click("textarea")
        b.send("Input.insertText", {"text": "a <b>bold</b> red circle & friends"})
        b.wait_for_navigation(lambda: b.click("button[name=done]"))
        assert b.evaluate("!!document.getElementById('done')")
        stop(proc)

    run("data/curate.py", "--data", str(tmp_path / "haystack"), "--out", out, "--clip", "unused", "--min-likes", "1")
    curated = sorted(f for f in os.listdir(tmp_path / "out" / "curated") if f.endswith(".txt"))
    assert len(curated) == 1
    assert (tmp_path / "out" / "curated" / curated[0]).read_text() == "a <b>bold</b> red circle & friends\n"
