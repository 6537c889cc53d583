"""The pairwise rating study and its web page: assignments, votes, security, and the report."""
import http.client
import os
import sqlite3
import threading
from contextlib import closing
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from emu import EmuError
from emu.evaluation.pairwise import A, B, TIE
from emu.evaluation.rating import RatingServer
from emu.evaluation.study import (TASKS, add_raters, assign, create_study, next_item, open_study, progress, read_votes,
                                  record_vote, study_report)

SCRIPT_PROMPT = '<script>window.pwned = 1</script> a "red" circle & <b>bold</b>'


def make_study(folder, prompts, categories=None):
    """A study of len(prompts) pairs with tiny solid-colour images: A's are red, B's blue."""
    os.makedirs(folder / "images", exist_ok=True)
    pairs = []
    for i, prompt in enumerate(prompts):
        for side, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            Image.new("RGB", (8, 8), colour).save(folder / "images" / f"{i:04d}-{side}.png")
        pairs.append({"prompt": prompt, "category": (categories or ["x"] * len(prompts))[i], "seed": i,
                      "image_a": f"images/{i:04d}-a.png", "image_b": f"images/{i:04d}-b.png"})
    create_study(str(folder), pairs, {"name_a": "tuned", "name_b": "base"})
    return str(folder)


@pytest.fixture
def served(tmp_path):
    """A 4-pair study with 5 raters (appeal 5 per pair, faithfulness 3), served on a free port."""
    folder = make_study(tmp_path, [SCRIPT_PROMPT, "two green squares", "a blue diamond", "three circles"])
    with closing(open_study(folder)) as conn:
        tokens = add_raters(conn, [f"r{i}" for i in range(5)], "human")
        assign(conn, list(tokens), {"appeal": 5, "faithfulness": 3}, seed=0)
    server = RatingServer(folder, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, tokens
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, headers=None):
    """(status, headers, body) of one raw request; the path is sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    headers = {"Host": f"127.0.0.1:{server.server_address[1]}", **(headers or {})}
    data = body.encode() if isinstance(body, str) else body
    if data is not None:
        headers.setdefault("Content-Length", str(len(data)))
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders(data)
    response = conn.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return result


def vote(server, token, item, choice, origin="same", **headers):
    own = f"http://127.0.0.1:{server.server_address[1]}"
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               **({"Origin": own} if origin == "same" else {"Origin": origin} if origin else {}), **headers}
    return request(server, "POST", "/vote", urlencode({"t": token, "item": item, "choice": choice}), headers)


def current_item(server, token):
    with closing(open_study(server.folder)) as conn:
        return next_item(conn, conn.execute("SELECT name FROM raters WHERE token = ?", (token,)).fetchone()[0])


def n_votes(server):
    with closing(open_study(server.folder)) as conn:
        return conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]


# -----------------------------------------------------------------------------
# assignments

def test_every_pair_gets_distinct_raters_and_loads_are_even(tmp_path):
    folder = make_study(tmp_path, [f"prompt {i}" for i in range(11)])
    with closing(open_study(folder)) as conn:
        raters = list(add_raters(conn, [f"r{i}" for i in range(7)], "human"))
        assign(conn, raters, {"appeal": 5, "faithfulness": 3}, seed=3)
        rows = conn.execute("SELECT rater, pair, task, position, a_on_left FROM assignments").fetchall()
    for task, k in (("appeal", 5), ("faithfulness", 3)):
        for pair in range(11):
            who = [r for r, p, t, _, _ in rows if p == pair and t == task]
            assert len(who) == len(set(who)) == k
        loads = [sum(1 for r, _, t, _, _ in rows if r == rater and t == task) for rater in raters]
        assert max(loads) - min(loads) <= 1 and sum(loads) == 11 * k
    for rater in raters:  # appeal first: a rater never sees a caption before judging that pair's appeal
        mine = sorted((pos, t) for r, _, t, pos, _ in rows if r == rater)
        tasks = [t for _, t in mine]
        assert tasks == sorted(tasks, key=lambda t: t != "appeal") and [p for p, _ in mine] == list(range(len(mine)))
    sides = [a for *_, a in rows]
    assert 0.3 < np.mean(sides) < 0.7  # left/right drawn per assignment


def test_too_few_raters_is_a_clear_error(tmp_path):
    folder = make_study(tmp_path, ["a", "b"])
    with closing(open_study(folder)) as conn:
        raters = list(add_raters(conn, ["x", "y", "z"], "human"))
        with pytest.raises(EmuError, match="visual appeal needs 5 distinct raters per pair, but only 3"):
            assign(conn, raters, {"appeal": 5, "faithfulness": 3})


def test_a_rater_continues_where_they_stopped_and_a_repeated_vote_counts_once(tmp_path):
    folder = make_study(tmp_path, ["a", "b", "c"])
    with closing(open_study(folder)) as conn:
        add_raters(conn, ["solo"], "human")
        assign(conn, ["solo"], {"appeal": 1, "faithfulness": 1}, seed=1)
        first = [next_item(conn, "solo")]
        assert record_vote(conn, "solo", first[0]["id"], "left")
        assert not record_vote(conn, "solo", first[0]["id"], "right")  # a resubmitted form: the first vote stands
        first.append(next_item(conn, "solo"))
        assert record_vote(conn, "solo", first[1]["id"], "tie")
    with closing(open_study(folder)) as conn:  # a restart: a fresh connection continues at the third item
        assert progress(conn, "solo") == (2, 6)
        third = next_item(conn, "solo")
        assert third["id"] not in [f["id"] for f in first] and third["task"] == "appeal"
        assert [v["choice"] for v in read_votes(conn, "human")] in (["left", "tie"], ["tie", "left"])


def test_a_study_with_peoples_votes_is_never_overwritten(tmp_path):
    folder = make_study(tmp_path, ["a"])
    with closing(open_study(folder)) as conn:
        add_raters(conn, ["solo"], "human")
        assign(conn, ["solo"], {"appeal": 1})
        record_vote(conn, "solo", next_item(conn, "solo")["id"], "left")
    with pytest.raises(EmuError, match="holds 1 votes by people"):
        make_study(tmp_path, ["b"])
    with open(tmp_path / "junk.sqlite", "wb") as f:
        f.write(b"not a database at all" * 10)
    os.replace(tmp_path / "junk.sqlite", tmp_path / "study.sqlite")
    with pytest.raises(EmuError, match="not a rating study"):
        open_study(folder)


# -----------------------------------------------------------------------------
# the page and its security

def test_the_page_shows_one_pair_with_the_prompt_hidden_for_appeal_and_escaped_for_faithfulness(served):
    server, tokens = served
    with closing(open_study(server.folder)) as conn:
        total = progress(conn, "r0")[1]
    assert total in (6, 7)  # 4 appeal pairs, and 2 or 3 of the 12 faithfulness ratings spread over 5 raters
    status, headers, body = request(server, "GET", f"/rate?t={tokens['r0']}")
    assert status == 200 and f"1 of {total}" in body.decode()
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    assert "circle" not in body.decode() and "squares" not in body.decode()  # appeal: no prompt on the page
    with closing(open_study(server.folder)) as conn:  # answer every appeal pair: the faithfulness pairs come next
        for _ in range(4):
            item = next_item(conn, "r0")
            assert item["task"] == "appeal"
            record_vote(conn, "r0", item["id"], "tie")
        conn.execute("UPDATE pairs SET prompt = ?", (SCRIPT_PROMPT,))
        conn.commit()
    page = request(server, "GET", f"/rate?t={tokens['r0']}")[2].decode()
    assert f"5 of {total}" in page and TASKS["faithfulness"].question in page
    assert "<script>window.pwned" not in page and "<b>bold" not in page
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt; a &quot;red&quot; circle &amp; &lt;b&gt;bold&lt;/b&gt;" in page


def test_images_are_served_only_through_the_raters_own_assignments(served):
    server, tokens = served
    item = current_item(server, tokens["r1"])
    status, headers, png = request(server, "GET", f"/image?t={tokens['r1']}&item={item['id']}&side=left")
    assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
    assert request(server, "GET", f"/image?t={tokens['r2']}&item={item['id']}&side=left")[0] == 404  # not r2's item
    assert request(server, "GET", f"/image?item={item['id']}&side=left")[0] == 403  # no token


@pytest.mark.parametrize("path", [
    "/../study.sqlite", "/static/../study.sqlite", "/%2e%2e/study.sqlite", "/static/%2e%2e%2fstudy.sqlite",
    "/images/0000-a.png", "//etc/passwd", "/etc/passwd", "/static/..%2f..%2fetc%2fpasswd", "/study.sqlite",
    "/image?t={t}&item=../../study.sqlite&side=left", "/image?t={t}&item={i}&side=../../study.sqlite",
    "/image?t={t}&item={i}&side=/etc/passwd", "http://127.0.0.1/../../etc/passwd", "/rate/../../etc/passwd",
])
def test_traversal_attempts_are_refused(served, path):
    server, tokens = served
    path = path.format(t=tokens["r0"], i=current_item(server, tokens["r0"])["id"])
    status, _, body = request(server, "GET", path)
    assert status in (403, 404), (path, status)
    assert b"SQLite" not in body and b"root:" not in body and b"PNG" not in body


def test_an_image_path_outside_the_study_is_refused(served, tmp_path_factory):
    server, tokens = served
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    with closing(open_study(server.folder)) as conn:
        conn.execute("UPDATE pairs SET image_a = ?, image_b = ?", (str(outside), os.path.relpath(outside, server.folder)))
        conn.commit()
    item = current_item(server, tokens["r0"])
    for side in ("left", "right"):
        assert request(server, "GET", f"/image?t={tokens['r0']}&item={item['id']}&side={side}")[0] == 403


def test_a_vote_needs_the_raters_token_and_this_servers_origin(served):
    server, tokens = served
    item = current_item(server, tokens["r3"])["id"]
    own = f"http://127.0.0.1:{server.server_address[1]}"
    assert vote(server, "", item, "left")[0] == 403
    assert vote(server, "not-a-token", item, "left")[0] == 403
    assert vote(server, tokens["r3"], item, "left", origin="http://evil.example")[0] == 403
    assert vote(server, tokens["r3"], item, "left", origin="null")[0] == 403
    assert vote(server, tokens["r3"], item, "left", origin=None)[0] == 403  # neither Origin nor Referer
    assert vote(server, tokens["r3"], item, "left", origin=None, Referer="http://evil.example/rate")[0] == 403
    assert vote(server, tokens["r4"], item, "left")[0] == 400  # a real token, someone else's assignment
    assert vote(server, tokens["r3"], item, "both")[0] == 400  # not a choice of the appeal task
    assert n_votes(server) == 0
    status, headers, _ = vote(server, tokens["r3"], item, "left", origin=None, Referer=f"{own}/rate?t=x")
    assert status == 303 and headers["Location"] == f"/rate?t={tokens['r3']}"
    assert vote(server, tokens["r3"], item, "right")[0] == 303  # a resubmission is answered but not counted
    with closing(open_study(server.folder)) as conn:
        assert [(v["rater"], v["choice"]) for v in read_votes(conn, "human")] == [("r3", "left")]


@pytest.mark.parametrize("method, path, body, headers, status", [
    ("GET", "/rate?t={t}", None, {"Host": "evil.example:80"}, 400),  # DNS rebinding
    ("POST", "/vote", "t={t}&item=1&choice=left", {"Content-Type": "text/plain"}, 415),
    ("POST", "/vote", "x" * 9000, {"Content-Type": "application/x-www-form-urlencoded"}, 413),
    ("POST", "/vote", "%%%&&==", {"Content-Type": "application/x-www-form-urlencoded"}, 400),
    ("POST", "/vote", "t={t}&item=abc&choice=left", {"Content-Type": "application/x-www-form-urlencoded"}, 400),
    ("POST", "/vote", b"t=\xff\xfe", {"Content-Type": "application/x-www-form-urlencoded"}, 400),
    ("POST", "/nowhere", "", {"Content-Type": "application/x-www-form-urlencoded"}, 404),
    ("PUT", "/vote", "", {}, 405),
    ("DELETE", "/rate?t={t}", None, {}, 405),
    ("BREW", "/", None, {}, 405),
    ("GET", "/rate", None, {}, 403),
    ("GET", "/image?t={t}&item=999999&side=left", None, {}, 404),
])
def test_bad_requests_get_a_4xx_and_no_traceback(served, method, path, body, headers, status):
    server, tokens = served
    own = {"Origin": f"http://127.0.0.1:{server.server_address[1]}"}
    body = body.format(t=tokens["r0"]) if isinstance(body, str) else body
    got, _, text = request(server, method, path.format(t=tokens["r0"]), body, {**own, **headers})
    assert got == status and b"Traceback" not in text and b"File \"" not in text


def test_a_malformed_request_line_gets_400(served):
    import socket
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.0 400") and b"Traceback" not in reply


# -----------------------------------------------------------------------------
# the report

def test_report_counts_majorities_per_category_from_hand_made_votes(tmp_path):
    """Six pairs in two categories, five appeal raters with chosen votes. Votes are made on screen
    (left / right) and must come back as votes for the model on that side."""
    folder = make_study(tmp_path, [f"p{i}" for i in range(6)], ["cats", "cats", "cats", "dogs", "dogs", "dogs"])
    wanted = np.array([  # votes for models, rows = raters, columns = pairs
        [A, A, B, TIE, A, B],
        [A, A, B, TIE, B, B],
        [A, B, B, A, TIE, B],
        [B, TIE, A, B, TIE, B],
        [TIE, TIE, A, A, A, B],
    ])  # 3A 1B 1T; 2A 2T 1B (no single top); 3B 2A; 2A 2T 1B; 2A 2T 1B; 5B
    expected = [A, TIE, B, TIE, TIE, B]
    with closing(open_study(folder)) as conn:
        raters = list(add_raters(conn, [f"r{i}" for i in range(5)], "human"))
        assign(conn, raters, {"appeal": 5}, seed=0)
        for (item, rater, pair, a_on_left) in conn.execute("SELECT id, rater, pair, a_on_left FROM assignments").fetchall():
            v = wanted[raters.index(rater), pair]
            record_vote(conn, rater, item, "tie" if v == TIE else "left" if (v == A) == bool(a_on_left) else "right")
        report = study_report(conn, "human", n_boot=200)
    assert [report["outcomes"]["appeal"][p] for p in range(6)] == expected
    overall = report["summary"]["all"]["visual appeal"]
    assert (overall["n"], overall["win"], overall["tie"], overall["lose"]) == (6, pytest.approx(100 / 6), pytest.approx(50.0),
                                                                              pytest.approx(100 / 3))
    cats, dogs = report["summary"]["cats"]["visual appeal"], report["summary"]["dogs"]["visual appeal"]
    assert (cats["win"], cats["tie"], cats["lose"]) == pytest.approx((100 / 3, 100 / 3, 100 / 3))
    assert (dogs["win"], dogs["tie"], dogs["lose"]) == pytest.approx((0.0, 200 / 3, 100 / 3))
    assert report["raters"] == 5 and report["votes"] == 30 and "text faithfulness" not in report["summary"]["all"]


def test_report_waits_for_every_assigned_vote_unless_partial(tmp_path):
    folder = make_study(tmp_path, ["p0", "p1"])
    with closing(open_study(folder)) as conn:
        raters = list(add_raters(conn, ["r0", "r1", "r2"], "human"))
        assign(conn, raters, {"faithfulness": 3}, seed=0)
        items = conn.execute("SELECT id, rater, pair FROM assignments ORDER BY pair, rater").fetchall()
        for item, rater, pair in items[:4]:  # pair 0 complete, pair 1 has one of its three votes
            record_vote(conn, rater, item, "both")
        assert study_report(conn, "human", n_boot=50)["outcomes"]["faithfulness"] == {0: TIE}
        assert study_report(conn, "human", n_boot=50, partial=True)["outcomes"]["faithfulness"] == {0: TIE, 1: TIE}
        agreement = study_report(conn, "human", n_boot=50)["agreement"]["text faithfulness"]
        assert agreement["observed"] == 1.0  # every vote "both"


def test_study_file_is_a_plain_sqlite_database(tmp_path):
    folder = make_study(tmp_path, ["a"])
    with closing(sqlite3.connect(os.path.join(folder, "study.sqlite"))) as conn:
        assert {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
            "pairs", "raters", "assignments", "votes"}
