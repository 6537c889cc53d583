"""The rating page in a real headless Chromium: a rater votes with clicks and keys, the server is
killed and restarted half-way, and the report counts every vote exactly once.

Needs Debian's chromium package (.ci/run installs it); skipped with a message when it is absent."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing

import pytest
from PIL import Image

from browser import Browser, find_chromium
from emu.evaluation.study import open_study
from launch import free_port
from test_rating import SCRIPT_PROMPT, make_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if find_chromium() is None and os.environ.get("EMU_REQUIRE_BROWSER") == "1":
    raise RuntimeError("EMU_REQUIRE_BROWSER=1 but no chromium on PATH")
pytestmark = [pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"),
              pytest.mark.slow]


def start_server(folder, port, *flags):
    """`eval_pairs.py serve` in its own process; returns once it accepts connections."""
    proc = subprocess.Popen([sys.executable, "eval_pairs.py", "serve", "--study", folder, "--port", str(port), *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start within 60 s")


def test_a_rater_votes_with_clicks_and_keys_across_a_server_crash(tmp_path):
    prompts = [SCRIPT_PROMPT, "two green squares on the left", "a blue diamond at the top"]
    folder = make_study(tmp_path / "study", prompts)
    for i in range(3):  # larger images, as a real study has
        for side, colour in (("a", (190, 60, 50)), ("b", (50, 90, 180))):
            Image.new("RGB", (256, 256), colour).save(tmp_path / "study" / "images" / f"{i:04d}-{side}.png")
    port = free_port()
    server = start_server(folder, port, "--raters", "5")
    link = open(os.path.join(folder, "links.txt")).readline().split("\t")[2].strip()
    assert link.startswith(f"http://127.0.0.1:{port}/rate?t=")

    # each step: how the rater answers; the first two before the crash, the rest after
    actions = [("click", "left"), ("key", "3"), ("key", "ArrowRight"), ("key", "4"), ("click", "both")]
    voted = []  # (assignment id, choice) as the page showed them
    try:
        with Browser() as b:
            b.goto(link)
            total = int(b.evaluate("document.getElementById('progress').textContent").split(" of ")[1])
            assert total in (4, 5)  # 3 appeal pairs and 1 or 2 of the 9 faithfulness ratings over 5 raters
            for step, (how, what) in enumerate(actions[:total]):
                if step == 2:  # the server dies without warning and comes back; the rater reloads the page
                    server.send_signal(signal.SIGKILL)
                    server.wait()
                    server = start_server(folder, port)
                    b.goto(link)
                assert b.evaluate("document.getElementById('progress').textContent") == f"{step + 1} of {total}"
                b.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth === 256)")
                task = "faithfulness" if b.evaluate("!!document.getElementById('caption')") else "appeal"
                assert task == ("appeal" if step < 3 else "faithfulness")
                text = b.evaluate("document.body.innerText")
                if task == "appeal":
                    assert "diamond" not in text and "squares" not in text and "circle" not in text
                else:
                    caption = b.evaluate("document.getElementById('caption').textContent")
                    assert caption in prompts
                    if caption == SCRIPT_PROMPT:  # shown as text, not run
                        assert b.evaluate("window.pwned === undefined && !document.querySelector('#caption b')")
                    b.screenshot(str(tmp_path / "page.png"))
                item = int(b.evaluate("document.querySelector('input[name=item]').value"))
                choice = what if how == "click" else {"3": "tie", "ArrowRight": "right", "4": "neither"}[what]
                if how == "click":
                    b.wait_for_navigation(lambda: b.click(f"button[value={what}]"))
                else:
                    b.wait_for_navigation(lambda: b.press(what))
                voted.append((item, choice))
            assert b.evaluate("document.getElementById('done').textContent") == f"All {total} done. Thank you, rater-1!"
            b.goto(link)  # coming back after the end shows the done page again, and votes nothing
            assert b.evaluate("!!document.getElementById('done')")
            # the first vote sent again from the page (a stale tab, a replayed form): answered, not counted
            first, _ = voted[0]
            replay = ("const f = document.createElement('form'); f.method = 'post'; f.action = '/vote';"
                      f"for (const [k, v] of [['t', '{link.split('t=')[1]}'], ['item', '{first}'], ['choice', 'right']])"
                      "{ const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }"
                      "document.body.appendChild(f); f.submit();")
            b.wait_for_navigation(lambda: b.evaluate(replay))
            assert b.evaluate("!!document.getElementById('done')")
    finally:
        server.kill()
        server.wait()

    with Image.open(tmp_path / "page.png") as shot:
        lo, hi = zip(*shot.convert("RGB").getextrema())
        assert shot.size[0] >= 800 and max(hi) - min(lo) > 100  # a real rendering, not a blank page

    proc = subprocess.run([sys.executable, "eval_pairs.py", "report", "--study", folder, "--partial", "--n-boot", "50"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with closing(open_study(folder)) as conn:
        where = {item: (pair, task) for item, pair, task in conn.execute("SELECT id, pair, task FROM assignments")}
    rows = list(csv.DictReader(open(os.path.join(folder, "votes.csv"))))
    assert sorted((int(r["pair"]), r["task"], r["choice"]) for r in rows) == sorted((*where[i], c) for i, c in voted)
    assert all(r["rater"] == "rater-1" and r["kind"] == "human" for r in rows)
    assert json.load(open(os.path.join(folder, "results.json")))["human"]["votes"] == len(voted) == total
