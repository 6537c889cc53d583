"""The rating page: people vote on a study's pairs in their browser (emu_paper.txt, section 4.1).

A small web server from the standard library (`http.server`): nothing to install, and every line
that touches a request is here to read. Each rater opens their own link, /rate?t=TOKEN, and sees one
pair at a time: the two images side by side, labelled A (left) and B (right), the question, the
caption only for text faithfulness, and the buttons, with keyboard shortcuts. A vote is a plain HTML
form POST, stored at once (emu/evaluation/study.py), and answered with a redirect to the next pair
(post/redirect/get), so reloading the page never votes twice. A rater who comes back continues at
their first pair without a vote.

What the server does not trust:
- the path: only the fixed routes below exist; images are found through the rater's own
  assignment in the database, never through a file name in the request, and must lie inside the
  study folder;
- the Host header: on a loopback address only localhost names are served (DNS rebinding);
- the origin of a vote: a POST needs the rater's token and an Origin (or Referer) of this server;
- the text: prompts are user data and are HTML-escaped; a Content-Security-Policy allows only this
  server's own images, style sheet and script, so even a missed escape could not run a script;
- malformed requests: they get a 4xx with a short message; an unexpected error gets a 500 and one
  line in the log, never a traceback sent to the browser.

Routes:
    GET  /rate?t=TOKEN                      the rater's next pair, or the done page
    GET  /image?t=TOKEN&item=ID&side=left   an image of one of the rater's assignments
    GET  /static/rate.css, /static/rate.js  the page's style sheet and keyboard shortcuts
    POST /vote                              t, item, choice (form-encoded)
"""
import html
import ipaddress
import os
import re
import sys
import threading
from contextlib import closing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from emu.evaluation.study import (STUDY_FILE, TASKS, VoteError, connect, image_of, next_item, progress, rater_of,
                                  record_vote)

MAX_FORM_BYTES = 8192  # a caption of up to 1000 characters, percent-encoded, fits
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The token is in the URL: send it to no other site. ("no-referrer" would also make the browser
    # send "Origin: null" with our own form posts, and the origin check below needs the real one.)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# -----------------------------------------------------------------------------
# the page

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }
main { max-width: 1000px; margin: 0 auto; padding: 16px 24px; }
header { display: flex; justify-content: space-between; color: #666; font-size: 14px; }
h1 { font-size: 22px; font-weight: 600; margin: 12px 0; }
.caption { background: #fff; border-left: 4px solid #4a7; padding: 10px 14px; font-size: 18px; margin: 0 0 14px; }
.pair { display: flex; gap: 24px; justify-content: center; }
figure { margin: 0; text-align: center; flex: 1; }
figure img { width: 100%; max-width: 420px; image-rendering: pixelated; border: 1px solid #ccc; background: #fff; }
figcaption { font-size: 28px; font-weight: 700; margin-top: 4px; }
form { display: flex; gap: 12px; justify-content: center; margin: 18px 0; }
button { font-size: 18px; padding: 10px 26px; border-radius: 6px; border: 1px solid #888; background: #fff; cursor: pointer; }
button:hover, button:focus { background: #e6f0ea; }
kbd { font-size: 12px; color: #777; border: 1px solid #bbb; border-radius: 3px; padding: 0 4px; margin-left: 6px; }
.hint { text-align: center; color: #777; font-size: 13px; }
.single { text-align: center; }
.single img { width: 420px; max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; background: #fff; }
form.checklist, form.caption { flex-direction: column; align-items: stretch; max-width: 640px; margin: 18px auto; }
label.check { background: #fff; padding: 8px 12px; border-radius: 4px; font-size: 15px; }
textarea { font: inherit; font-size: 17px; padding: 8px; }
"""

# Keys: 1 2 3 4 pick the buttons in order; the arrow keys pick A (left), B (right) and, down, Tie.
JS = """
document.addEventListener('keydown', function (event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  var buttons = document.querySelectorAll('form.vote button');
  var keys = {'1': 0, '2': 1, '3': 2, '4': 3, 'ArrowLeft': 0, 'ArrowRight': 1, 'ArrowDown': 2};
  var i = keys[event.key];
  if (i === undefined || i >= buttons.length || document.body.dataset.sent) return;
  event.preventDefault();
  document.body.dataset.sent = '1';
  buttons[i].form.requestSubmit(buttons[i]);
});
document.addEventListener('submit', function () { document.body.dataset.sent = '1'; });
"""


def page(title, body):
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="stylesheet" href="/static/rate.css"><script src="/static/rate.js" defer></script></head>'
            f'<body><main>{body}</main></body></html>')


def rating_page(token, rater, item, done, total):
    """One pair: progress, question, caption when the task shows it, the images and the buttons."""
    task = TASKS[item["task"]]
    t = html.escape(token, quote=True)
    caption = f'<p class="caption" id="caption">{html.escape(item["prompt"])}</p>' if task.show_prompt else ""
    images = "".join(f'<figure><img src="/image?t={t}&amp;item={item["id"]}&amp;side={side}" alt="image {label}">'
                     f'<figcaption>{label}</figcaption></figure>' for side, label in (("left", "A"), ("right", "B")))
    buttons = "".join(f'<button type="submit" name="choice" value="{value}">{label}<kbd>{i + 1}</kbd></button>'
                      for i, (value, label) in enumerate(task.choices))
    return page(f"{task.name}: {done + 1} of {total}", f"""
<header><span id="progress">{done + 1} of {total}</span><span>{html.escape(rater)} &middot; {task.name}</span></header>
<h1 id="question">{html.escape(task.question)}</h1>
{caption}<div class="pair">{images}</div>
<form class="vote" method="post" action="/vote">
<input type="hidden" name="t" value="{t}"><input type="hidden" name="item" value="{item["id"]}">{buttons}</form>
<p class="hint">Keys: 1&ndash;{len(task.choices)} pick a button; &larr; is A, &rarr; is B{", &darr; is Tie" if "tie" in dict(task.choices) else ""}.</p>""")


def done_page(rater, total):
    return page("Done", f'<h1 id="done">All {total} done. Thank you, {html.escape(rater)}!</h1>'
                        f'<p>Your votes are saved. You can close this page.</p>')


# -----------------------------------------------------------------------------
# the server

class PairStudy:
    """The backend for a pairwise study (emu/evaluation/study.py): what the server asks of any backend.

    db_path: the sqlite file; rater(conn, token) -> name or None; page(conn, token, rater) -> HTML;
    image(conn, rater, query) -> an image path relative to the folder, or None; vote(conn, rater,
    form) stores one answer or raises VoteError.
    """

    def __init__(self, folder):
        self.db_path = os.path.join(folder, STUDY_FILE)

    def connect(self):
        return connect(self.db_path)

    def rater(self, conn, token):
        return rater_of(conn, token)

    def page(self, conn, token, rater):
        done, total = progress(conn, rater)
        item = next_item(conn, rater)
        return done_page(rater, total) if item is None else rating_page(token, rater, item, done, total)

    def image(self, conn, rater, query):
        item = query.get("item", "")
        return image_of(conn, rater, int(item), query.get("side")) if item.isdigit() else None

    def vote(self, conn, rater, form):
        if not form.get("item", "").isdigit():
            raise VoteError("bad item")
        record_vote(conn, rater, int(form["item"]), form.get("choice", ""))


class RatingServer(ThreadingHTTPServer):
    """Serves one folder through a backend (PairStudy, or the curation funnel's human stages)."""
    daemon_threads = True

    def __init__(self, folder, host="127.0.0.1", port=8000, backend=None):
        self.folder = os.path.realpath(folder)
        self.backend = backend or PairStudy(self.folder)
        super().__init__((host, port), RatingHandler)
        port = self.server_address[1]
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback
        self.allowed_hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        self.base_url = f"http://{'127.0.0.1' if self.loopback else host}:{port}"
        self.lock = threading.Lock()  # one writer at a time; sqlite would also serialise, but slower

    def link(self, token):
        return f"{self.base_url}/rate?t={token}"


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class RatingHandler(BaseHTTPRequestHandler):
    server_version = "emu-rating"
    default_request_version = "HTTP/1.0"  # so that even a malformed request line gets a status line back

    def version_string(self):
        return self.server_version

    # -- plumbing ---------------------------------------------------------------

    def send(self, status, body, content_type="text/html; charset=utf-8", headers=None):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        for k, v in {**SECURITY_HEADERS, "Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (malformed request line, unknown method) in our plain form."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method nobody implements is still the client's mistake
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, None
        self.send(code, f"{code} {message or HTTPStatus(code).phrase}\n", "text/plain; charset=utf-8")

    def log_message(self, format, *args):
        # the query string holds the rater's token: keep it out of the log
        sys.stderr.write(f"{self.address_string()} {re.sub(r't=[^ &]*', 't=...', format % args)}\n")

    def handle_safely(self, route):
        try:
            self.check_host()
            route()
        except BadRequest as e:
            self.send(e.status, f"{e.status} {e}\n", "text/plain; charset=utf-8")
        except Exception as e:  # a bug: answer 500, keep serving, one line in the log
            sys.stderr.write(f"error: {self.command} {urlsplit(self.path).path}: {type(e).__name__}: {e}\n")
            self.send(500, "500 internal error\n", "text/plain; charset=utf-8")

    def check_host(self):
        host = self.headers.get("Host", "")
        if self.server.loopback and host not in self.server.allowed_hosts:
            raise BadRequest(400, "unknown Host")

    def query(self):
        try:
            return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, strict_parsing=False).items()}
        except ValueError:
            raise BadRequest(400, "bad query string") from None

    def rater(self, conn, token):
        name = self.server.backend.rater(conn, token) if token else None
        if name is None:
            raise BadRequest(403, "unknown or missing token: use the link you were given")
        return name

    # -- routes -----------------------------------------------------------------

    def do_GET(self):
        routes = {"/": self.get_index, "/rate": self.get_rate, "/image": self.get_image,
                  "/static/rate.css": lambda: self.send(200, CSS, "text/css; charset=utf-8"),
                  "/static/rate.js": lambda: self.send(200, JS, "text/javascript; charset=utf-8")}
        path = urlsplit(self.path).path
        self.handle_safely(routes.get(path, self.not_found))

    def do_POST(self):
        path = urlsplit(self.path).path
        self.handle_safely(self.post_vote if path == "/vote" else self.not_found)

    def refuse_method(self):
        self.handle_safely(lambda: self.send(405, "405 method not allowed\n", "text/plain; charset=utf-8", {"Allow": "GET, POST"}))

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = refuse_method

    def not_found(self):
        raise BadRequest(404, "not found")

    def get_index(self):
        self.send(200, page("emu rating", "<h1>emu rating</h1><p>Open the personal link you were given.</p>"))

    def get_rate(self):
        token = self.query().get("t", "")
        with closing(self.server.backend.connect()) as conn:
            body = self.server.backend.page(conn, token, self.rater(conn, token))
        self.send(200, body)

    def get_image(self):
        q = self.query()
        with closing(self.server.backend.connect()) as conn:
            relative = self.server.backend.image(conn, self.rater(conn, q.get("t", "")), q)
        if relative is None:
            raise BadRequest(404, "not found")
        path = os.path.realpath(os.path.join(self.server.folder, relative))
        if os.path.commonpath([path, self.server.folder]) != self.server.folder or \
                os.path.splitext(path)[1].lower() not in IMAGE_TYPES:
            raise BadRequest(403, "forbidden")  # a study whose image paths point outside it
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            raise BadRequest(404, "image missing from the study folder") from None
        self.send(200, data, IMAGE_TYPES[os.path.splitext(path)[1].lower()], {"Cache-Control": "private, max-age=3600"})

    def post_vote(self):
        self.check_origin()
        form = self.read_form()
        token = form.get("t", "")
        with self.server.lock, closing(self.server.backend.connect()) as conn:
            rater = self.rater(conn, token)
            try:
                self.server.backend.vote(conn, rater, form)
            except VoteError as e:
                raise BadRequest(400, str(e)) from None
        self.send(303, "", "text/plain; charset=utf-8", {"Location": f"/rate?t={token}"})

    def check_origin(self):
        """A vote must come from a page of this server (no cross-site form posts)."""
        own = f"http://{self.headers.get('Host', '')}"
        origin = self.headers.get("Origin")
        if origin is None and self.headers.get("Referer"):
            parts = urlsplit(self.headers["Referer"])
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin != own:
            raise BadRequest(403, "cross-origin or origin-less vote refused")

    def read_form(self):
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise BadRequest(415, "votes are form-encoded")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest(411, "Content-Length required") from None
        if not 0 <= length <= MAX_FORM_BYTES:
            raise BadRequest(413, "form too large")
        try:
            body = self.rfile.read(length).decode("ascii")
            return {k: v[0] for k, v in parse_qs(body, strict_parsing=True, keep_blank_values=True).items()}
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "malformed form") from None
