"""A pairwise rating study on disk: its pairs, its raters, who rates what, and every vote.

One study is one folder: `study.sqlite` and the images it names. `eval_pairs.py` creates it (the
images of both models and the automatic judges' votes); the rating page (emu/evaluation/rating.py) adds
people's votes; the report reads both the same way, so people and judges can be compared.

Tables:

    pairs        one row per prompt: the prompt, its category, the seed, model A's and B's image
    raters       name, secret token (the rater's link), kind: "human" or "judge"
    assignments  one (rater, pair, task) to rate, with the sides the rater sees (a_on_left) and
                 the order in which the rater sees it (position)
    votes        at most one per assignment: the choice the rater made on screen and when

The rater sees two images, left and right, labelled "A" and "B" as in the paper; which model is on
the left is drawn per assignment and recorded, so a vote is stored as what was clicked ("left",
"right", "tie", "both", "neither") and turned into a vote for model A or B only when it is read.
Every vote is written in its own transaction, and a repeated vote for the same assignment is
ignored, so a crash or a restart loses nothing and counts nothing twice.
"""
import os
import secrets
import sqlite3
import time
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from emu import EmuError
from emu.evaluation.pairwise import (BOTH, NEITHER, TIE, A, B, faithfulness_to_ternary, fleiss_kappa, majority_vote,
                                     summarize_outcomes)

STUDY_FILE = "study.sqlite"
SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class Task:
    name: str            # as in the report
    question: str        # as on the page
    choices: tuple       # (stored choice, button label) pairs, in the order shown
    show_prompt: bool    # the paper hides the caption from appeal raters
    raters: int          # distinct raters per pair (paper, section 4.1: 5 for appeal, 3 for faithfulness)


TASKS = {
    "appeal": Task("visual appeal", "Which image is more visually appealing?",
                   (("left", "A"), ("right", "B"), ("tie", "Tie")), show_prompt=False, raters=5),
    "faithfulness": Task("text faithfulness", "Which image better shows the caption? Ignore how appealing the images are.",
                         (("left", "A"), ("right", "B"), ("both", "Both"), ("neither", "Neither")), show_prompt=True,
                         raters=3),
}

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE pairs (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, category TEXT NOT NULL, seed INTEGER,
                    image_a TEXT NOT NULL, image_b TEXT NOT NULL);
CREATE TABLE raters (name TEXT PRIMARY KEY, token TEXT NOT NULL UNIQUE,
                     kind TEXT NOT NULL CHECK (kind IN ('human', 'judge')));
CREATE TABLE assignments (id INTEGER PRIMARY KEY, rater TEXT NOT NULL REFERENCES raters(name),
                          pair INTEGER NOT NULL REFERENCES pairs(id), task TEXT NOT NULL,
                          a_on_left INTEGER NOT NULL, position INTEGER NOT NULL, UNIQUE (rater, pair, task));
CREATE TABLE votes (assignment INTEGER PRIMARY KEY REFERENCES assignments(id), choice TEXT NOT NULL, at REAL NOT NULL);
"""


class VoteError(ValueError):
    """A vote the study refuses: unknown token, someone else's assignment, or a choice the task lacks."""


# -----------------------------------------------------------------------------
# creating and opening a study

def connect(path):
    """A connection with the settings every use wants: foreign keys on, full fsync on commit."""
    conn = sqlite3.connect(path, timeout=30.0)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def create_study(folder, pairs, info):
    """Write a new `study.sqlite` in `folder`.

    :param pairs: dicts with prompt, category, seed and image_a / image_b (paths relative to folder).
    :param info: what the study compares: at least name_a and name_b; strings or numbers.
    Refuses to replace a study that already holds people's votes: that would lose their work.
    """
    path = os.path.join(folder, STUDY_FILE)
    if os.path.exists(path):
        with closing(open_study(folder)) as old:
            n = old.execute("SELECT COUNT(*) FROM votes JOIN assignments ON votes.assignment = assignments.id "
                            "JOIN raters ON assignments.rater = raters.name WHERE raters.kind = 'human'").fetchone()[0]
        if n:
            raise EmuError(f"{path}: holds {n} votes by people; write the new study to another --out")
        os.remove(path)
    with closing(connect(path)) as conn, conn:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", SCHEMA_VERSION), *((k, str(v)) for k, v in info.items())])
        conn.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?)",
                         [(i, p["prompt"], p["category"], p.get("seed"), p["image_a"], p["image_b"]) for i, p in enumerate(pairs)])


def open_study(folder):
    """Open an existing study; a one-line EmuError if the folder holds none."""
    path = os.path.join(folder, STUDY_FILE)
    if not os.path.isfile(path):
        raise EmuError(f"{path}: no rating study here (eval_pairs.py writes one into its --out folder)")
    conn = None
    try:
        conn = connect(path)
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError as e:
        if conn is not None:
            conn.close()
        raise EmuError(f"{path}: not a rating study ({e})") from None
    if version is None or version[0] != SCHEMA_VERSION:
        conn.close()
        raise EmuError(f"{path}: rating study schema {version and version[0]!r}, this code reads {SCHEMA_VERSION!r}")
    return conn


def meta(conn):
    """What the study compares (create_study's info), as strings."""
    return {k: v for k, v in conn.execute("SELECT key, value FROM meta") if k != "schema"}


# -----------------------------------------------------------------------------
# raters and who rates what

def add_raters(conn, names, kind):
    """Create raters with fresh secret tokens: {name: token}. A name may be used once per study."""
    tokens = {name: secrets.token_urlsafe(16) for name in names}
    taken = {r for (r,) in conn.execute("SELECT name FROM raters")} & set(names)
    if taken:
        raise EmuError(f"rater names already in the study: {', '.join(sorted(taken))}")
    with conn:
        conn.executemany("INSERT INTO raters VALUES (?, ?, ?)", [(n, t, kind) for n, t in tokens.items()])
    return tokens


def assign(conn, raters, raters_per_task, seed=0):
    """Give every pair `raters_per_task[task]` distinct raters for each task, spreading the work evenly.

    Each (pair, task) goes to the raters with the least work so far, ties broken at random, so the
    loads differ by at most one item per task. A rater sees all their appeal pairs first, in a random
    order, then their faithfulness pairs: the caption is never shown before the appeal judgment of
    the same pair. Which model is on the left is drawn per assignment.
    """
    rng = np.random.default_rng(seed)
    pair_ids = [p for (p,) in conn.execute("SELECT id FROM pairs ORDER BY id")]
    rows = []
    for task, k in raters_per_task.items():
        if k > len(raters):
            raise EmuError(f"{TASKS[task].name} needs {k} distinct raters per pair, but only {len(raters)} raters were given")
        load = {r: 0 for r in raters}
        items = {r: [] for r in raters}
        for pair in pair_ids:
            order = rng.permutation(len(raters))
            chosen = sorted(order, key=lambda i: load[raters[i]])[:k]  # stable sort: random among equal loads
            for i in chosen:
                load[raters[i]] += 1
                items[raters[i]].append(pair)
        for r in raters:
            for pair in rng.permutation(items[r]).tolist():
                rows.append((r, pair, task, int(rng.random() < 0.5)))
    start = {r: conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM assignments WHERE rater = ?", (r,)).fetchone()[0]
             for r in raters}
    with conn:
        for rater, pair, task, a_on_left in rows:
            conn.execute("INSERT INTO assignments (rater, pair, task, a_on_left, position) VALUES (?, ?, ?, ?, ?)",
                         (rater, pair, task, a_on_left, start[rater]))
            start[rater] += 1


def rater_of(conn, token):
    """The name of the human rater with this token, or None."""
    row = conn.execute("SELECT name FROM raters WHERE token = ? AND kind = 'human'", (token,)).fetchone()
    return row[0] if row else None


def progress(conn, rater):
    """(votes given, assignments in all) of one rater."""
    total, done = conn.execute("SELECT COUNT(*), COUNT(votes.assignment) FROM assignments "
                               "LEFT JOIN votes ON votes.assignment = assignments.id WHERE rater = ?", (rater,)).fetchone()
    return done, total


def next_item(conn, rater):
    """The rater's first assignment without a vote, as a dict, or None when they are done."""
    row = conn.execute("SELECT assignments.id, task, a_on_left, prompt, image_a, image_b FROM assignments "
                       "JOIN pairs ON pairs.id = assignments.pair LEFT JOIN votes ON votes.assignment = assignments.id "
                       "WHERE rater = ? AND votes.assignment IS NULL ORDER BY position LIMIT 1", (rater,)).fetchone()
    if row is None:
        return None
    item_id, task, a_on_left, prompt, image_a, image_b = row
    return {"id": item_id, "task": task, "prompt": prompt,
            "left": image_a if a_on_left else image_b, "right": image_b if a_on_left else image_a}


def image_of(conn, rater, item_id, side):
    """The image path (relative to the study) shown on `side` of one of this rater's assignments, or None."""
    row = conn.execute("SELECT a_on_left, image_a, image_b FROM assignments JOIN pairs ON pairs.id = assignments.pair "
                       "WHERE assignments.id = ? AND rater = ?", (item_id, rater)).fetchone()
    if row is None or side not in ("left", "right"):
        return None
    a_on_left, image_a, image_b = row
    return image_a if (side == "left") == bool(a_on_left) else image_b


def record_vote(conn, rater, item_id, choice, at=None):
    """Store one vote in its own transaction. Returns True if stored, False if this assignment
    already had a vote (a resubmitted form): the first vote stands. Raises VoteError otherwise."""
    row = conn.execute("SELECT task FROM assignments WHERE id = ? AND rater = ?", (item_id, rater)).fetchone()
    if row is None:
        raise VoteError(f"assignment {item_id} is not one of {rater}'s")
    if choice not in dict(TASKS[row[0]].choices):
        raise VoteError(f"{choice!r} is not a choice of the {TASKS[row[0]].name} task")
    with conn:
        cursor = conn.execute("INSERT OR IGNORE INTO votes VALUES (?, ?, ?)", (item_id, choice, time.time() if at is None else at))
    return cursor.rowcount == 1


def add_judge_votes(conn, votes, a_on_left):
    """Store automatic judges' votes as raters of kind "judge", all in one transaction.

    :param votes: {task: (n_judges, n_pairs) votes about the images as shown: +1 = the left one,
        -1 = the right one, 0 = tie, 2 = both, 3 = neither (emu.evaluation.pairwise's encoding, seen from the screen)}.
    :param a_on_left: (n_pairs,) bools, the order every judge saw each pair in.
    """
    on_screen = {A: "left", B: "right", TIE: "tie", BOTH: "both", NEITHER: "neither"}
    with conn:
        for task, task_votes in votes.items():
            for r, judge_votes in enumerate(np.asarray(task_votes)):
                name = f"{task}-judge-{r + 1}"
                conn.execute("INSERT INTO raters VALUES (?, ?, 'judge')", (name, secrets.token_urlsafe(16)))
                for pair, vote in enumerate(judge_votes.tolist()):
                    item = conn.execute("INSERT INTO assignments (rater, pair, task, a_on_left, position) VALUES (?, ?, ?, ?, ?)",
                                        (name, pair, task, int(a_on_left[pair]), pair)).lastrowid
                    conn.execute("INSERT INTO votes VALUES (?, ?, 0.0)", (item, on_screen[vote]))


# -----------------------------------------------------------------------------
# reading the votes back

def vote_for_model(choice, a_on_left):
    """A choice on screen -> a vote in emu.evaluation.pairwise's encoding (A = +1 means model A)."""
    if choice == "left":
        return A if a_on_left else B
    if choice == "right":
        return B if a_on_left else A
    return {"tie": TIE, "both": BOTH, "neither": NEITHER}[choice]


def read_votes(conn, kind):
    """Every vote by raters of one kind, one dict per vote, in pair order."""
    rows = conn.execute("SELECT raters.name, pairs.id, pairs.prompt, pairs.category, assignments.task, "
                        "assignments.a_on_left, votes.choice, votes.at FROM votes "
                        "JOIN assignments ON votes.assignment = assignments.id JOIN raters ON raters.name = assignments.rater "
                        "JOIN pairs ON pairs.id = assignments.pair WHERE raters.kind = ? "
                        "ORDER BY pairs.id, assignments.task, raters.name", (kind,)).fetchall()
    keys = ("rater", "pair", "prompt", "category", "task", "a_on_left", "choice", "at")
    return [{**dict(zip(keys, r)), "vote": vote_for_model(r[6], r[5])} for r in rows]


def assigned_counts(conn, kind):
    """{(pair, task): number of raters of this kind assigned to it}."""
    rows = conn.execute("SELECT pair, task, COUNT(*) FROM assignments JOIN raters ON raters.name = assignments.rater "
                        "WHERE raters.kind = ? GROUP BY pair, task", (kind,))
    return {(pair, task): n for pair, task, n in rows}


def study_report(conn, kind, n_boot=2000, seed=0, partial=False):
    """The votes of one kind of rater ("human" or "judge") summarised as the paper does.

    A pair counts for a task once every rater assigned to it has voted (or, with partial=True, once
    it has any vote); its outcome is the majority vote (emu.evaluation.pairwise.majority_vote, Both and
    Neither counted as ties). Rates and 95% bootstrap intervals are given overall and per prompt
    category; agreement is Fleiss' kappa over the raters' votes for model A / B / Tie / Both / Neither.

    :return: {"kind", "raters", "votes", "outcomes": {task: {pair: outcome}},
              "summary": {category: {task name: summarize_outcomes(...)}},
              "agreement": {task name: {"kappa": k or None, "observed": share of agreeing rater pairs}}}
             (a task appears in "agreement" once some pair has two votes).
    """
    votes = read_votes(conn, kind)
    assigned = assigned_counts(conn, kind)
    category = dict(conn.execute("SELECT id, category FROM pairs"))
    by_item = defaultdict(list)
    for v in votes:
        by_item[(v["pair"], v["task"])].append(v["vote"])
    outcomes = {task: {} for task in TASKS}
    for (pair, task), item_votes in sorted(by_item.items()):
        if partial or len(item_votes) >= assigned[(pair, task)]:
            outcomes[task][pair] = int(majority_vote(faithfulness_to_ternary(item_votes)[:, None])[0])
    categories = sorted(set(category.values()))
    summary = {}
    for cat in ["all"] + (categories if len(categories) > 1 else []):
        for task, results in outcomes.items():
            pairs = [p for p in results if cat == "all" or category[p] == cat]
            if pairs:
                summary.setdefault(cat, {})[TASKS[task].name] = summarize_outcomes(
                    np.array([results[p] for p in pairs]), n_boot=n_boot, seed=seed)
    agreement = {}
    for task in TASKS:
        options = (A, B, TIE, BOTH, NEITHER)
        counts = [[item_votes.count(o) for o in options] for (pair, t), item_votes in by_item.items() if t == task]
        kappa, observed = fleiss_kappa(counts) if counts else (float("nan"), float("nan"))
        if observed == observed:  # some pair has two votes; kappa is None when every vote is the same
            agreement[TASKS[task].name] = {"kappa": kappa if kappa == kappa else None, "observed": observed}
    return {"kind": kind, "raters": len({v["rater"] for v in votes}), "votes": len(votes), "outcomes": outcomes,
            "summary": summary, "agreement": agreement}
