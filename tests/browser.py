"""A minimal headless-Chromium driver for end-to-end tests (standard library only).

It speaks the Chrome DevTools Protocol (CDP) over ``--remote-debugging-pipe``:
Chromium reads JSON commands from its file descriptor 3 and writes JSON replies
and events to its file descriptor 4; every message ends with a NUL byte.

    with Browser() as b:
        b.goto("http://127.0.0.1:8000/")
        b.wait_for_navigation(lambda: b.click("button[type=submit]"))
        print(b.evaluate("document.title"))

Navigation caused by an action (a click or key press that submits a form) is
awaited with a *marker*: ``wait_for_navigation`` stores a random number in
``window.__cdp_marker`` before the action; a new document does not have it, so
we wait until the marker is gone and ``document.readyState == 'complete'``.
(Same-document navigations, e.g. ``#hash`` changes, keep the marker: don't use
it for those.)
"""
import base64
import collections
import fcntl
import json
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1100,800"]

# key name -> (code, windowsVirtualKeyCode, text) for the non-character keys we support
SPECIAL_KEYS = {"ArrowLeft": ("ArrowLeft", 37, ""), "ArrowUp": ("ArrowUp", 38, ""),
                "ArrowRight": ("ArrowRight", 39, ""), "ArrowDown": ("ArrowDown", 40, ""),
                "Enter": ("Enter", 13, "\r")}


def find_chromium():
    """Return the path of an installed Chromium/Chrome, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _high_fd(fd):
    """Duplicate fd to a number >= 10 (close-on-exec) and close the original, so that
    moving it onto 3 or 4 in the child cannot clobber the other pipe end."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """One headless Chromium process with one page (tab) attached in a CDP session."""

    def __init__(self, executable=None, timeout=20.0):
        self.timeout = timeout
        self.events = collections.deque(maxlen=1000)  # CDP events received so far
        self._next_id, self._buffer, self.proc = 0, b"", None
        executable = executable or find_chromium()
        if not executable:
            raise RuntimeError("no chromium/google-chrome found on PATH")
        self.tmpdir = tempfile.mkdtemp(prefix="cdp-browser-")
        self.profile = os.path.join(self.tmpdir, "profile")
        self.log_path = os.path.join(self.tmpdir, "chromium.log")
        # Two pipes: we write commands to cmd_w (child reads fd 3) and read replies from
        # reply_r (child writes fd 4). os.pipe() fds are close-on-exec, so only the
        # dup2 copies at 3 and 4 survive into Chromium (hence close_fds=False).
        cmd_r, self.cmd_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        cmd_r, reply_w = _high_fd(cmd_r), _high_fd(reply_w)

        def in_child():
            os.dup2(cmd_r, 3)
            os.dup2(reply_w, 4)

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=in_child, close_fds=False, start_new_session=True)
        os.close(cmd_r)  # the parent keeps only its own ends, so EOF is seen on exit
        os.close(reply_w)
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
            self.session_id = self.send("Target.attachToTarget", {
                "targetId": target["targetId"], "flatten": True}, session=False)["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    # -- protocol -------------------------------------------------------------
    def send(self, method, params=None, session=True):
        """Send one CDP command and return its result, buffering events meanwhile.

        session=True sends it to our page; session=False to the browser itself.
        Raises RuntimeError on an error reply, TimeoutError after self.timeout s."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session_id
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self.cmd_w, data):]
        except BrokenPipeError:
            raise RuntimeError(f"chromium has exited; cannot send {method}:\n{self._log_tail()}")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read_message(self, deadline, what):
        """Return the next complete message from Chromium, waiting until deadline."""
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.reply_r], [], [], left)[0]:
                raise TimeoutError(f"no reply to {what} within {self.timeout} s")
            chunk = os.read(self.reply_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited while waiting for {what}:\n{self._log_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _log_tail(self, lines=20):
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")

    # -- page helpers ---------------------------------------------------------
    def evaluate(self, expression):
        """Evaluate a JavaScript expression in the page (awaiting promises) and
        return its value; RuntimeError if the page threw."""
        result = self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"JavaScript error in {expression!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=None):
        """Poll expression every 50 ms until it is truthy and return its value.
        Errors while polling (e.g. during a navigation) count as "not yet"."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last_error = None
        while True:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except RuntimeError as e:
                last_error = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression!r} (last error: {last_error})")
            time.sleep(0.05)

    def wait_for_navigation(self, action, timeout=None):
        """Run action() (e.g. a click on a submit button) and wait until it has
        loaded a new document: the marker set beforehand is gone and loading is done."""
        marker = random.random()
        self.evaluate(f"window.__cdp_marker = {marker}")
        action()
        self.wait_for(f"window.__cdp_marker !== {marker} && document.readyState === 'complete'",
                      timeout)

    def goto(self, url):
        """Navigate to url and wait until the new page has loaded."""
        def navigate():
            result = self.send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_for_navigation(navigate)

    def click(self, selector):
        """Really click the element: move the mouse to its centre, press and release."""
        x, y = self.center(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def center(self, selector):
        """The centre of the element in the viewport, after scrolling it into view: (x, y)."""
        box = self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = el.getBoundingClientRect();
            return {{x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height}};
        }})()""")
        if not box or not box["w"] or not box["h"]:
            raise RuntimeError(f"no visible element matches {selector!r}")
        return box["x"], box["y"]

    def drag(self, points):
        """Press the left button at the first (x, y) of `points`, move through the others, release at the last."""
        mouse = lambda kind, x, y, buttons: self.send("Input.dispatchMouseEvent", {
            "type": kind, "x": x, "y": y, "button": "left", "buttons": buttons, "clickCount": 1})
        (x, y), rest = points[0], points[1:]
        mouse("mouseMoved", x, y, 0)
        mouse("mousePressed", x, y, 1)
        for x, y in rest:
            mouse("mouseMoved", x, y, 1)
        mouse("mouseReleased", x, y, 0)

    def set_files(self, selector, paths):
        """Choose files in an <input type=file>, as a person picking them in the file dialog does."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise RuntimeError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [os.path.abspath(p) for p in paths]})

    def press(self, key):
        """Press and release one key: a single character ('a', 'Z', '2', ' ') or one
        of ArrowLeft/ArrowRight/ArrowUp/ArrowDown/Enter."""
        event = {"key": key}
        if key in SPECIAL_KEYS:
            event["code"], event["windowsVirtualKeyCode"], event["text"] = SPECIAL_KEYS[key]
        elif len(key) == 1 and key.isprintable():
            event["text"] = key
            if key.isascii() and key.isalpha():
                event.update(code="Key" + key.upper(), windowsVirtualKeyCode=ord(key.upper()))
                if key.isupper():
                    event["modifiers"] = 8  # Shift
            elif key.isdigit() and key.isascii():
                event.update(code="Digit" + key, windowsVirtualKeyCode=ord(key))
            elif key == " ":
                event.update(code="Space", windowsVirtualKeyCode=32)
        else:
            raise ValueError(f"unsupported key {key!r}")
        # keyDown with text also produces keypress/input; rawKeyDown is a bare keydown.
        down = "keyDown" if event.get("text") else "rawKeyDown"
        self.send("Input.dispatchKeyEvent", {"type": down, **event})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **event})

    def screenshot(self, path):
        """Save a PNG screenshot of the visible page to path."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    # -- shutdown -------------------------------------------------------------
    def close(self):
        """Ask Chromium to quit, make sure all its processes are gone, and delete
        the temporary profile. Safe to call twice."""
        if self.proc is None:
            return
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, TimeoutError, OSError):
            pass  # it may exit before replying
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:  # also kill helpers (renderer, zygote...) left in its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc = None
        os.close(self.cmd_w)
        os.close(self.reply_r)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
