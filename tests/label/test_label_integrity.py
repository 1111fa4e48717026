"""Issue 15 in the labeling app: never lose or silently corrupt a labeler's work.

Each test drives the HTTP API or the CLI and checks the status or exit code, the message, and that nothing else
changed: in the database (`snapshot`) or on disk.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from instructrl.data import read_rankings
from instructrl.label import store
from instructrl.label.app import create_app, current_labeler
from instructrl.label.cli import label_app

MiB = 1 << 20
runner = CliRunner()


def invoke(*args):
    return runner.invoke(label_app, [str(a) for a in args])


def snapshot(db: str) -> dict:
    """Every row that records work: what a refused request must leave as it was."""
    with sqlite3.connect(db) as con:
        return {t: con.execute(f"select * from {t} order by 1, 2").fetchall()
                for t in ("tasks", "labelers", "rankings", "answers")}


def rank(client, headers, task_id, ranking):
    return client.post("/api/rankings", headers=headers, json={"task_id": task_id, "ranking": ranking})


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- 1. request size ------------------------------------------------------------------------------------------
def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_declared_too_large_is_413_before_it_is_sent(seeded, serve_live):
    """The client announces 50 MB and sends 4 kB: the answer comes at once, not after waiting for the rest."""
    url = httpx.URL(serve_live(create_app(seeded.db)))
    before = snapshot(seeded.db)
    head = (f"POST /api/rankings HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {seeded.tokens['alice']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * MiB}\r\n\r\n").encode()
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        t0 = time.perf_counter()
        sock.sendall(head + b'{"task_id": 1, "ranking": [' + b"0, " * 1365)
        answer = _read_until_closed(sock)  # the server closes: it does not wait for (or drain) the other 50 MB
        elapsed = time.perf_counter() - t0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert json.loads(body) == {"detail": "request body larger than 1048576 bytes (the server's --max-body-bytes)"}
    assert elapsed < 2
    assert snapshot(seeded.db) == before


@pytest.mark.parametrize("declared", [None, "10"], ids=["no-length", "false-length"])
def test_a_body_without_a_true_length_is_cut_at_the_limit(seeded, declared):
    """Streamed with no Content-Length (or a false one): refused once 1 MiB has arrived, the rest never read."""
    app, before, sent = create_app(seeded.db), snapshot(seeded.db), []

    async def fifty_mb():
        for i in range(800):
            sent.append(i)
            yield b" " * 65536

    async def post():
        headers = {"Authorization": f"Bearer {seeded.tokens['alice']}", "Content-Type": "application/json",
                   **({"Content-Length": declared} if declared else {})}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/api/rankings", content=fifty_mb(), headers=headers)

    r = asyncio.run(post())
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert r.json() == {"detail": "request body larger than 1048576 bytes (the server's --max-body-bytes)"}
    assert len(sent) == MiB // 65536 + 1  # read up to the first chunk past the limit, and no further
    assert snapshot(seeded.db) == before


def test_serve_takes_the_body_limit(seeded, auth, monkeypatch, capsys):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    assert invoke("serve", "--db", seeded.db, "--max-body-bytes", 200).exit_code == 0
    client, before = TestClient(served[0]), snapshot(seeded.db)
    body = json.dumps({"task_id": seeded.ids[0], "ranking": [0, 1, 2]})
    r = client.post("/api/rankings", headers={**auth("alice"), "Content-Type": "application/json"},
                    content=body + " " * 200)
    assert r.status_code == 413 and r.json() == {
        "detail": "request body larger than 200 bytes (the server's --max-body-bytes)"}
    assert snapshot(seeded.db) == before
    r = client.post("/api/rankings", headers={**auth("alice"), "Content-Type": "application/json"}, content=body)
    assert r.status_code == 201
    # a bound of the option: refused where it is parsed, in one line through the `instructrl` entry point
    import sys

    from instructrl import cli

    monkeypatch.setattr(sys, "argv", ["instructrl", "label", "serve", "--db", seeded.db, "--max-body-bytes", "0"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    line = one_line(capsys.readouterr().err)
    assert e.value.code == 2 and line.startswith("error: ") and line.endswith(
        "label serve: Invalid value for '--max-body-bytes': must be >= 1, not 0")


# --- 2. NaN, Infinity, and no echo ----------------------------------------------------------------------------
@pytest.mark.parametrize("body,name", [
    ('{"task_id": 1, "ranking": [0, 1, NaN]}', "NaN"),
    ('{"task_id": Infinity, "ranking": [0, 1, 2]}', "Infinity"),
    ('{"task_id": 1, "ranking": [0, 1, 2], "flags": [{"index": -Infinity, "flag": "toxic"}]}', "-Infinity"),
])
def test_nan_and_infinity_are_422(make_client, auth, seeded, body, name):
    before = snapshot(seeded.db)
    r = make_client().post("/api/rankings", headers={**auth("alice"), "Content-Type": "application/json"},
                           content=body)
    assert r.status_code == 422
    assert r.json() == {"detail": [{"loc": ["body"], "msg": f"invalid JSON: {name} is not a JSON number",
                                    "type": "json_invalid"}]}
    assert snapshot(seeded.db) == before


ECHO = "ECHO" * 100


@pytest.mark.parametrize("body", [
    json.dumps({"task_id": ECHO, "ranking": [0, 1, 2]}),
    json.dumps({"task_id": 1, "ranking": ECHO}),
    json.dumps({"task_id": 1, "ranking": [0, 1, [ECHO]]}),
    json.dumps({"task_id": 1, "ranking": [0, 1, 2], "flags": [{"index": 0, "flag": ECHO}]}),
    json.dumps({"task_id": 1, "ranking": [0, 1, 2], ECHO: 1}),
    json.dumps([ECHO]),
    '{"task_id": 1, "ranking": "' + ECHO,  # not JSON
], ids=["task_id", "ranking", "index", "flag", "extra-key", "not-an-object", "broken-json"])
def test_no_422_echoes_the_request_back(make_client, auth, seeded, body):
    before = snapshot(seeded.db)
    r = make_client().post("/api/rankings", headers={**auth("alice"), "Content-Type": "application/json"},
                           content=body)
    assert r.status_code == 422
    errors = r.json()["detail"]
    assert errors and all(set(e) == {"loc", "msg", "type"} for e in errors)
    assert ECHO not in r.text and len(r.text) < 1000
    assert snapshot(seeded.db) == before


# --- 3. skip and rank exclude each other ----------------------------------------------------------------------
def test_a_skipped_task_cannot_be_ranked_nor_a_ranked_one_skipped(make_client, auth, seeded):
    client = make_client()
    t1, t2, _ = seeded.ids
    assert client.post(f"/api/tasks/{t1}/skip", headers=auth("alice")).status_code == 200
    r = rank(client, auth("alice"), t1, [0, 1, 2])
    assert r.status_code == 409 and r.json() == {"detail": f"you have skipped task {t1}, so you cannot rank it"}
    assert rank(client, auth("alice"), t2, [0, 1, 2]).status_code == 201
    before = snapshot(seeded.db)
    r = client.post(f"/api/tasks/{t2}/skip", headers=auth("alice"))
    assert r.status_code == 409 and r.json() == {"detail": f"you have already ranked task {t2}"}
    assert client.post(f"/api/tasks/{t1}/skip", headers=auth("alice")).status_code == 200  # skipping again: a no-op
    assert snapshot(seeded.db) == before
    assert [(t, kind) for t, _, kind, _ in before["answers"]] == [(t1, "skipped"), (t2, "ranked")]
    me = client.get("/api/me", headers=auth("alice")).json()
    assert (me["done"], me["skipped"], me["remaining"]) == (1, 1, 1)


def test_skip_and_rank_racing_on_one_task_have_one_winner(seeded, auth):
    """Two servers (two processes' worth of engines and locks) on one database; alice skips on one and ranks on the
    other at the same moment, for 40 tasks: exactly one of each pair succeeds, the other is 409."""
    ids = store.enqueue_tasks(seeded.db, [f"race {i}" for i in range(40)], [["a", "b"]] * 40)
    skipper, ranker = TestClient(create_app(seeded.db)), TestClient(create_app(seeded.db))
    headers = auth("alice")

    def race(task_id):
        barrier = threading.Barrier(2)

        def skip():
            barrier.wait()
            return skipper.post(f"/api/tasks/{task_id}/skip", headers=headers)

        def rank():
            barrier.wait()
            return ranker.post("/api/rankings", headers=headers, json={"task_id": task_id, "ranking": [1, 0]})

        with ThreadPoolExecutor(2) as pool:
            s, r = pool.submit(skip), pool.submit(rank)
            return s.result(), r.result()

    for task_id in ids:
        s, r = race(task_id)
        assert sorted((s.status_code, r.status_code)) in ([200, 409], [201, 409]), (s.text, r.text)
        if s.status_code == 409:
            assert s.json() == {"detail": f"you have already ranked task {task_id}"}
        else:
            assert r.json() == {"detail": f"you have skipped task {task_id}, so you cannot rank it"}
    with sqlite3.connect(seeded.db) as con:
        both = con.execute("select count(*) from rankings r join answers a on a.task_id = r.task_id "
                           "and a.labeler_id = r.labeler_id where a.kind = 'skipped'").fetchone()[0]
        ranked = con.execute("select count(*) from rankings").fetchone()[0]
    me = skipper.get("/api/me", headers=headers).json()
    assert both == 0 and me["done"] == ranked and me["done"] + me["skipped"] == 40


# --- 4. deleted labelers, truthful foreign-key failures -------------------------------------------------------
def test_a_deleted_labelers_token_is_401_at_once(make_client, auth, seeded):
    client = make_client()
    assert client.get("/api/me", headers=auth("alice")).status_code == 200
    with sqlite3.connect(seeded.db) as con:
        con.execute("delete from labelers where name = 'alice'")
    before = snapshot(seeded.db)
    for method, path in [("GET", "/api/me"), ("GET", "/api/tasks/next"), ("GET", "/api/rankings"),
                         ("POST", f"/api/tasks/{seeded.ids[0]}/skip")]:
        r = client.request(method, path, headers=auth("alice"))
        assert r.status_code == 401 and r.json() == {"detail": "missing or unknown token"}, path
    r = client.post("/api/rankings", headers=auth("alice"), json={"task_id": seeded.ids[0], "ranking": [0, 1, 2]})
    assert r.status_code == 401
    assert snapshot(seeded.db) == before


def test_a_foreign_key_failure_is_reported_as_what_it_is(make_client, auth, seeded):
    """The labeler vanishes between the token check and the write: 401 "does not exist", not 409 "already ranked"."""
    client = make_client()
    client.app.dependency_overrides[current_labeler] = lambda: store.Labeler(id=999, name="ghost")
    before = snapshot(seeded.db)
    r = client.post("/api/rankings", headers=auth("alice"), json={"task_id": seeded.ids[0], "ranking": [0, 1, 2]})
    assert r.status_code == 401 and r.json() == {"detail": "labeler 999 does not exist"}
    r = client.post(f"/api/tasks/{seeded.ids[0]}/skip", headers=auth("alice"))
    assert r.status_code == 401 and r.json() == {"detail": "labeler 999 does not exist"}
    assert snapshot(seeded.db) == before


# --- 5. concurrent enqueue ------------------------------------------------------------------------------------
def test_concurrent_enqueues_each_get_their_own_ids(tmp_path):
    """Four writers (separate engines: as separate processes) enqueue at once; each gets the ids of its own tasks."""
    db = str(tmp_path / "l.db")
    store.open_store(db).dispose()
    barrier = threading.Barrier(4)

    def enqueue(w):
        barrier.wait()
        return store.enqueue_tasks(db, [f"w{w} p{i}" for i in range(200)], [["a", "b"]] * 200)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(enqueue, range(4)))
    with sqlite3.connect(db) as con:
        prompts = dict(con.execute("select id, prompt from tasks"))
    for w, ids in enumerate(results):
        assert [prompts[i] for i in ids] == [f"w{w} p{i}" for i in range(200)]
    assert sorted(i for ids in results for i in ids) == sorted(prompts)


# --- 6. a locked database -------------------------------------------------------------------------------------
def test_writers_behind_a_locked_database_get_a_fast_503(seeded, serve_live):
    """Another process holds the write lock: five queued writes all answer 503 within about a second, not in turn."""
    base = serve_live(create_app(seeded.db))
    hold = sqlite3.connect(seeded.db, isolation_level=None)
    hold.execute("BEGIN IMMEDIATE")
    before = snapshot(seeded.db)
    t1, t2, t3 = seeded.ids
    calls = [("alice", "POST", "/api/rankings", {"task_id": t1, "ranking": [0, 1, 2]}),
             ("bob", "POST", "/api/rankings", {"task_id": t2, "ranking": [0, 1, 2]}),
             ("carol", "POST", "/api/rankings", {"task_id": t3, "ranking": [0, 1, 2]}),
             ("alice", "POST", f"/api/tasks/{t2}/skip", None),
             ("bob", "GET", "/api/tasks/next", None)]

    def call(name, method, path, body):
        t0 = time.perf_counter()
        r = httpx.request(method, base + path, json=body, timeout=60,
                          headers={"Authorization": f"Bearer {seeded.tokens[name]}"})
        return r, time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(lambda c: call(*c), calls))
        assert snapshot(seeded.db) == before
    finally:
        hold.rollback()
        hold.close()
    for r, seconds in results:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"].startswith("database unavailable, nothing was saved; retry")
        assert seconds < 2.5, [round(s, 2) for _, s in results]
    assert call(*calls[0])[0].status_code == 201  # the lock released, the retry is saved


# --- 7. a mistyped database path ------------------------------------------------------------------------------
def test_serve_refuses_a_missing_database_unless_told_to_create_it(tmp_path, monkeypatch):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    typo = tmp_path / "typo.db"
    r = invoke("serve", "--db", typo)
    assert r.exit_code == 2 and one_line(r.stderr) == (
        f"error: no database at {typo} (only add-labeler, enqueue and serve --create start a new one)")
    assert not typo.exists() and served == [] and os.listdir(tmp_path) == []
    assert invoke("serve", "--db", typo, "--create").exit_code == 0
    assert typo.is_file() and len(served) == 1


# --- 8. revoke ------------------------------------------------------------------------------------------------
def test_revoke_stops_a_token_at_once_and_keeps_the_work(make_client, auth, seeded, tmp_path):
    client = make_client(max_labelers_per_task=1)
    t1, t2, _ = seeded.ids
    assert rank(client, auth("alice"), t1, [2, 1, 0]).status_code == 201
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task"]["id"] == t2  # leased to alice
    r = invoke("revoke", "alice", "--db", seeded.db)
    assert r.exit_code == 0 and one_line(r.stderr) == "labeler 'alice' (id 1) revoked"
    before = snapshot(seeded.db)
    for method, path in [("GET", "/api/me"), ("GET", "/api/tasks/next"), ("GET", "/api/rankings"),
                         ("POST", f"/api/tasks/{t2}/skip")]:
        r = client.request(method, path, headers=auth("alice"))
        assert r.status_code == 401 and r.json() == {"detail": "this token was revoked"}, path
    assert snapshot(seeded.db) == before
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task"]["id"] == t2  # alice's lease is gone
    r = invoke("revoke", "2", "--db", seeded.db)  # by id
    assert r.exit_code == 0 and one_line(r.stderr) == "labeler 'bob' (id 2) revoked"
    assert client.get("/api/me", headers=auth("bob")).status_code == 401
    r = invoke("revoke", "alice", "--db", seeded.db)
    assert r.exit_code == 0 and one_line(r.stderr) == "labeler 'alice' (id 1) was already revoked"
    r = invoke("revoke", "zed", "--db", seeded.db)
    assert r.exit_code == 2 and one_line(r.stderr) == "error: no labeler named 'zed'"
    assert client.get("/api/me", headers=auth("carol")).status_code == 200
    out = tmp_path / "r.jsonl"
    assert invoke("export", "--db", seeded.db, "--out", out).exit_code == 0
    assert [(x.extra["labeler"], x.to_json()["ranking"]) for x in read_rankings(out)] == [("alice", [2, 1, 0])]
    typo = tmp_path / "typo.db"
    assert invoke("revoke", "alice", "--db", typo).exit_code == 2 and not typo.exists()


# --- 9. rankings that compare nothing -------------------------------------------------------------------------
@pytest.mark.parametrize("ranking", [[[0, 1, 2]], [[2, 0, 1]]])
def test_an_all_tied_ranking_is_422(make_client, auth, seeded, ranking):
    before = snapshot(seeded.db)
    r = make_client().post("/api/rankings", headers=auth("alice"), json={"task_id": seeded.ids[0], "ranking": ranking})
    assert r.status_code == 422 and r.json() == {"detail": [{
        "loc": ["body", "ranking"], "msg": "a ranking must order at least two responses; this one ties all 3",
        "type": "value_error"}]}
    assert snapshot(seeded.db) == before


def test_export_leaves_out_all_tied_rankings_stored_before_and_says_so(seeded, tmp_path):
    engine = store.open_store(seeded.db)
    alice, bob = (store.labeler_for_token(engine, seeded.tokens[n]).id for n in ("alice", "bob"))
    store.submit_ranking(engine, alice, seeded.ids[0], [[0, 1, 2]], [], 3)  # what the app used to accept
    store.submit_ranking(engine, bob, seeded.ids[0], [[1], [0, 2]], [], 3)
    engine.dispose()
    out = tmp_path / "r.jsonl"
    r = invoke("export", "--db", seeded.db, "--out", out)
    assert r.exit_code == 0
    assert r.stderr.strip().splitlines() == [
        f"wrote 1 rankings to {out}", "left out 1 rankings that tie all responses (no comparison to learn from)"]
    assert [(x.extra["labeler"], x.groups) for x in read_rankings(out)] == [("bob", [[1], [0, 2]])]


# --- 10. export never clobbers --------------------------------------------------------------------------------
def test_export_to_a_directory_is_one_line_and_writes_nothing(seeded, tmp_path):
    target = tmp_path / "exports"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    listing = sorted(os.listdir(tmp_path))
    r = invoke("export", "--db", seeded.db, "--out", target)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert one_line(r.stderr) == f"error: {target}: is a directory; --out takes a file path"
    assert sorted(os.listdir(tmp_path)) == listing and os.listdir(target) == ["keep.txt"]
    assert invoke("export", "--db", seeded.db, "--out", target, "--overwrite").exit_code == 2
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine\n"


def test_export_never_overwrites_a_file_unless_told_to(make_client, auth, seeded, tmp_path):
    assert make_client().post("/api/rankings", headers=auth("alice"),
                              json={"task_id": seeded.ids[0], "ranking": [0, 1, 2]}).status_code == 201
    out = tmp_path / "rankings.jsonl"
    out.write_text("my precious notes\n")
    listing = sorted(os.listdir(tmp_path))
    r = invoke("export", "--db", seeded.db, "--out", out)
    assert r.exit_code == 2 and one_line(r.stderr) == f"error: {out}: exists; pass --overwrite to replace it"
    assert out.read_text() == "my precious notes\n" and sorted(os.listdir(tmp_path)) == listing
    r = invoke("export", "--db", seeded.db, "--out", out, "--overwrite")
    assert r.exit_code == 0 and len(read_rankings(out)) == 1


# --- 11. file modes follow the umask ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask,export_mode,db_mode", [(0o002, 0o664, 0o644), (0o077, 0o600, 0o600)])
def test_database_and_export_modes_follow_the_umask(tmp_path, umask, export_mode, db_mode):
    """Nothing forces 0600: a new database gets SQLite's 0644 less the umask, an export 0666 less the umask."""
    old = os.umask(umask)
    try:
        db, out = tmp_path / "l.db", tmp_path / "r.jsonl"
        assert invoke("add-labeler", "alice", "--db", db).exit_code == 0
        assert invoke("export", "--db", db, "--out", out).exit_code == 0
    finally:
        os.umask(old)
    assert (db.stat().st_mode & 0o777, out.stat().st_mode & 0o777) == (db_mode, export_mode)


# --- databases from before: schema 1 --------------------------------------------------------------------------
SCHEMA_1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at DATETIME NOT NULL, PRIMARY KEY (version));
CREATE TABLE labelers (id INTEGER NOT NULL, name VARCHAR(100) NOT NULL, token_hash VARCHAR(64) NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id), UNIQUE (name), UNIQUE (token_hash));
CREATE TABLE tasks (id INTEGER NOT NULL, prompt TEXT NOT NULL, responses JSON NOT NULL, n_rankings INTEGER NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id));
CREATE TABLE rankings (id INTEGER NOT NULL, task_id INTEGER NOT NULL, labeler_id INTEGER NOT NULL,
    ranking JSON NOT NULL, flags JSON NOT NULL, created_at DATETIME NOT NULL, PRIMARY KEY (id),
    CONSTRAINT one_ranking_per_labeler UNIQUE (task_id, labeler_id), FOREIGN KEY(task_id) REFERENCES tasks (id),
    FOREIGN KEY(labeler_id) REFERENCES labelers (id));
CREATE TABLE skips (task_id INTEGER NOT NULL, labeler_id INTEGER NOT NULL, created_at DATETIME NOT NULL,
    PRIMARY KEY (task_id, labeler_id), FOREIGN KEY(task_id) REFERENCES tasks (id),
    FOREIGN KEY(labeler_id) REFERENCES labelers (id));
CREATE TABLE assignments (labeler_id INTEGER NOT NULL, task_id INTEGER NOT NULL, expires_at DATETIME NOT NULL,
    PRIMARY KEY (labeler_id), FOREIGN KEY(labeler_id) REFERENCES labelers (id),
    FOREIGN KEY(task_id) REFERENCES tasks (id));
INSERT INTO schema_version VALUES (1, '2025-01-01 00:00:00');
INSERT INTO labelers VALUES (1, 'ann', '{ann}', '2025-01-01 00:00:00'), (2, 'ben', '{ben}', '2025-01-01 00:00:00');
INSERT INTO tasks VALUES (1, 'p1', '["a", "b"]', 1, '2025-01-01 00:00:00'),
    (2, 'p2', '["c", "d"]', 1, '2025-01-01 00:00:00'), (3, 'p3', '["e", "f"]', 0, '2025-01-01 00:00:00');
INSERT INTO rankings VALUES (1, 1, 1, '[[1], [0]]', '[]', '2025-01-01 00:00:01'),
    (2, 2, 1, '[[0], [1]]', '[]', '2025-01-01 00:00:02');
INSERT INTO skips VALUES (1, 2, '2025-01-01 00:00:03'), (2, 1, '2025-01-01 00:00:00');
"""


def test_a_schema_1_database_is_upgraded_in_place(tmp_path):
    """ann ranked tasks 1 and 2 but had also skipped 2 (the race schema 1 allowed); ben skipped task 1."""
    db = str(tmp_path / "old.db")
    with sqlite3.connect(db) as con:
        con.executescript(SCHEMA_1.format(ann=store.hash_token("tok-ann"), ben=store.hash_token("tok-ben")))
    client = TestClient(create_app(db, create=False))
    ann, ben = ({"Authorization": f"Bearer {t}"} for t in ("tok-ann", "tok-ben"))
    me = client.get("/api/me", headers=ann).json()
    assert (me["done"], me["skipped"], me["remaining"]) == (2, 0, 1)  # the ranking wins over the earlier skip
    assert client.get("/api/me", headers=ben).json()["skipped"] == 1
    r = client.post("/api/rankings", headers=ben, json={"task_id": 1, "ranking": [0, 1]})
    assert r.status_code == 409 and r.json() == {"detail": "you have skipped task 1, so you cannot rank it"}
    with sqlite3.connect(db) as con:
        assert con.execute("select max(version) from schema_version").fetchone()[0] == store.SCHEMA_VERSION
        assert con.execute("select count(*) from skips").fetchone()[0] == 2  # left as it was
    assert invoke("revoke", "ann", "--db", db).exit_code == 0
    assert client.get("/api/me", headers=ann).status_code == 401
    store.open_store(db).dispose()  # a second opening finds it upgraded
