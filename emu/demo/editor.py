"""The image editor of Kandinsky's demo system (kandinsky_paper.txt, section 3), as a local web page:
text to image at the demo's five aspect ratios with a style selector, inpainting what a person erases
with a brush, outpainting with a window slid partly off the picture, variations of an image, and
fusion of images and a prompt with weights; undo, zoom, and saving a PNG that carries the exact
`sample.py` command that draws it again, bit for bit.

`python sample.py serve --ckpt ...` starts it (sample.py supplies the drawing; emu/demo/jobs.py
queues it). The page is plain HTML, CSS and JavaScript (emu/demo/static/); it talks to the server
through the JSON routes below and never names a file: every image is a number.

Routes:
    GET  /                          the editor
    GET  /static/editor.css, .js    its style sheet and script
    GET  /api/config                the model's modes, aspect ratios and limits, the styles
    GET  /api/history               the finished drawings (newest first) and the jobs still pending
    GET  /api/job?id=N              a job's state: its place in the queue, its step, its error
    GET  /api/preview?id=N          the running job's latest decoded prediction (PNG)
    GET  /api/image?id=N            image N (PNG); &download=1 to save it
    POST /api/upload?kind=image     an image's bytes (PNG, JPEG or WebP): fitted to the model's nearest size
    POST /api/upload?kind=mask      a painted mask's bytes (PNG): white is the hole
    POST /api/generate              a job (JSON: mode, prompt, style, aspect, seed, cfg, steps, and the
                                    mode's image ids, weights or window) -> its id
    POST /api/cancel                {"id": N}

Safe by default, as the rating page (emu/web.py): loopback unless --host, fixed routes, Host and
Origin checks, a Content-Security-Policy, uploads capped in bytes and in pixels and decoded only if
they are PNG, JPEG or WebP, and one-line 4xx answers.
"""
import io
import json
import os
import random

import numpy as np
from PIL import Image

from emu.datasets.buckets import fit_to_bucket, make_buckets
from emu.datasets.folders import BadFile, open_rgb, to_uint8
from emu.demo.jobs import JobQueue
from emu.variants.inpaint import window_problem
from emu.web import BadRequest, LocalServer, SafeHandler

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_JSON_BYTES = 16384
MAX_UPLOAD_BYTES = 16 * 2 ** 20
MAX_UPLOAD_PIXELS = 4096 * 4096  # checked from the header, before decoding (decompression bombs)
UPLOAD_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MAX_PROMPT = 1000
MODES = ("text", "variations", "fusion", "inpaint", "outpaint")


def read_styles(path):
    """A styles file: one `name<TAB>prompt suffix` per line ('#' starts a comment) -> {name: suffix}."""
    styles = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            name, sep, suffix = line.rstrip("\n").partition("\t")
            if not sep or not name.strip():
                raise ValueError(f"{path}:{number}: expected a name, a tab and a prompt suffix")
            styles[name.strip()] = suffix
    return styles


class EditorServer(LocalServer):
    """The editor's state: the queue over its folder, and what the model can do.

    :param folder: where every image and job is written (as given: the recorded commands name it).
    :param draw: JobQueue's draw(argv, callback).
    :param model_argv: the sample.py flags that load the model (--ckpt ..., --device ...).
    :param modes: the modes the model has (text; with Kandinsky's decoder variations and fusion; with its
        inpainting decoder also inpaint and outpaint).
    :param image_size, multiple: the model's training side and what its image sides must be multiples of.
    """

    def __init__(self, folder, draw, model_argv, modes, image_size, multiple, styles=None, max_steps=100,
                 defaults=None, host="127.0.0.1", port=8001):
        self.folder, self.model_argv, self.modes = folder, list(model_argv), list(modes)
        self.image_size, self.multiple, self.max_steps = image_size, multiple, max_steps
        self.styles = dict(styles or {})
        self.buckets = {b.name: b for b in make_buckets(image_size, multiple)}
        self.defaults = {"cfg": 5.0, "steps": 25, **(defaults or {})}
        self.static = {name: open(os.path.join(STATIC, name), "rb").read()
                       for name in ("editor.html", "editor.css", "editor.js")}
        super().__init__(host, port, EditorHandler)
        self.queue = JobQueue(folder, draw)

    def config(self):
        return {"modes": self.modes, "aspects": {n: [b.width, b.height] for n, b in self.buckets.items()},
                "multiple": self.multiple, "image_size": self.image_size, "styles": list(self.styles),
                "max_steps": self.max_steps, "defaults": self.defaults, "max_upload_bytes": MAX_UPLOAD_BYTES}

    # -- a request -> sample.py's arguments -------------------------------------

    def job_argv(self, req):
        """Check a generation request and turn it into a function of the job's id -> sample.py's argv."""
        mode = pick(req, "mode", self.modes)
        prompt = text(req, "prompt")
        style = pick(req, "style", ["", *self.styles], default="")
        if prompt and style:
            prompt += self.styles[style]
        seed = integer(req, "seed", 0, 2 ** 31 - 1, default=random.randrange(2 ** 31))
        cfg = number(req, "cfg", 1.0, 30.0, default=self.defaults["cfg"])
        steps = integer(req, "steps", 1, self.max_steps, default=self.defaults["steps"])
        aspect = self.buckets[pick(req, "aspect", list(self.buckets), default="1:1")]
        argv = [*self.model_argv, "--mode", mode, "--n", "1", "--seed", str(seed), "--cfg", repr(cfg),
                "--steps", str(steps), "--sampler", "ddim"]
        if prompt or mode == "text":
            argv.append(f"--prompt={prompt}")  # one token, so that a prompt starting with '-' is still a prompt
        if mode in ("text", "variations", "fusion"):
            argv += ["--aspect", aspect.name]
        if mode in ("variations", "inpaint", "outpaint"):
            argv += ["--image", self.image_path(req.get("image"), "image")]
        if mode == "fusion":
            ids = req.get("images")
            if not isinstance(ids, list) or not 1 <= len(ids) <= 4 or len(ids) + bool(prompt) < 2:
                raise BadRequest(400, "fusion takes one to four images, and two inputs with the prompt")
            weights = req.get("weights", [1.0] * (len(ids) + bool(prompt)))
            if not isinstance(weights, list) or len(weights) != len(ids) + bool(prompt) or \
                    not all(isinstance(w, (int, float)) and 0 <= w <= 100 for w in weights) or sum(weights) <= 0:
                raise BadRequest(400, "fusion needs one weight from 0 to 100 per image (and the prompt), not all 0")
            for i in ids:
                argv += ["--image", self.image_path(i, "image")]
            argv += ["--mix", ",".join(repr(float(w)) for w in weights)]
        if mode == "inpaint":
            argv += ["--mask", self.image_path(req.get("mask"), "mask")]
        if mode == "outpaint":
            argv.append(f"--window={self.window(req, aspect)}")  # one token: it may start with '-'
        return lambda image_id: argv + ["--out", os.path.join(self.folder, "redraw", f"{image_id:04d}")]

    def image_path(self, image_id, kind):
        """The path of an image the editor holds, by its number; masks only where a mask is asked for."""
        meta = self.queue.images.get(image_id) if isinstance(image_id, int) else None
        if meta is None or (meta.get("kind") == "mask") != (kind == "mask"):
            raise BadRequest(400, f"{kind}: not an image of this editor" if kind == "image" else "mask: not a painted mask")
        return self.queue.path(image_id)

    def window(self, req, aspect):
        """outpaint's --window: the aspect's size at (left, top) in the image's pixels, overlapping the image
        and reaching past it."""
        with Image.open(self.queue.path(req["image"])) as im:
            W, H = im.size
        at = req.get("window")
        if not (isinstance(at, list) and len(at) == 2 and all(isinstance(v, int) for v in at)):
            raise BadRequest(400, "window: [left, top] in pixels")
        (left, top), (w, h) = at, (aspect.width, aspect.height)
        if left % self.multiple or top % self.multiple:
            raise BadRequest(400, f"window: left and top must be multiples of {self.multiple} pixels")
        problem = window_problem(W, H, left, top, w, h, self.multiple)
        if problem:
            raise BadRequest(400, f"window: it {problem}")
        return f"{left},{top},{w},{h}"

    # -- uploads ----------------------------------------------------------------

    def store_upload(self, data, content_type, kind):
        """Decode an uploaded image (its type declared and sniffed alike), refuse anything else, and store
        it: an image fitted to the model's nearest size, a mask as it is. Returns (id, width, height)."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                actual = im.format
        except Exception:
            raise BadRequest(415, "not a PNG, JPEG or WebP image") from None
        if actual != UPLOAD_FORMATS[content_type]:
            raise BadRequest(415, f"the body is {actual or 'no image'}, not {UPLOAD_FORMATS[content_type]}"
                             if actual in UPLOAD_FORMATS.values() else "not a PNG, JPEG or WebP image")
        try:
            im = open_rgb("upload", MAX_UPLOAD_PIXELS, data=data)
        except BadFile as e:
            status = 413 if e.reason == "too many pixels" else 400
            raise BadRequest(status, str(e)) from None
        if kind == "image":
            pixels = to_uint8(fit_to_bucket(im, list(self.buckets.values()))[None])[0]
        else:
            pixels = np.asarray(im)
        image_id = self.queue.add_image(pixels, {"kind": kind})
        return image_id, pixels.shape[1], pixels.shape[0]


def pick(req, key, choices, default=None):
    value = req.get(key, default)
    if value not in choices:
        raise BadRequest(400, f"{key}: one of {', '.join(map(str, choices))}")
    return value


def text(req, key):
    value = req.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_PROMPT or any(ord(c) < 32 for c in value):
        raise BadRequest(400, f"{key}: text of at most {MAX_PROMPT} characters on one line")
    return value.strip()


def integer(req, key, low, high, default):
    value = req.get(key)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(400, f"{key}: a whole number from {low} to {high}")
    return value


def number(req, key, low, high, default):
    value = req.get(key)
    value = default if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(400, f"{key}: a number from {low} to {high}")
    return float(value)


class EditorHandler(SafeHandler):
    server_version = "emu-editor"

    def send_json(self, value, status=200):
        self.send(status, json.dumps(value), "application/json")

    def read_json(self):
        try:
            value = json.loads(self.read_body(MAX_JSON_BYTES, ("application/json",)))
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "malformed JSON") from None
        if not isinstance(value, dict):
            raise BadRequest(400, "expected a JSON object")
        return value

    def job_id(self, value):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or value not in self.server.queue.jobs:
            raise BadRequest(404, "no such job")
        return value

    # -- routes -----------------------------------------------------------------

    def get_image(self):
        q = self.query()
        image_id = int(q["id"]) if q.get("id", "").isdigit() else None
        if image_id not in self.server.queue.images:
            raise BadRequest(404, "no such image")
        with open(self.server.queue.path(image_id), "rb") as f:
            data = f.read()
        headers = {"Content-Disposition": f'attachment; filename="emu-{image_id:04d}.png"'} if q.get("download") else {}
        self.send(200, data, "image/png", headers)

    def get_preview(self):
        image_id = self.job_id(self.query().get("id"))
        preview = self.server.queue.previews.get(image_id)
        if preview is None:
            raise BadRequest(404, "no preview yet")
        self.send(200, preview, "image/png")

    def get_job(self):
        self.send_json(self.server.queue.status(self.job_id(self.query().get("id"))))

    def get_history(self):
        queue = self.server.queue
        with queue.changed:
            pending = ([queue.running] if queue.running is not None else []) + list(queue.waiting)
        self.send_json({"images": queue.history(), "pending": pending})

    def post_upload(self):
        kind = self.query().get("kind")
        if kind not in ("image", "mask"):
            raise BadRequest(400, "kind: image or mask")
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        data = self.read_body(MAX_UPLOAD_BYTES, tuple(UPLOAD_FORMATS) if kind == "image" else ("image/png",))
        image_id, width, height = self.server.store_upload(data, content_type, kind)
        self.send_json({"id": image_id, "width": width, "height": height})

    def post_generate(self):
        request = self.read_json()
        image_id = self.server.queue.submit(request, self.server.job_argv(request))
        self.send_json({"id": image_id})

    def post_cancel(self):
        self.server.queue.cancel(self.job_id(self.read_json().get("id")))
        self.send_json({"ok": True})

    get_routes = {"/": lambda self: self.send(200, self.server.static["editor.html"]),
                  "/static/editor.css": lambda self: self.send(200, self.server.static["editor.css"], "text/css; charset=utf-8"),
                  "/static/editor.js": lambda self: self.send(200, self.server.static["editor.js"], "text/javascript; charset=utf-8"),
                  "/api/config": lambda self: self.send_json(self.server.config()),
                  "/api/history": get_history, "/api/job": get_job, "/api/preview": get_preview, "/api/image": get_image}
    post_routes = {"/api/upload": post_upload, "/api/generate": post_generate, "/api/cancel": post_cancel}
