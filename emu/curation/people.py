"""The curation funnel's human stages (emu_paper.txt, section 3.3), after the automatic filters.

    generalists   recall: each image goes to a few raters who mark it if it might be exceptional;
                  it stays if ANY of them keeps it (the paper: 200K -> 20K)
    specialists   precision: raters who know photography judge each image against the paper's
                  guidelines, one checklist item each; an item passes when most of the image's
                  specialists tick it, and the image stays only if it passes EVERY item (20K -> 2000)
    captions      a person writes the caption of each kept image (the paper composed "ground-truth
                  captions" for its 2000); the web caption is offered as a start

The stages run in the same rating page as the pairwise evaluation (emu/evaluation/rating.py, through
`CurationStage`, a backend of the page) and store their answers in the funnel's `curation.sqlite`,
one transaction per answer. Each stage's decisions, with the raters who made them, go into the
funnel's decisions table beside the automatic stages', so `why` covers the whole path.

In the toy world `simulate` stands in for the people: the toy judges' measurements of each image,
seen through each simulated rater's own noise.
"""
import html
import json
import os
import secrets
import time
import zlib

import numpy as np

from emu import EmuError
from emu.curation.funnel import FUNNEL_ORDER, HUMAN_STAGES, STORE_FILE, open_store
from emu.datasets.folders import clean_caption, open_rgb
from emu.evaluation.judges import appeal_score, photo_measurements
from emu.evaluation.rating import done_page, page
from emu.evaluation.study import VoteError

# The paper's guideline for photorealistic images, shortened; one checklist item each.
CHECKLIST = (
    ("composition", "Composition", "Follows composition principles (rule of thirds, depth and layering); balanced visual "
                                   "weight; the subject is not obscured, not at an unflattering angle, not crowded by distractions."),
    ("lighting", "Lighting", "Dynamic, balanced light that enhances the image; not artificial or lacklustre, not too dim, "
                             "not overexposed."),
    ("colour", "Color and contrast", "Vibrant colours and strong colour contrast; not monochrome, no single colour "
                                     "dominating the frame."),
    ("subject", "Subject and background", "Depth between subject and background; an uncluttered but not dull background; "
                                          "the subject deliberately placed, whole and sharply detailed."),
    ("subjective", "Subjective assessment", "It tells a compelling story; it could not have been captured much better; it is "
                                            "among the best photos of this content you have seen."),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (name TEXT PRIMARY KEY, token TEXT NOT NULL UNIQUE,
                                   kind TEXT NOT NULL CHECK (kind IN ('human', 'simulated')));
CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, stage TEXT NOT NULL, key TEXT NOT NULL, rater TEXT NOT NULL,
                                  position INTEGER NOT NULL, UNIQUE (stage, key, rater));
CREATE TABLE IF NOT EXISTS answers (task INTEGER PRIMARY KEY REFERENCES tasks(id), answer TEXT NOT NULL, at REAL NOT NULL);
"""


def prepare(conn):
    conn.executescript(SCHEMA)


# -----------------------------------------------------------------------------
# who rates what

def reached(conn, stage):
    """The usable images that every stage before `stage` kept (stages that never ran are passed over)."""
    earlier = FUNNEL_ORDER[:FUNNEL_ORDER.index(stage)]
    rows = conn.execute("SELECT key, stage, kept FROM decisions").fetchall()
    usable = {k for k, s, kept in rows if s == "usable" and kept}
    dropped = {k for k, s, kept in rows if s in earlier and not kept}
    return sorted(usable - dropped)


def add_raters(conn, names, kind):
    """New raters with secret tokens: {name: token}."""
    taken = {n for (n,) in conn.execute("SELECT name FROM raters")} & set(names)
    if taken:
        raise EmuError(f"rater names already in the funnel: {', '.join(sorted(taken))}")
    tokens = {n: secrets.token_urlsafe(16) for n in names}
    with conn:
        conn.executemany("INSERT INTO raters VALUES (?, ?, ?)", [(n, t, kind) for n, t in tokens.items()])
    return tokens


def assign(conn, stage, raters, per_image, seed=0):
    """Give each image that reached `stage` and has no task there yet `per_image` distinct raters,
    spreading the work evenly (the least loaded first, ties at random). Returns the number of images."""
    if per_image > len(raters):
        raise EmuError(f"{stage}: {per_image} raters per image, but only {len(raters)} raters")
    if stage not in HUMAN_STAGES:
        raise EmuError(f"{stage}: not a human stage ({', '.join(HUMAN_STAGES)})")
    done = {k for (k,) in conn.execute("SELECT DISTINCT key FROM tasks WHERE stage = ?", (stage,))}
    keys = [k for k in reached(conn, stage) if k not in done]
    rng = np.random.default_rng(seed)
    load = {r: conn.execute("SELECT COUNT(*) FROM tasks WHERE rater = ?", (r,)).fetchone()[0] for r in raters}
    rows = []
    for key in rng.permutation(keys).tolist():  # each rater sees their images in a random order
        chosen = sorted(rng.permutation(len(raters)), key=lambda i: load[raters[i]])[:per_image]
        for i in chosen:
            rows.append((stage, key, raters[i], load[raters[i]]))
            load[raters[i]] += 1
    with conn:
        conn.executemany("INSERT INTO tasks (stage, key, rater, position) VALUES (?, ?, ?, ?)", rows)
    return len(keys)


def pending(conn, stage):
    """How many of the stage's tasks still have no answer."""
    return conn.execute("SELECT COUNT(*) FROM tasks LEFT JOIN answers ON answers.task = tasks.id "
                        "WHERE stage = ? AND answers.task IS NULL", (stage,)).fetchone()[0]


# -----------------------------------------------------------------------------
# answers

def check_answer(stage, answer):
    """The answer in its stored form, or VoteError: generalists {"keep": bool}; specialists
    {item: bool for every checklist item}; captions {"caption": str}."""
    if stage == "generalists":
        if set(answer) != {"keep"} or not isinstance(answer["keep"], bool):
            raise VoteError("a generalist answers keep: true or false")
        return answer
    if stage == "specialists":
        items = {k for k, _, _ in CHECKLIST}
        if set(answer) != items or not all(isinstance(v, bool) for v in answer.values()):
            raise VoteError(f"a specialist answers every checklist item: {', '.join(sorted(items))}")
        return answer
    caption = clean_caption(answer.get("caption", "")) if isinstance(answer.get("caption"), str) else ""
    if not caption or len(caption) > 1000:
        raise VoteError("a caption must have 1 to 1000 characters")
    return {"caption": caption}


def record_answer(conn, rater, task_id, answer, at=None):
    """Store one answer in its own transaction; the first answer to a task stands. True if stored."""
    row = conn.execute("SELECT stage FROM tasks WHERE id = ? AND rater = ?", (task_id, rater)).fetchone()
    if row is None:
        raise VoteError(f"task {task_id} is not one of {rater}'s")
    answer = check_answer(row[0], answer)
    with conn:
        cursor = conn.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?)",
                              (task_id, json.dumps(answer), time.time() if at is None else at))
    return cursor.rowcount == 1


def decide(conn, stage):
    """Write the stage's decisions for the images whose raters have all answered.

    :return: (decided, kept, waiting): images decided, of them kept, images still waiting for answers.
    """
    rows = conn.execute("SELECT tasks.key, tasks.rater, answers.answer FROM tasks LEFT JOIN answers ON answers.task = tasks.id "
                        "WHERE stage = ? ORDER BY tasks.key, tasks.rater", (stage,)).fetchall()
    by_key = {}
    for key, rater, answer in rows:
        by_key.setdefault(key, []).append((rater, None if answer is None else json.loads(answer)))
    current = set(reached(conn, stage))
    decisions, waiting = [], 0
    for key, answers in by_key.items():
        if key not in current:
            continue  # an automatic threshold changed since: the image no longer reaches this stage
        if any(a is None for _, a in answers):
            waiting += 1
            continue
        decisions.append((key, stage, *verdict(stage, answers)))
    with conn:
        conn.execute("DELETE FROM decisions WHERE stage = ?", (stage,))
        conn.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?)", decisions)
    return len(decisions), sum(d[2] for d in decisions), waiting


def verdict(stage, answers):
    """(kept, why) of one image from its raters' answers [(rater, answer)]."""
    names = ", ".join(r for r, _ in answers)
    if stage == "generalists":
        keepers = [r for r, a in answers if a["keep"]]
        return (1, f"kept by {', '.join(keepers)}") if keepers else (0, f"no generalist kept it ({names})")
    if stage == "specialists":
        failed = [label for item, label, _ in CHECKLIST if 2 * sum(a[item] for _, a in answers) <= len(answers)]
        return (1, f"passes every guideline ({names})") if not failed else (0, f"fails {', '.join(failed).lower()} ({names})")
    rater, answer = answers[0]
    return 1, f"caption by {rater}: {answer['caption']}"


def human_captions(conn):
    """{key: caption} written in the captions stage."""
    rows = conn.execute("SELECT tasks.key, answers.answer FROM tasks JOIN answers ON answers.task = tasks.id "
                        "WHERE stage = 'captions'")
    return {k: json.loads(a)["caption"] for k, a in rows}


# -----------------------------------------------------------------------------
# simulated raters for the toy world

# The simulated specialists' bar for each checklist item: about the 10th percentile of the toy world's
# needles on the measurement standing for the item (measured on 2000 toy images), so a true needle
# passes each item nine times in ten; the generalists keep what looks better than 90% of the haystack.
SIMULATED_BARS = {"composition": 0.95, "lighting": 0.5, "colour": 0.3, "subject": 0.7, "subjective": 0.68}
SIMULATED_KEEP = 0.6
TOY_SIZE = 32  # the judges' measurements are calibrated on the toy world's 32 x 32 images


def simulate(conn, stage, n_raters, per_image, seed=0, noise=0.05):
    """Toy-world people: raters named sim-<stage>-N answer every open task of the stage.

    A generalist keeps an image whose appeal score (the toy judges' mean of six measurements) it sees
    above SIMULATED_KEEP; a specialist ticks a checklist item whose measurement it sees above the
    item's SIMULATED_BARS; a caption writer writes the toy world's accurate caption (key.json
    "true_caption") when there is one and keeps the web caption otherwise. "Sees": the measurement
    plus the rater's own N(0, noise) error, drawn from a generator seeded by (seed, rater, image).
    """
    names = [f"sim-{stage}-{i + 1}" for i in range(n_raters)]
    known = {n for (n,) in conn.execute("SELECT name FROM raters")}
    add_raters(conn, [n for n in names if n not in known], "simulated")
    assign(conn, stage, names, per_image, seed=seed)
    tasks = conn.execute("SELECT tasks.id, tasks.key, tasks.rater FROM tasks LEFT JOIN answers ON answers.task = tasks.id "
                         "WHERE stage = ? AND rater LIKE 'sim-%' AND answers.task IS NULL ORDER BY tasks.id", (stage,)).fetchall()
    files = dict(conn.execute("SELECT key, file FROM images"))
    captions = dict(conn.execute("SELECT key, caption FROM images"))
    keys = sorted({k for _, k, _ in tasks})
    images = np.stack([np.asarray(open_rgb(files[k]).resize((TOY_SIZE, TOY_SIZE))) for k in keys]) if keys else None
    measures = {}
    if keys:
        m = photo_measurements(images)
        subject = np.mean([m["sharpness"], m["clutter"], m["noise"]], axis=0)
        table = {"composition": m["composition"], "lighting": m["exposure"], "colour": m["contrast"], "subject": subject,
                 "subjective": appeal_score(images)}
        measures = {k: {item: float(v[i]) for item, v in table.items()} for i, k in enumerate(keys)}
    for task_id, key, rater in tasks:
        rng = np.random.default_rng([seed, int(rater.rsplit("-", 1)[1]), zlib.crc32(key.encode())])
        if stage == "generalists":
            answer = {"keep": bool(measures[key]["subjective"] + rng.normal(0, noise) > SIMULATED_KEEP)}
        elif stage == "specialists":
            answer = {item: bool(measures[key][item] + rng.normal(0, noise) > SIMULATED_BARS[item]) for item, _, _ in CHECKLIST}
        else:
            answer = {"caption": true_caption(files[key]) or captions[key]}
        record_answer(conn, rater, task_id, answer, at=0.0)
    return len(tasks)


def true_caption(image_file):
    """The toy world's accurate caption from the image's key.json, or None."""
    try:
        with open(image_file.rsplit(".", 1)[0] + ".json") as f:
            return json.load(f).get("true_caption")
    except (OSError, ValueError):
        return None


# -----------------------------------------------------------------------------
# the page: a backend of emu/evaluation/rating.py's server

class CurationStage:
    """Serves one human stage of the funnel to people through the rating page."""

    def __init__(self, folder, stage):
        self.folder, self.stage = folder, stage
        self.db_path = os.path.join(folder, STORE_FILE)

    def connect(self):
        conn = open_store(self.folder)
        prepare(conn)
        return conn

    def rater(self, conn, token):
        row = conn.execute("SELECT name FROM raters WHERE token = ? AND kind = 'human'", (token,)).fetchone()
        return row[0] if row else None

    def next_task(self, conn, rater):
        return conn.execute("SELECT tasks.id, tasks.key, images.caption FROM tasks JOIN images ON images.key = tasks.key "
                            "LEFT JOIN answers ON answers.task = tasks.id WHERE rater = ? AND stage = ? AND answers.task IS NULL "
                            "ORDER BY position LIMIT 1", (rater, self.stage)).fetchone()

    def page(self, conn, token, rater):
        total, done = conn.execute("SELECT COUNT(*), COUNT(answers.task) FROM tasks LEFT JOIN answers ON answers.task = tasks.id "
                                   "WHERE rater = ? AND stage = ?", (rater, self.stage)).fetchone()
        task = self.next_task(conn, rater)
        if task is None:
            return done_page(rater, total)
        task_id, key, caption = task
        t = html.escape(token, quote=True)
        image = f'<div class="single"><img src="/image?t={t}&amp;item={task_id}" alt="the image to judge"></div>'
        hidden = f'<input type="hidden" name="t" value="{t}"><input type="hidden" name="item" value="{task_id}">'
        if self.stage == "generalists":
            question = "Could this image be among the exceptional ones? When in doubt, keep it."
            form = (f'<form class="vote" method="post" action="/vote">{hidden}'
                    '<button type="submit" name="keep" value="yes">Keep<kbd>1</kbd></button>'
                    '<button type="submit" name="keep" value="no">Drop<kbd>2</kbd></button></form>')
        elif self.stage == "specialists":
            question = "Tick each guideline the image meets. It is kept only if it meets them all."
            items = "".join(f'<label class="check"><input type="checkbox" name="{item}" value="yes"> <b>{label}</b>: '
                            f'{html.escape(text)}</label>' for item, label, text in CHECKLIST)
            form = (f'<form class="checklist" method="post" action="/vote">{hidden}{items}'
                    '<button type="submit" name="done" value="1">Save</button></form>')
        else:
            question = "Write the caption: what the image shows, accurately, in one sentence."
            form = (f'<form class="caption" method="post" action="/vote">{hidden}'
                    f'<textarea name="caption" rows="3" maxlength="1000" required>{html.escape(caption or "")}</textarea>'
                    '<button type="submit" name="done" value="1">Save</button></form>')
        return page(f"{self.stage}: {done + 1} of {total}", f"""
<header><span id="progress">{done + 1} of {total}</span><span>{html.escape(rater)} &middot; {self.stage}</span></header>
<h1 id="question">{html.escape(question)}</h1>{image}{form}""")

    def image(self, conn, rater, query):
        item = query.get("item", "")
        if not item.isdigit():
            return None
        row = conn.execute("SELECT images.file FROM tasks JOIN images ON images.key = tasks.key "
                           "WHERE tasks.id = ? AND rater = ?", (int(item), rater)).fetchone()
        return None if row is None else row[0]

    def vote(self, conn, rater, form):
        if not form.get("item", "").isdigit():
            raise VoteError("bad item")
        if self.stage == "generalists":
            if form.get("keep") not in ("yes", "no"):
                raise VoteError("keep must be yes or no")
            answer = {"keep": form["keep"] == "yes"}
        elif self.stage == "specialists":
            answer = {item: form.get(item) == "yes" for item, _, _ in CHECKLIST}
        else:
            answer = {"caption": form.get("caption", "")}
        record_answer(conn, rater, int(form["item"]), answer)


# -----------------------------------------------------------------------------
# the end of the funnel

def final_keys(conn):
    """The images through the whole funnel: past every automatic stage that ran, and kept by every
    human stage that has tasks (an image still waiting for answers is not through)."""
    keys = reached(conn, "captions")
    for stage in HUMAN_STAGES:
        if conn.execute("SELECT 1 FROM tasks WHERE stage = ? LIMIT 1", (stage,)).fetchone():
            kept = {k for (k,) in conn.execute("SELECT key FROM decisions WHERE stage = ? AND kept = 1", (stage,))}
            keys = [k for k in keys if k in kept]
    return keys
