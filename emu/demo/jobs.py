"""The editor's queue: one generation at a time, the others waiting their turn, and nothing finished
ever lost.

Every image the editor holds is a numbered PNG in its folder: `0007.png` is image 7, whether it was
drawn, uploaded, or is a mask a person painted. A generation is a job that will make one such image.
It is written down (`0007.json`: the request, the sample.py command that draws it, its state) the
moment it is queued, and its PNG is written the moment it is drawn, both atomically (write, then
rename). So a closed tab loses nothing, and a server that is stopped or killed and started again
finds every image and resumes the jobs that had not finished, in their order. One server at a time
serves a folder (a lock file, released by the system however the server ends).

The drawing itself is not here: the queue is given `draw(argv, callback) -> (image (H, W, 3) uint8,
metadata)`, which sample.py supplies, drawing exactly as `python sample.py ARGV` does.
"""
import fcntl
import io
import json
import os
import re
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from emu import EmuError
from emu.checkpoint import atomic_write
from emu.datasets.folders import save_png, to_uint8

NAME = re.compile(r"^(\d{4,})\.(png|json)$")  # the only files the editor reads back from its folder
PREVIEW_SECONDS = 0.5  # at most two decoded previews a second: decoding is not free on a real model


class Cancelled(Exception):
    """Raised from the sampling callback to stop a job a person cancelled."""


class JobQueue:
    """The folder's images and jobs, and the one worker thread that draws them in order."""

    def __init__(self, folder, draw, command_prefix="python sample.py"):
        self.folder, self.draw, self.command_prefix = folder, draw, command_prefix
        os.makedirs(folder, exist_ok=True)
        self.lock = open(os.path.join(folder, ".lock"), "w")  # held while this server lives: one writer per folder
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmuError(f"{folder}: another editor is serving this folder (give it another --out)") from None
        self.changed = threading.Condition()
        self.images = {}  # id -> metadata of every finished image (PNG text chunks)
        self.jobs = {}  # id -> job record (dict), every job ever queued
        self.waiting = []  # ids of queued jobs, in order
        self.running = None  # the id being drawn
        self.progress = {}  # id -> (step, steps) of the running job
        self.previews = {}  # id -> PNG bytes of the running job's latest decoded prediction
        self.cancel_requested = set()
        self.next_id = 0
        self.load()
        self.worker = threading.Thread(target=self.work, daemon=True, name="editor-worker")
        self.worker.start()

    # -- the folder -------------------------------------------------------------

    def path(self, image_id, ext="png"):
        return os.path.join(self.folder, f"{image_id:04d}.{ext}")

    def load(self):
        """Read back what an earlier run left: every image, every job; unfinished jobs queue again."""
        found = sorted((int(m[1]), m[2]) for m in map(NAME.match, os.listdir(self.folder)) if m)
        for image_id, ext in found:
            self.next_id = max(self.next_id, image_id + 1)
            if ext == "png":
                with Image.open(self.path(image_id)) as im:
                    self.images[image_id] = dict(im.text)
            else:
                with open(self.path(image_id, "json")) as f:
                    self.jobs[image_id] = json.load(f)
        for image_id, job in sorted(self.jobs.items()):
            if job["state"] in ("queued", "running"):
                if image_id in self.images:  # killed between writing the PNG and the record
                    job["state"] = "done"
                else:
                    job["state"] = "queued"
                    self.waiting.append(image_id)

    def write_record(self, job):
        text = json.dumps(job, indent=1) + "\n"
        atomic_write(self.path(job["id"], "json"), lambda tmp: Path(tmp).write_text(text))

    def write_image(self, image_id, image, metadata):
        atomic_write(self.path(image_id), lambda tmp: save_png(tmp, image, metadata))

    # -- what the server asks ---------------------------------------------------

    def add_image(self, image, metadata):
        """Store an image that was not drawn (an upload, a painted mask); returns its id."""
        with self.changed:
            image_id, self.next_id = self.next_id, self.next_id + 1
            self.write_image(image_id, image, metadata)
            self.images[image_id] = {k: str(v) for k, v in metadata.items()}
            self.changed.notify_all()
        return image_id

    def submit(self, request, argv_for):
        """Queue a job; `argv_for(image_id)` gives its sample.py arguments (they name its id). Returns the id."""
        with self.changed:
            image_id, self.next_id = self.next_id, self.next_id + 1
            argv = argv_for(image_id)
            job = {"id": image_id, "state": "queued", "request": request, "argv": argv,
                   "command": f"{self.command_prefix} {shlex.join(argv)}", "queued_at": time.time()}
            self.write_record(job)
            self.jobs[image_id] = job
            self.waiting.append(image_id)
            self.changed.notify_all()
        return image_id

    def cancel(self, image_id):
        """Cancel a waiting job at once, or ask the running one to stop at its next step."""
        with self.changed:
            job = self.jobs.get(image_id)
            if job is None:
                raise KeyError(image_id)
            if image_id in self.waiting:
                self.waiting.remove(image_id)
                self.finish(job, "cancelled")
            elif image_id == self.running:
                self.cancel_requested.add(image_id)

    def status(self, image_id):
        """What the page shows of a job: its state, its place in the queue, its step, its error."""
        with self.changed:
            job = self.jobs.get(image_id)
            if job is None:
                raise KeyError(image_id)
            out = {"id": image_id, "state": job["state"], "command": job["command"]}
            if job["state"] == "queued":
                out["ahead"] = self.waiting.index(image_id) + (self.running is not None)
            if job["state"] == "running":
                out["step"], out["steps"] = self.progress.get(image_id, (0, 0))
                out["preview"] = image_id in self.previews
            if "error" in job:
                out["error"] = job["error"]
            return out

    def history(self):
        """The finished drawings, newest first: what a person finds again after closing the tab."""
        with self.changed:
            return [{"id": i, "prompt": m.get("prompt", ""), "mode": m.get("mode", "")}
                    for i, m in sorted(self.images.items(), reverse=True) if "command" in m]

    def wait_idle(self, timeout=None):
        """Block until no job waits or runs (for tests and scripts)."""
        with self.changed:
            return self.changed.wait_for(lambda: not self.waiting and self.running is None, timeout)

    # -- the worker -------------------------------------------------------------

    def finish(self, job, state, error=None):
        job["state"] = state
        if error is not None:
            job["error"] = error
        self.write_record(job)
        self.changed.notify_all()

    def work(self):
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting)
                image_id = self.running = self.waiting.pop(0)
                job = self.jobs[image_id]
                job["state"] = "running"
                self.changed.notify_all()
            try:
                image, metadata = self.draw(job["argv"], self.callback(image_id))
                metadata = {**metadata, "command": job["command"], "editor_id": image_id}
                self.write_image(image_id, image, metadata)
                state, error = "done", None
            except Cancelled:
                state, error = "cancelled", None
            except EmuError as e:
                state, error = "failed", str(e)
            except (Exception, SystemExit) as e:  # a bug (argparse exits): the job fails, the queue goes on
                sys.stderr.write(f"error: job {image_id}: {type(e).__name__}: {e}\n")
                state, error = "failed", "internal error (see the server's log)"
            with self.changed:
                if state == "done":
                    self.images[image_id] = {k: str(v) for k, v in metadata.items()}
                self.running = None
                self.progress.pop(image_id, None)
                self.previews.pop(image_id, None)
                self.cancel_requested.discard(image_id)
                self.finish(job, state, error)

    def callback(self, image_id):
        """The sampling callback of one job: counts the steps, decodes a preview now and then, and
        stops the job when a person cancelled it."""
        last = [0.0]

        def each_step(step, steps, x0, first_stage):
            with self.changed:
                self.progress[image_id] = (step, steps)
                stop = image_id in self.cancel_requested
                self.changed.notify_all()
            if stop:
                raise Cancelled()
            if step < steps and time.monotonic() - last[0] >= PREVIEW_SECONDS:
                preview = png_bytes(to_uint8(first_stage.decode(x0[:1]))[0])
                last[0] = time.monotonic()
                with self.changed:
                    self.previews[image_id] = preview
        return each_step


def png_bytes(image):
    """An (H, W, 3) uint8 image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
