"""The JSON API: authentication, privacy, validation, conflicts and the per-task cap."""
from __future__ import annotations

import sqlite3

import pytest

ENDPOINTS = [("GET", "/api/me"), ("GET", "/api/tasks/next"), ("POST", "/api/rankings"),
             ("POST", "/api/tasks/1/skip"), ("GET", "/api/rankings")]


def submit(client, headers, task_id, ranking, flags=None):
    body = {"task_id": task_id, "ranking": ranking, **({"flags": flags} if flags is not None else {})}
    return client.post("/api/rankings", headers=headers, json=body)


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Bearer ", "Basic YWxpY2U6eA==", "alice"])
def test_every_api_call_needs_a_valid_token(make_client, method, path, header):
    client = make_client()
    headers = {} if header is None else {"Authorization": header}
    r = client.request(method, path, headers=headers, json={"task_id": 1, "ranking": [0, 1, 2]})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"detail": "missing or unknown token"}


def test_rank_flow_and_progress(make_client, auth, seeded):
    client = make_client()
    me = client.get("/api/me", headers=auth("alice")).json()
    assert me["name"] == "alice" and me["done"] == 0 and me["remaining"] == 3
    task = client.get("/api/tasks/next", headers=auth("alice")).json()["task"]
    assert task["id"] == seeded.ids[0] and task["responses"] == ["hello", "hi there", "greetings"]
    r = submit(client, auth("alice"), task["id"], [2, [0, 1]], [{"index": 0, "flag": "nonsense"}])
    assert r.status_code == 201, r.text
    assert r.json()["ranking"] == [2, [0, 1]] and r.json()["flags"] == [{"index": 0, "flag": "nonsense"}]
    # acknowledged means committed: another connection sees it at once
    with sqlite3.connect(seeded.db) as con:
        assert con.execute("select count(*) from rankings").fetchone()[0] == 1
    me = client.get("/api/me", headers=auth("alice")).json()
    assert (me["done"], me["remaining"]) == (1, 2)
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task"]["id"] == seeded.ids[1]


def test_a_labeler_sees_only_their_own_rankings(make_client, auth, seeded):
    client = make_client()
    assert submit(client, auth("alice"), seeded.ids[0], [0, 1, 2]).status_code == 201
    assert submit(client, auth("bob"), seeded.ids[1], [2, 1, 0]).status_code == 201
    alice = client.get("/api/rankings", headers=auth("alice")).json()
    bob = client.get("/api/rankings", headers=auth("bob")).json()
    assert [(r["task_id"], r["ranking"]) for r in alice] == [(seeded.ids[0], [0, 1, 2])]
    assert [(r["task_id"], r["ranking"]) for r in bob] == [(seeded.ids[1], [2, 1, 0])]
    assert client.get("/api/rankings", headers=auth("carol")).json() == []
    # no parameter selects another labeler: unknown query parameters are ignored, not obeyed
    assert client.get("/api/rankings?labeler=alice&labeler_id=1", headers=auth("carol")).json() == []


@pytest.mark.parametrize("ranking,message", [
    ([0, 0, 1], "not a permutation"),
    ([0, 1, 3], "out of range"),
    ([0, 1], "3 responses but the ranking lists 2"),
    ([0, [1, 2], 3], "3 responses but the ranking lists 4"),
    ([[0, 1, 1]], "not a permutation"),
    ([], "3 responses but the ranking lists 0"),
    ([0, [], 1, 2], "tie group must not be empty"),
])
def test_invalid_rankings_are_422_with_a_clear_message(make_client, auth, seeded, ranking, message):
    r = submit(make_client(), auth("alice"), seeded.ids[0], ranking)
    assert r.status_code == 422
    assert message in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("body", [
    {"task_id": 1, "ranking": "0 1 2"},
    {"task_id": 1, "ranking": [0, 1, True]},
    {"task_id": 1, "ranking": [0, 1, "2"]},
    {"task_id": 1, "ranking": [0, 1, 2.0]},
    {"task_id": "1", "ranking": [0, 1, 2]},
    {"ranking": [0, 1, 2]},
    {"task_id": 1, "ranking": [0, 1, 2], "extra": 1},
    {"task_id": 1, "ranking": [0, 1, 2], "flags": [{"index": 0, "flag": "boring"}]},
    {"task_id": 1, "ranking": [0, 1, 2], "flags": [{"index": 5, "flag": "toxic"}]},
])
def test_malformed_bodies_are_422(make_client, auth, body):
    assert make_client().post("/api/rankings", headers=auth("alice"), json=body).status_code == 422


def test_duplicate_submission_is_409(make_client, auth, seeded):
    client = make_client()
    assert submit(client, auth("alice"), seeded.ids[0], [0, 1, 2]).status_code == 201
    r = submit(client, auth("alice"), seeded.ids[0], [2, 1, 0])
    assert r.status_code == 409 and "already ranked" in r.json()["detail"]
    assert client.get("/api/rankings", headers=auth("alice")).json()[0]["ranking"] == [0, 1, 2]


def test_unknown_task_is_404(make_client, auth):
    client = make_client()
    assert submit(client, auth("alice"), 999, [0, 1, 2]).status_code == 404
    assert client.post("/api/tasks/999/skip", headers=auth("alice")).status_code == 404


def test_max_labelers_per_task(make_client, auth, seeded):
    client = make_client(max_labelers_per_task=2)
    first = seeded.ids[0]
    for name in ("alice", "bob"):
        assert client.get("/api/tasks/next", headers=auth(name)).json()["task"]["id"] == first
        assert submit(client, auth(name), first, [0, 1, 2]).status_code == 201
    assert client.get("/api/tasks/next", headers=auth("carol")).json()["task"]["id"] == seeded.ids[1]
    r = submit(client, auth("carol"), first, [0, 1, 2])
    assert r.status_code == 409 and "already has 2 rankings" in r.json()["detail"]


def test_leases_spread_concurrent_labelers(make_client, auth, seeded):
    client = make_client(max_labelers_per_task=1)
    next_id = lambda name: client.get("/api/tasks/next", headers=auth(name)).json()["task"]["id"]
    assert next_id("alice") == seeded.ids[0]
    assert next_id("bob") == seeded.ids[1]      # task 1 is held for alice
    assert next_id("alice") == seeded.ids[0]    # asking again (a page reload) gives the same task
    assert next_id("carol") == seeded.ids[2]


def test_expired_leases_free_the_task(make_client, auth, seeded):
    client = make_client(max_labelers_per_task=1, lease_seconds=0)
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task"]["id"] == seeded.ids[0]
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task"]["id"] == seeded.ids[0]


def test_skip(make_client, auth, seeded):
    client = make_client()
    a, b, _ = seeded.ids
    r = client.post(f"/api/tasks/{a}/skip", headers=auth("alice"))
    assert r.status_code == 200 and r.json() == {"task_id": a, "skipped": True}
    assert client.post(f"/api/tasks/{a}/skip", headers=auth("alice")).status_code == 200  # idempotent
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task"]["id"] == b
    assert submit(client, auth("alice"), b, [0, 1, 2]).status_code == 201
    assert client.post(f"/api/tasks/{b}/skip", headers=auth("alice")).status_code == 409
    assert client.get("/api/me", headers=auth("alice")).json()["skipped"] == 1
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task"]["id"] == a  # only alice skipped it


def test_no_task_left_is_task_null(make_client, auth, seeded):
    client = make_client()
    for tid in seeded.ids:
        assert submit(client, auth("alice"), tid, [0, 1, 2]).status_code == 201
    r = client.get("/api/tasks/next", headers=auth("alice"))
    assert r.status_code == 200 and r.json() == {"task": None}
    assert client.get("/api/me", headers=auth("alice")).json()["remaining"] == 0


def test_history_paginates_newest_first(make_client, auth, seeded):
    client = make_client()
    for tid in seeded.ids:
        submit(client, auth("alice"), tid, [0, 1, 2])
    page = client.get("/api/rankings?limit=2&offset=1", headers=auth("alice")).json()
    assert [r["task_id"] for r in page] == [seeded.ids[1], seeded.ids[0]]
    assert client.get("/api/rankings?limit=0", headers=auth("alice")).status_code == 422


def test_openapi_documents_the_api(make_client):
    spec = make_client().get("/openapi.json").json()
    assert {"/api/me", "/api/tasks/next", "/api/rankings", "/api/tasks/{task_id}/skip"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    post = spec["paths"]["/api/rankings"]["post"]
    assert {"201", "401", "404", "409", "422"} <= set(post["responses"])


def test_405_lists_every_method_of_the_path(make_client):
    r = make_client().delete("/api/rankings")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def test_page_and_assets_are_served_with_a_strict_csp(make_client):
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/static/app.js").text
    assert "textContent" in js
    assert not any(sink in js for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("))
    assert client.get("/static/style.css").status_code == 200


def test_an_in_memory_sqlalchemy_url_works_through_the_same_code():
    from fastapi.testclient import TestClient

    from instructrl.label.app import create_app
    from instructrl.label.store import add_labeler, enqueue_tasks

    app = create_app("sqlite://")
    enqueue_tasks(app.state.engine, ["p"], [["a", "b"]])
    headers = {"Authorization": f"Bearer {add_labeler(app.state.engine, 'dora')}"}
    with TestClient(app) as client:
        task = client.get("/api/tasks/next", headers=headers).json()["task"]
        assert task["responses"] == ["a", "b"]
        assert client.post("/api/rankings", headers=headers, json={"task_id": task["id"], "ranking": [1, 0]}).status_code == 201
