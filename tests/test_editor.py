"""The demo's editor (`sample.py serve`, emu/demo/) over HTTP: every mode draws what the sample.py command
it records draws, bit for bit; the queue keeps its order, cancels, and survives a killed server; and
the server refuses what it must (hosts, origins, uploads, file names, bad requests), in one line."""
import http.client
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from launch import free_port, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


class Editor:
    """`python sample.py serve` in its own process (one torch thread, as the redrawing runs), and a client."""

    def __init__(self, ckpt, out, *flags):
        self.argv = [sys.executable, "sample.py", "serve", "--ckpt", str(ckpt), "--out", str(out), "--steps", "3", *flags]
        self.port, self.proc, self.log = free_port(), None, tempfile.TemporaryFile("w+")
        self.start()

    def start(self):
        self.proc = subprocess.Popen([*self.argv, "--port", str(self.port)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the editor exited: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("the editor did not start within 60 s")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def output(self):
        """What the server has printed so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body bytes); a POST comes from the editor's own page unless `headers` says otherwise."""
        headers = {"Host": f"127.0.0.1:{self.port}", **({"Origin": self.url} if method == "POST" else {}), **(headers or {})}
        headers = {k: v for k, v in headers.items() if v is not None}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None and "Content-Length" not in headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        res = conn.getresponse()
        data = res.read()
        conn.close()
        return res.status, dict(res.getheaders()), data

    def post(self, path, obj):
        status, _, data = self.request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
        assert status == 200, (path, obj, status, data)
        return json.loads(data)

    def upload(self, data, kind="image", content_type="image/png"):
        status, _, answer = self.request("POST", f"/api/upload?kind={kind}", data, {"Content-Type": content_type})
        assert status == 200, (status, answer)
        return json.loads(answer)

    def job(self, image_id):
        status, _, data = self.request("GET", f"/api/job?id={image_id}")
        assert status == 200, data
        return json.loads(data)

    def wait(self, image_id, timeout=120):
        deadline = time.monotonic() + timeout
        while (job := self.job(image_id))["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"job {image_id} still {job['state']} after {timeout} s"
            time.sleep(0.05)
        return job

    def image(self, image_id):
        status, _, data = self.request("GET", f"/api/image?id={image_id}")
        assert status == 200
        return Image.open(io.BytesIO(data))


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def redraw(command, tmp_path):
    """Run a recorded `python sample.py ...` command with its output redirected; the image it draws."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "sample.py"] and argv[-2] == "--out"
    run(*argv[1:-1], str(tmp_path / "redraw"))
    return np.asarray(Image.open(tmp_path / "redraw" / "0000.png"))


@pytest.fixture
def editor(kandinsky_world, tmp_path):
    server = Editor(f"{kandinsky_world}/inpaint/ckpt.pt", tmp_path / "editor")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(kandinsky_world, tmp_path_factory):
    """One editor for the tests that only ask it questions."""
    server = Editor(f"{kandinsky_world}/inpaint/ckpt.pt", tmp_path_factory.mktemp("served") / "editor")
    yield server
    server.stop()


def test_every_mode_draws_what_its_recorded_command_draws_bit_for_bit(editor, toy_world, tmp_path):
    """Text at 16:9, variations at 9:16, fusion of two images and a prompt, inpainting a painted mask and
    outpainting a window slid off the picture, queued together: each PNG holds a command that draws it
    again, bit for bit; inpainting keeps every pixel outside the mask; outpainting keeps the picture."""
    haystack = f"{toy_world[0]}/haystack"
    a = editor.upload(open(f"{haystack}/000003.png", "rb").read())
    jpeg = io.BytesIO()
    Image.open(f"{haystack}/000004.png").save(jpeg, format="JPEG")
    b = editor.upload(jpeg.getvalue(), content_type="image/jpeg")
    assert (a["width"], a["height"], b["width"], b["height"]) == (32, 32, 32, 32)
    original = np.asarray(editor.image(a["id"]))
    hole = np.zeros((32, 32), bool)
    hole[4:20, 10:26] = True
    mask = editor.upload(png(np.repeat(hole[..., None] * 255, 3, -1)), kind="mask")

    common = {"seed": 7, "steps": 3, "cfg": 4.0}
    jobs = {
        "text": editor.post("/api/generate", {"mode": "text", "prompt": "two red circles on the left", "aspect": "16:9",
                                              "style": "photo", **common}),
        "variations": editor.post("/api/generate", {"mode": "variations", "image": a["id"], "aspect": "9:16", **common}),
        "fusion": editor.post("/api/generate", {"mode": "fusion", "images": [a["id"], b["id"]], "weights": [0.5, 0.3, 0.2],
                                                "prompt": "a blue square", **common}),
        "inpaint": editor.post("/api/generate", {"mode": "inpaint", "image": a["id"], "mask": mask["id"],
                                                 "prompt": "a yellow star", **common}),
        "outpaint": editor.post("/api/generate", {"mode": "outpaint", "image": a["id"], "window": [-16, 0], **common}),
    }
    assert editor.job(jobs["outpaint"]["id"])["state"] == "queued"  # one at a time: the last waits its turn
    sizes = {"text": (40, 24), "variations": (24, 40), "fusion": (32, 32), "inpaint": (32, 32), "outpaint": (48, 32)}
    for mode, job in jobs.items():
        assert editor.wait(job["id"])["state"] == "done", mode
        image = editor.image(job["id"])
        assert image.size == sizes[mode], mode
        assert image.text["mode"] == mode and image.text["seed"] == "7" and image.text["editor_id"] == str(job["id"])
        assert np.array_equal(np.asarray(image), redraw(image.text["command"], tmp_path / mode)), mode
    text = editor.image(jobs["text"]["id"]).text
    assert text["prompt"] == "two red circles on the left, a high quality photograph" and text["aspect"] == "16:9"
    filled = np.asarray(editor.image(jobs["inpaint"]["id"])).astype(int)
    assert np.array_equal(filled[~hole], original[~hole]) and np.abs(filled[hole] - original[hole]).mean() > 1
    wide = np.asarray(editor.image(jobs["outpaint"]["id"]))
    assert np.array_equal(wide[:, 16:], original)
    assert "--mix 0.5,0.3,0.2" in editor.image(jobs["fusion"]["id"]).text["command"]

    # the history lists the drawings, newest first, and none of the uploads
    _, _, data = editor.request("GET", "/api/history")
    history = json.loads(data)
    assert [item["id"] for item in history["images"]] == sorted((j["id"] for j in jobs.values()), reverse=True)
    assert history["pending"] == []


def test_the_queue_cancels_and_loses_nothing_when_the_server_is_killed(editor):
    """Three jobs queued; the third cancelled before its turn; the server killed while the second draws.
    Restarted, it has the first image unchanged, draws the second, and never the third."""
    request = {"mode": "text", "prompt": "a green triangle", "aspect": "1:1", "steps": 100}
    first, second, third = (editor.post("/api/generate", {**request, "seed": s})["id"] for s in (1, 2, 3))
    assert editor.job(third)["ahead"] == 2
    editor.post("/api/cancel", {"id": third})
    assert editor.job(third)["state"] == "cancelled"
    assert editor.wait(first)["state"] == "done"
    drawn = editor.image(first).tobytes()
    deadline = time.monotonic() + 60
    while editor.job(second)["state"] != "running" or editor.job(second).get("step", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    editor.stop(signal.SIGKILL)

    editor.start()
    assert editor.image(first).tobytes() == drawn
    assert editor.wait(second)["state"] == "done" and editor.image(second).size == (32, 32)
    assert editor.job(third)["state"] == "cancelled"
    status, _, _ = editor.request("GET", f"/api/image?id={third}")
    assert status == 404
    # a new job takes the next number: nothing is overwritten
    assert editor.post("/api/generate", {**request, "steps": 2, "seed": 4})["id"] == third + 1


def test_a_running_job_shows_its_steps_and_preview_and_stops_when_cancelled(editor):
    image_id = editor.post("/api/generate", {"mode": "text", "prompt": "a red circle", "steps": 100, "seed": 1})["id"]
    deadline = time.monotonic() + 60
    while not (job := editor.job(image_id)).get("preview"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["state"] == "running" and 1 <= job["step"] < job["steps"] == 100
    status, headers, data = editor.request("GET", f"/api/preview?id={image_id}")
    assert status == 200 and headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(data)).size == (32, 32)
    editor.post("/api/cancel", {"id": image_id})
    assert editor.wait(image_id)["state"] == "cancelled"
    assert editor.request("GET", f"/api/image?id={image_id}")[0] == 404


def bomb():
    """A PNG that declares 5000 x 5000 pixels in a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("method, path, body, headers, status, message", [
    ("GET", "/", None, {"Host": "evil.example:80"}, 400, "unknown Host"),
    ("POST", "/api/generate", b'{"mode": "text"}', {"Content-Type": "application/json", "Origin": "http://evil.example"},
     403, "cross-origin or origin-less request refused"),
    ("POST", "/api/generate", b'{"mode": "text"}', {"Content-Type": "application/json", "Origin": None}, 403,
     "cross-origin or origin-less request refused"),
    ("POST", "/api/generate", b'{"mode": ', {"Content-Type": "application/json"}, 400, "malformed JSON"),
    ("POST", "/api/generate", b'{"mode": "text"}', {"Content-Type": "text/plain"}, 415,
     "expected application/json, not text/plain"),
    ("POST", "/api/generate", b'{"mode": "paint"}', {"Content-Type": "application/json"}, 400,
     "mode: one of text, variations, fusion, inpaint, outpaint"),
    ("POST", "/api/generate", b'{"mode": "text", "steps": 101}', {"Content-Type": "application/json"}, 400,
     "steps: a whole number from 1 to 100"),
    ("POST", "/api/generate", json.dumps({"mode": "text", "prompt": "x" * 1001}).encode(), {"Content-Type": "application/json"},
     400, "prompt: text of at most 1000 characters on one line"),
    ("POST", "/api/generate", b'{"mode": "variations", "image": "../../etc/passwd"}', {"Content-Type": "application/json"},
     400, "image: not an image of this editor"),
    ("POST", "/api/upload?kind=image", b"GIF89a" + b"\0" * 40, {"Content-Type": "image/gif"}, 415,
     "expected image/png or image/jpeg or image/webp, not image/gif"),
    ("POST", "/api/upload?kind=image", b"not an image", {"Content-Type": "image/png"}, 415, "not a PNG, JPEG or WebP image"),
    ("POST", "/api/upload?kind=image", b"x", {"Content-Type": "image/png", "Content-Length": str(2 ** 25)}, 413,
     "body too large (at most 16777216 bytes)"),
    ("POST", "/api/upload?kind=image", bomb(), {"Content-Type": "image/png"}, 413,
     "upload: too many pixels (5000x5000 is over 16777216; refused before decoding)"),
    ("POST", "/api/upload?kind=file", png(np.zeros((8, 8, 3))), {"Content-Type": "image/png"}, 400, "kind: image or mask"),
    ("GET", "/api/image?id=../sample.py", None, {}, 404, "no such image"),
    ("GET", "/static/../../sample.py", None, {}, 404, "not found"),
    ("GET", "/api/job?id=99", None, {}, 404, "no such job"),
    ("DELETE", "/api/job?id=0", None, {}, 405, "method not allowed"),
])
def test_the_editor_refuses_bad_requests_in_one_line(served, method, path, body, headers, status, message):
    got, answer_headers, data = served.request(method, path, body, headers)
    assert (got, data.decode().strip()) == (status, f"{status} {message}")
    assert "script-src 'self'" in answer_headers["Content-Security-Policy"]


def test_uploads_are_checked_by_content_and_the_window_must_reach_off_the_picture(editor):
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 30, 30)).save(jpeg, format="JPEG")
    status, _, data = editor.request("POST", "/api/upload?kind=image", jpeg.getvalue(), {"Content-Type": "image/png"})
    assert (status, data.decode().strip()) == (415, "415 the body is JPEG, not PNG")
    wide = editor.upload(jpeg.getvalue(), content_type="image/jpeg")  # 16:9 photo: fitted to the model's 16:9 size
    assert (wide["width"], wide["height"]) == (40, 24)
    mask = editor.upload(png(np.zeros((24, 40, 3))), kind="mask")
    for request, message in [
        ({"mode": "outpaint", "image": wide["id"], "window": [40, 0], "aspect": "9:16"}, "window: it must overlap"),
        ({"mode": "outpaint", "image": wide["id"], "window": [0, 0], "aspect": "3:2"}, "window: it lies inside the picture"),
        ({"mode": "outpaint", "image": wide["id"], "window": [-4, 0]}, "window: left and top must be multiples of 8"),
        ({"mode": "inpaint", "image": mask["id"], "mask": mask["id"]}, "image: not an image of this editor"),
        ({"mode": "inpaint", "image": wide["id"], "mask": wide["id"]}, "mask: not a painted mask"),
        ({"mode": "fusion", "images": [wide["id"]]}, "fusion takes one to four images, and two inputs with the prompt"),
    ]:
        status, _, data = editor.request("POST", "/api/generate", json.dumps(request).encode(), {"Content-Type": "application/json"})
        assert status == 400 and data.decode().startswith(f"400 {message}"), (request, data)
    # a window off a corner grows the picture both ways; what neither covers stays grey
    image_id = editor.post("/api/generate", {"mode": "outpaint", "image": wide["id"], "window": [-16, 8], "aspect": "1:1"})["id"]
    assert editor.wait(image_id)["state"] == "done"
    grown = np.asarray(editor.image(image_id))
    assert grown.shape == (40, 56, 3) and np.array_equal(grown[:24, 16:], np.asarray(editor.image(wide["id"])))
    assert (grown[:8, :16] == 128).all()


def test_a_second_editor_on_the_same_folder_is_refused_in_one_line(served):
    proc = subprocess.run([*served.argv, "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    folder = served.argv[served.argv.index("--out") + 1]
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {folder}: another editor is serving this folder (give it another --out)")


def test_the_editor_warns_off_loopback_and_refuses_the_architectures_it_cannot_drive(kandinsky_world, toy_world, tmp_path):
    proc = subprocess.run([sys.executable, "sample.py", "serve", "--ckpt", f"{kandinsky_world}/inpaint/ckpt.pt", "--out",
                           str(tmp_path / "e"), "--styles", str(tmp_path / "missing.tsv")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --styles [Errno 2]")
    server = Editor(f"{toy_world[0]}/pre/ckpt.pt", tmp_path / "ldm", "--host", "0.0.0.0")
    try:
        _, _, data = server.request("GET", "/api/config", headers={"Host": "192.0.2.1:1"})  # not loopback: any Host
        assert json.loads(data)["modes"] == ["text"]  # Emu's U-Net: text to image, at every ratio
    finally:
        server.stop()
    assert "warning: listening on 0.0.0.0: anyone who can reach this address can draw with the model" in server.output()
