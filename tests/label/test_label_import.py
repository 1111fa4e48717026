"""`label import`, per-labeler shuffling with models hidden, the review and guidelines API, schema 2 → 3."""
from __future__ import annotations

import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from instructrl.label import store
from instructrl.label.app import create_app
from instructrl.label.cli import label_app
from instructrl.label.importer import read_candidates

runner = CliRunner()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_wide_long_and_messages_layouts_give_the_same_tasks(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    wide = write_jsonl(tmp_path / "wide.jsonl", [{"prompt": conv, "responses": ["a", "b"], "models": ["m1", "m2"]}])
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": conv, "completion": "a", "model": "m1"},
                                                 {"prompt": "other", "response": "x", "model": "m1"},
                                                 {"prompt": conv, "completion": "b", "model": "m2"},
                                                 {"prompt": "other", "response": "y", "model": "m2"}])
    whole = write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": conv + [{"role": "assistant", "content": r}], "model": m} for r, m in (("a", "m1"), ("b", "m2"))])
    got = [[(t.prompt, t.responses, t.models) for t in read_candidates(p)] for p in (wide, long, whole)]
    assert got[0] == [(conv, ["a", "b"], ["m1", "m2"])]
    assert got[2] == [(conv, [[{"role": "assistant", "content": r}] for r in "ab"], ["m1", "m2"])]  # as turns
    assert got[1] == [(conv, ["a", "b"], ["m1", "m2"]), ("other", ["x", "y"], ["m1", "m2"])]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "response": "a"}], "row 0: field 'prompt': this prompt has only one response"),
    ([{"prompt": "p", "response": "a", "model": "m1"}, {"prompt": "p", "response": "a", "model": "m2"}],
     "row 1: the same response as at row 0 (models 'm1' and 'm2')"),
    ([{"prompt": "p", "response": "a", "model": "m1"}, {"prompt": "p", "response": "b", "model": None}],
     "row 1: field 'model': has no model name, but other records have one"),
    ([{"prompt": "p", "response": None}], "row 0: field 'response': missing required field"),
])
def test_bad_imports_exit_2_naming_the_row_and_write_nothing(tmp_path, rows, message):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    db = tmp_path / "l.db"
    r = runner.invoke(label_app, ["import", str(tmp_path / "in.parquet"), "--db", str(db)])
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not db.exists()


def test_each_labeler_sees_their_own_order_and_the_export_keeps_the_stored_one(tmp_path):
    db = str(tmp_path / "l.db")
    responses = [f"response {i}" for i in range(6)]
    (task,) = store.enqueue_tasks(db, ["p"], [responses], [[f"model-{i}" for i in range(6)]], shuffle=True)
    client = TestClient(create_app(db, max_labelers_per_task=5))
    shown = {}
    for name in ("ann", "ben", "cat", "dan"):
        headers = {"Authorization": f"Bearer {store.add_labeler(db, name)}"}
        first = client.get("/api/tasks/next", headers=headers).json()["task"]
        assert client.get("/api/tasks/next", headers=headers).json()["task"]["responses"] == first["responses"]
        assert "model" not in json.dumps(first)
        shown[name] = first["responses"]
        # rank in the order shown, flag the one shown last
        r = client.post("/api/rankings", headers=headers,
                        json={"task_id": task, "ranking": list(range(6)), "flags": [{"index": 5, "flag": "toxic"}]})
        assert r.status_code == 201 and r.json()["responses"] == first["responses"]
        mine = client.get("/api/rankings", headers=headers).json()[0]
        assert (mine["responses"], mine["ranking"], mine["flags"]) == (first["responses"], list(range(6)),
                                                                     [{"index": 5, "flag": "toxic"}])
    assert len({tuple(s) for s in shown.values()}) > 1
    from instructrl.label.export import export_records

    for rec in export_records(db):  # stored indices: the ranking puts the responses in the order that labeler saw
        assert rec.responses == responses and rec.extra["models"] == [f"model-{i}" for i in range(6)]
        assert [rec.responses[g[0]] for g in rec.groups] == shown[rec.extra["labeler"]]
        assert rec.extra["flags"] == [{"index": responses.index(shown[rec.extra["labeler"]][5]), "flag": "toxic"}]
    client.close()


def test_review_is_for_reviewers_and_guidelines_for_every_labeler(tmp_path):
    db = str(tmp_path / "l.db")
    store.enqueue_tasks(db, ["p"], [["a", "b"]])
    ann = {"Authorization": f"Bearer {store.add_labeler(db, 'ann', reviewer=True)}"}
    ben = {"Authorization": f"Bearer {store.add_labeler(db, 'ben')}"}
    client = TestClient(create_app(db, guidelines="# Be kind\n<script>x</script>"))
    assert client.get("/api/guidelines", headers=ben).json() == {"markdown": "# Be kind\n<script>x</script>"}
    assert client.get("/api/guidelines").status_code == 401
    assert client.post("/api/rankings", headers=ben, json={"task_id": 1, "ranking": [1, 0]}).status_code == 201
    assert client.get("/api/review", headers=ben).status_code == 403
    review = client.get("/api/review", headers=ann).json()
    assert review["tasks"] == [{"task_id": 1, "prompt": "p", "responses": ["a", "b"], "models": None,
                                "consensus": [1, 0], "mean_ranks": [2.0, 1.0], "labelers": ["ben"],
                                "rankings": [[1, 0]], "agreement": None, "kendall_tau": None, "flags": {}}]
    assert [(l["name"], l["excluded"]) for l in review["labelers"]] == [("ann", False), ("ben", False)]
    for path in ("/guidelines", "/review"):
        page = client.get(path)
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    client.close()


def test_serve_refuses_an_unreadable_guidelines_file(tmp_path):
    db = tmp_path / "l.db"
    store.open_store(str(db)).dispose()
    r = runner.invoke(label_app, ["serve", "--db", str(db), "--guidelines", str(tmp_path / "missing.md")])
    assert r.exit_code == 2 and "missing.md: cannot read it" in r.stderr


def test_a_schema_2_database_is_upgraded_in_place(tmp_path):
    db = str(tmp_path / "v2.db")
    store.enqueue_tasks(db, ["p"], [["a", "b"]])
    token = store.add_labeler(db, "ann")
    with sqlite3.connect(db) as con:  # back to schema 2: without the columns of version 3
        for tbl, col in (("tasks", "prompt_messages"), ("tasks", "models"), ("tasks", "shuffle"),
                         ("labelers", "excluded_at"), ("labelers", "reviewer")):
            con.execute(f"ALTER TABLE {tbl} DROP COLUMN {col}")
        con.execute("UPDATE schema_version SET version = 2")
    client = TestClient(create_app(db, create=False))
    task = client.get("/api/tasks/next", headers={"Authorization": f"Bearer {token}"}).json()["task"]
    assert (task["prompt"], task["responses"]) == ("p", ["a", "b"])
    assert store.exclude_labeler(db, "ann")[2] is False
    with sqlite3.connect(db) as con:
        assert con.execute("select max(version) from schema_version").fetchone()[0] == store.SCHEMA_VERSION
    client.close()


def test_export_refusals_exit_2_and_write_nothing(tmp_path):
    db = str(tmp_path / "l.db")
    conv = [{"role": "user", "content": "hi"}]
    store.enqueue_tasks(db, ["text prompt"], [["a", "b"]])
    store.enqueue_tasks(db, [conv], [["c", "d"]])
    engine = store.open_store(db)
    ann = store.labeler_for_token(engine, store.add_labeler(db, "ann")).id
    for task in (1, 2):
        store.submit_ranking(engine, ann, task, [[1], [0]], [], 3)
    engine.dispose()
    out = tmp_path / "r.parquet"
    r = runner.invoke(label_app, ["export", "--db", db, "--format", "parquet", "--out", str(out)])
    assert r.exit_code == 2 and "cannot be one parquet table" in r.stderr and "export as jsonl" in r.stderr
    r = runner.invoke(label_app, ["export", "--db", db, "--implicit-prompt", "--out", str(out)])
    assert r.exit_code == 2 and "only pairs have an implicit-prompt form" in r.stderr
    r = runner.invoke(label_app, ["export", "--db", db, "--format", "csv", "--out", str(out)])
    assert r.exit_code == 2 and "unknown format 'csv'" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    r = runner.invoke(label_app, ["export", "--db", db, "--format", "pairs", "--implicit-prompt",
                                  "--out", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 0 and "wrote 2 pairs" in r.stderr
    assert [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [
        {"chosen": "\n\nHuman: text prompt\n\nAssistant: b", "rejected": "\n\nHuman: text prompt\n\nAssistant: a",
         "task_id": 1, "labeler": "ann"},
        {"chosen": conv + [{"role": "assistant", "content": "d"}], "rejected": conv + [{"role": "assistant",
                                                                                       "content": "c"}],
         "task_id": 2, "labeler": "ann"}]
    from instructrl.data import read_rankings

    text, chat = read_rankings(tmp_path / "p.jsonl")  # HH's split at the last shared "\n\nAssistant:"
    assert (text.prompt, text.responses) == ("\n\nHuman: text prompt\n\nAssistant:", [" b", " a"])
    assert (chat.prompt, chat.responses) == (conv, [[{"role": "assistant", "content": "d"}],
                                                    [{"role": "assistant", "content": "c"}]])
