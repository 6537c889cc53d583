"""The editor (`sample.py serve`) in a real headless Chromium: a person types a prompt, picks 16:9 and
generates; zooms; erases with the brush and inpaints; slides the window off the picture and outpaints;
undoes; uploads two images for variations and fusion; saves a PNG whose recorded command redraws it bit
for bit; and, with jobs queued, the server is killed and restarted without losing anything finished.

Needs Debian's chromium package (.ci/run installs it); skipped with a message when it is absent."""
import io
import os
import signal
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from browser import Browser, find_chromium
from test_editor import Editor, redraw

if find_chromium() is None and os.environ.get("EMU_REQUIRE_BROWSER") == "1":
    raise RuntimeError("EMU_REQUIRE_BROWSER=1 but no chromium on PATH")
pytestmark = [pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"),
              pytest.mark.slow]


def current(b):
    return b.evaluate("state.current && state.current.id")


def act_and_wait_for_new_picture(b, action, timeout=90):
    """Do something that queues a job, and wait until its picture is on the board; its id."""
    before = current(b)
    action()
    b.wait_for(f"state.current && state.current.id !== {'null' if before is None else before} && "
               f"document.getElementById('picture').complete && "
               f"document.getElementById('jobs').children.length === 0", timeout)
    assert "failed" not in b.evaluate("document.getElementById('status').textContent")
    return current(b)


def pixels(folder, image_id):
    return np.asarray(Image.open(folder / f"{image_id:04d}.png").convert("RGB")).astype(int)


def test_a_person_uses_every_mode_of_the_editor_and_a_restart_loses_nothing(kandinsky_world, toy_world, tmp_path):
    folder = tmp_path / "editor"
    editor = Editor(f"{kandinsky_world}/inpaint/ckpt.pt", folder)
    try:
        with Browser() as b:
            b.goto(editor.url + "/")
            b.wait_for("document.body.dataset.ready")
            # text to image: type the prompt, pick 16:9, generate
            b.click("#prompt")
            for key in "a red circle":
                b.press(key)
            b.click("#aspect-16x9")
            b.evaluate("document.getElementById('steps').value = 3")
            text = act_and_wait_for_new_picture(b, lambda: b.click("#generate"))
            assert b.evaluate("[picture.naturalWidth, picture.naturalHeight]") == [40, 24]
            assert Image.open(folder / f"{text:04d}.png").text["prompt"] == "a red circle"
            width = b.evaluate("picture.getBoundingClientRect().width")
            b.click("#zoom-in")
            zoom = b.evaluate("state.zoom")
            assert b.evaluate("picture.getBoundingClientRect().width") == pytest.approx(40 * zoom) and 40 * zoom > width

            # erase a stroke with the brush and inpaint it: nothing outside the mask changes
            b.click("#brush")
            x, y = b.center("#mask")
            b.drag([(x - 10 * zoom, y - 4 * zoom), (x, y), (x + 8 * zoom, y + 2 * zoom)])
            inpainted = act_and_wait_for_new_picture(b, lambda: b.click("#inpaint"))
            hole = pixels(folder, inpainted - 1)[..., 0] > 127  # the painted mask, uploaded just before the job
            assert 0.05 < hole.mean() < 0.9
            before, after = pixels(folder, text), pixels(folder, inpainted)
            assert np.array_equal(after[~hole], before[~hole])
            assert Image.open(folder / f"{inpainted:04d}.png").text["mode"] == "inpaint"

            # extend: slide the window further off the right edge, and outpaint it
            b.click("#extend")
            assert b.evaluate("JSON.stringify(state.window)") == "[24,0]"  # half off the right edge
            x, y = b.center("#window")
            b.drag([(x, y), (x + 4 * zoom, y), (x + 8 * zoom, y)])
            assert b.evaluate("JSON.stringify(state.window)") == "[32,0]"
            outpainted = act_and_wait_for_new_picture(b, lambda: b.click("#outpaint"))
            wide = pixels(folder, outpainted)
            assert wide.shape == (24, 72, 3) and np.array_equal(wide[:, :40], after)

            # undo goes back to the inpainted picture
            b.click("#undo")
            assert current(b) == inpainted and b.evaluate("picture.naturalWidth") == 40

            # upload two images: variations of the first, then fusion of both with the prompt
            haystack = f"{toy_world[0]}/haystack"
            b.set_files("#upload", [f"{haystack}/000003.png", f"{haystack}/000004.png"])
            b.wait_for("document.querySelectorAll('#uploads li').length === 2")
            b.click("#uploads li:first-child .open")
            upload = current(b)
            varied = act_and_wait_for_new_picture(b, lambda: b.click("#variations"))
            assert Image.open(folder / f"{varied:04d}.png").text["mode"] == "variations"
            assert f"--image {folder / f'{upload:04d}.png'}" in Image.open(folder / f"{varied:04d}.png").text["command"]
            fused = act_and_wait_for_new_picture(b, lambda: b.click("#fuse"))
            meta = Image.open(folder / f"{fused:04d}.png").text
            assert meta["mode"] == "fusion" and meta["prompt"] == "a red circle" and meta["mix"] == "1.0,1.0,1.0"

            # save: the PNG the link gives carries the command that draws it again, bit for bit
            href = b.evaluate("document.getElementById('save').href")
            assert b.evaluate("document.getElementById('save').download") == f"emu-{fused:04d}.png"
            with urllib.request.urlopen(href) as res:
                assert res.headers["Content-Disposition"] == f'attachment; filename="emu-{fused:04d}.png"'
                saved = Image.open(io.BytesIO(res.read()))
            assert np.array_equal(np.asarray(saved), redraw(saved.text["command"], tmp_path / "redraw"))

            # three jobs queued; the server is killed once the first is done, and restarted
            b.evaluate("document.getElementById('steps').value = 100")
            for _ in range(3):
                b.click("#generate")
            b.wait_for("document.getElementById('jobs').children.length === 3")
            # each queued job says how many are ahead once its first poll has answered
            b.wait_for("document.getElementById('jobs').textContent.includes('ahead of it')")
            first = fused + 1  # the queued jobs take the next numbers
            b.wait_for(f"state.current.id === {first} && document.getElementById('jobs').children.length === 2", 120)
            finished = (folder / f"{first:04d}.png").read_bytes()
            assert not (folder / f"{first + 2:04d}.png").exists()  # still queued when the server dies
            editor.stop(signal.SIGKILL)
            time.sleep(0.5)
            editor.start()  # the page keeps asking, and sees the other two finish
            # the queue empties a moment before the page has shown the last drawing: wait for both
            b.wait_for(f"document.getElementById('jobs').children.length === 0 && state.current.id === {first + 2}", 180)
            assert (folder / f"{first:04d}.png").read_bytes() == finished
            assert current(b) == first + 2 and all((folder / f"{first + k:04d}.png").exists() for k in (1, 2))
            b.goto(editor.url + "/")  # a new tab finds every drawing in the history
            b.wait_for("document.body.dataset.ready")
            shown = b.evaluate("Array.from(document.querySelectorAll('#history img')).map(i => Number(i.dataset.id))")
            assert shown == sorted([text, inpainted, outpainted, varied, fused, first, first + 1, first + 2], reverse=True)
            # the thumbnails must have loaded first: until then the row's layout still moves under the mouse
            b.wait_for("Array.from(document.querySelectorAll('#history img')).every(i => i.complete && i.naturalWidth > 0)")
            b.click(f"#history img[data-id='{outpainted}']")
            b.wait_for(f"state.current.id === {outpainted} && picture.complete")
            b.screenshot(str(tmp_path / "editor.png"))
            assert b.evaluate("document.getElementById('command').textContent").startswith("python sample.py --ckpt ")
    finally:
        editor.stop()
