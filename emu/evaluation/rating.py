"""The rating page: people vote on a study's pairs in their browser (emu_paper.txt, section 4.1).

A small web server from the standard library (`http.server`): nothing to install, and every line
that touches a request is here to read. Each rater opens their own link, /rate?t=TOKEN, and sees one
pair at a time: the two images side by side, labelled A (left) and B (right), the question, the
caption only for text faithfulness, and the buttons, with keyboard shortcuts. A vote is a plain HTML
form POST, stored at once (emu/evaluation/study.py), and answered with a redirect to the next pair
(post/redirect/get), so reloading the page never votes twice. A rater who comes back continues at
their first pair without a vote.

What the server does not trust (the checks every page shares are in emu/web.py):
- the path: only the fixed routes below exist; images are found through the rater's own
  assignment in the database, never through a file name in the request, and must lie inside the
  study folder;
- the Host header, and the origin of a vote: a POST needs the rater's token and an Origin (or
  Referer) of this server;
- the text: prompts are user data and are HTML-escaped, under a Content-Security-Policy that allows
  only this server's own images, style sheet and script;
- malformed requests: a 4xx with a short message; a bug: a 500 and one line in the log.

Routes:
    GET  /rate?t=TOKEN                      the rater's next pair, or the done page
    GET  /image?t=TOKEN&item=ID&side=left   an image of one of the rater's assignments
    GET  /static/rate.css, /static/rate.js  the page's style sheet and keyboard shortcuts
    POST /vote                              t, item, choice (form-encoded)
"""
import html
import os
import re
import threading
from contextlib import closing

from emu.evaluation.study import (STUDY_FILE, TASKS, VoteError, connect, image_of, next_item, progress, rater_of,
                                  record_vote)
from emu.web import BadRequest, LocalServer, SafeHandler

MAX_FORM_BYTES = 8192  # a caption of up to 1000 characters, percent-encoded, fits
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

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


class RatingServer(LocalServer):
    """Serves one folder through a backend (PairStudy, or the curation funnel's human stages)."""

    def __init__(self, folder, host="127.0.0.1", port=8000, backend=None):
        self.folder = os.path.realpath(folder)
        self.backend = backend or PairStudy(self.folder)
        super().__init__(host, port, RatingHandler)
        self.lock = threading.Lock()  # one writer at a time; sqlite would also serialise, but slower

    def link(self, token):
        return f"{self.base_url}/rate?t={token}"


class RatingHandler(SafeHandler):
    server_version = "emu-rating"

    def redact(self, line):
        return re.sub(r't=[^ &]*', 't=...', line)  # the query string holds the rater's token: keep it out of the log

    def rater(self, conn, token):
        name = self.server.backend.rater(conn, token) if token else None
        if name is None:
            raise BadRequest(403, "unknown or missing token: use the link you were given")
        return name

    # -- routes -----------------------------------------------------------------

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
        form = self.read_form(MAX_FORM_BYTES)
        token = form.get("t", "")
        with self.server.lock, closing(self.server.backend.connect()) as conn:
            rater = self.rater(conn, token)
            try:
                self.server.backend.vote(conn, rater, form)
            except VoteError as e:
                raise BadRequest(400, str(e)) from None
        self.send(303, "", "text/plain; charset=utf-8", {"Location": f"/rate?t={token}"})

    get_routes = {"/": get_index, "/rate": get_rate, "/image": get_image,
                  "/static/rate.css": lambda self: self.send(200, CSS, "text/css; charset=utf-8"),
                  "/static/rate.js": lambda self: self.send(200, JS, "text/javascript; charset=utf-8")}
    post_routes = {"/vote": post_vote}
