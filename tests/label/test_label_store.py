"""The database layer, the export and the agreement statistics."""
from __future__ import annotations

import hashlib
import sqlite3
import threading

import pytest

from instructrl.data import DataError, read_rankings
from instructrl.label import store
from instructrl.label.export import compare, compute_stats, export_rankings


@pytest.mark.parametrize("prompts,responses,message", [
    (["p"], [["a", "a"]], "duplicate responses"),
    (["p"], [["a", " "]], "responses[1] must be a non-empty string"),
    (["p"], [["a"]], "K >= 2"),
    ([""], [["a", "b"]], "prompt"),
    (["p", "q"], [["a", "b"]], "2 prompts but 1 response lists"),
])
def test_enqueue_rejects_what_read_rankings_would(tmp_path, prompts, responses, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        store.enqueue_tasks(str(tmp_path / "db.sqlite"), prompts, responses)


def test_enqueue_is_all_or_nothing_and_ids_continue(tmp_path):
    db = str(tmp_path / "db.sqlite")
    assert store.enqueue_tasks(db, ["a", "b"], [["1", "2"], ["3", "4"]]) == [1, 2]
    with pytest.raises(DataError):
        store.enqueue_tasks(db, ["c", "d"], [["5", "6"], ["7", "7"]])
    assert store.enqueue_tasks(db, ["e"], [["8", "9"]]) == [3]


def test_tokens_are_stored_only_as_sha256(tmp_path):
    db = str(tmp_path / "db.sqlite")
    token = store.add_labeler(db, "alice")
    assert len(token) >= 40
    with sqlite3.connect(db) as con:
        rows = con.execute("select name, token_hash from labelers").fetchall()
        dump = "\n".join(con.iterdump())
    assert rows == [("alice", hashlib.sha256(token.encode()).hexdigest())]
    assert token not in dump
    with pytest.raises(store.StoreError, match="already exists"):
        store.add_labeler(db, "alice")
    with pytest.raises(store.StoreError, match="1..100 characters"):
        store.add_labeler(db, "  ")


def test_schema_wal_and_version(tmp_path):
    db = tmp_path / "db.sqlite"
    store.open_store(str(db)).dispose()
    store.open_store(str(db)).dispose()  # idempotent
    with sqlite3.connect(db) as con:
        assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
        assert con.execute("select version from schema_version").fetchall() == [(store.SCHEMA_VERSION,)]
        con.execute("insert into schema_version (version, applied_at) values (99, '2030-01-01')")
    with pytest.raises(store.StoreError, match="newer"):
        store.open_store(str(db))


def test_normalize_url(tmp_path):
    assert store.normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert store.normalize_url(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"


def test_concurrent_submissions_respect_the_cap(tmp_path):
    """Eight labelers race for one task that takes two rankings: exactly two win."""
    db = str(tmp_path / "db.sqlite")
    (task,) = store.enqueue_tasks(db, ["p"], [["a", "b", "c"]])
    engine = store.open_store(db)
    ids = [store.labeler_for_token(engine, store.add_labeler(engine, f"l{i}")).id for i in range(8)]
    results, barrier = [], threading.Barrier(len(ids))

    def go(lid):
        barrier.wait()
        try:
            store.submit_ranking(engine, lid, task, [[0], [1], [2]], [], max_labelers=2)
            results.append("ok")
        except store.Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=go, args=(lid,)) for lid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 6 + ["ok"] * 2
    engine.dispose()
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from rankings").fetchone()[0] == 2
        assert con.execute("select n_rankings from tasks").fetchone()[0] == 2


def test_compare_agreement_and_kendall_tau():
    assert compare([[0], [1], [2]], [[0], [1], [2]]) == (1.0, 1.0)
    assert compare([[0], [1], [2]], [[2], [1], [0]]) == (0.0, -1.0)
    agree, tau = compare([[0, 1], [2]], [[0], [1], [2]])
    assert agree == pytest.approx(2 / 3) and tau == pytest.approx(2 / 6 ** 0.5)
    assert compare([[0, 1]], [[0], [1]]) == (0.0, None)  # an all-tie ranking has no tau


def _rank(engine, lid, task, groups, flags=()):
    store.submit_ranking(engine, lid, task, groups, list(flags), max_labelers=3)


def test_export_is_readable_rankings_and_stats_measure_agreement(tmp_path):
    db = str(tmp_path / "db.sqlite")
    t1, t2 = store.enqueue_tasks(db, ["p1", "p2"], [["a", "b", "c"], ["x", "y"]])
    engine = store.open_store(db)
    a, b, c = (store.labeler_for_token(engine, store.add_labeler(engine, n)).id for n in ("ann", "ben", "cy"))
    _rank(engine, a, t1, [[0], [1], [2]], [{"index": 2, "flag": "toxic"}])
    _rank(engine, b, t1, [[0], [2], [1]])
    _rank(engine, c, t1, [[0], [1], [2]])
    _rank(engine, a, t2, [[1], [0]])
    store.skip_task(engine, b, t2)

    out = tmp_path / "rankings.jsonl"
    assert export_rankings(db, out) == (4, 0)
    records = read_rankings(out)
    assert [(r.extra["labeler"], r.extra["task_id"], r.groups) for r in records] == [
        ("ann", t1, [[0], [1], [2]]), ("ben", t1, [[0], [2], [1]]), ("cy", t1, [[0], [1], [2]]),
        ("ann", t2, [[1], [0]])]
    first = records[0]
    assert first.prompt == "p1" and first.responses == ["a", "b", "c"]
    assert first.extra["flags"] == [{"index": 2, "flag": "toxic"}] and first.extra["labeler_id"] == a
    assert first.extra["created_at"].endswith("+00:00")

    s = compute_stats(db)
    assert (s["tasks"], s["tasks_ranked"], s["tasks_shared"], s["rankings"], s["skips"]) == (2, 2, 1, 4, 1)
    assert s["flags"] == {"toxic": 1}
    # pairs on t1: ann–cy agree fully; ann–ben and ben–cy agree on 2 of 3 response pairs, tau 1/3
    assert s["agreement"]["comparisons"] == 3
    assert s["agreement"]["pairwise_agreement"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert s["agreement"]["kendall_tau"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    ben = next(l for l in s["labelers"] if l["name"] == "ben")
    assert ben["pairwise_agreement"] == pytest.approx(2 / 3) and ben["skips"] == 1 and ben["comparisons"] == 2
    engine.dispose()


def test_export_of_an_empty_database_is_an_empty_file(tmp_path):
    out, db = tmp_path / "r.jsonl", str(tmp_path / "db.sqlite")
    with pytest.raises(store.StoreError, match="no database at"):
        export_rankings(db, out)  # a mistyped path must not become a new empty database
    store.open_store(db).dispose()
    assert export_rankings(db, out) == (0, 0)
    assert out.read_text() == ""


def test_lease_commits_skip_fsync_but_connections_return_durable(tmp_path):
    """Leases commit with synchronous=NORMAL; every pooled connection must be back to FULL for rankings, also
    after concurrent leases (the settings are restored on the very connection that was relaxed)."""
    db = str(tmp_path / "db.sqlite")
    store.enqueue_tasks(db, [f"p{i}" for i in range(100)], [["a", "b"]] * 100)
    engine = store.open_store(db)
    ids = [store.labeler_for_token(engine, store.add_labeler(engine, f"l{i}")).id for i in range(8)]

    def lease(lid):
        for _ in range(20):
            assert store.next_task(engine, lid, max_labelers=3, lease_seconds=0) is not None

    threads = [threading.Thread(target=lease, args=(lid,)) for lid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conns = [engine.connect() for _ in range(12)]  # more than were ever open at once: every pooled one
    assert [c.exec_driver_sql("PRAGMA synchronous").scalar() for c in conns] == [2] * 12  # FULL
    assert {c.exec_driver_sql("PRAGMA busy_timeout").scalar() for c in conns} == {30000}
    for c in conns:
        c.close()
    engine.dispose()
