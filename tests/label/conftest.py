"""Shared fixtures for the labeling app: a seeded SQLite database, tokens, an API client, a live server."""
from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from instructrl.label.app import create_app
from instructrl.label.store import add_labeler, enqueue_tasks

PROMPTS = ["Say hello.", "Name a colour.", "Count to three."]
RESPONSES = [["hello", "hi there", "greetings"], ["red", "blue", "green"], ["1 2 3", "one two three", "3 2 1"]]


@pytest.fixture
def seeded(tmp_path):
    """Three tasks of K = 3 and three labelers; returns db, task ids and tokens."""
    db = str(tmp_path / "label.db")
    ids = enqueue_tasks(db, PROMPTS, RESPONSES)
    tokens = {name: add_labeler(db, name) for name in ("alice", "bob", "carol")}
    return SimpleNamespace(db=db, ids=ids, tokens=tokens)


@pytest.fixture
def auth(seeded):
    """auth("alice") -> the Authorization header of that labeler."""
    return lambda name: {"Authorization": f"Bearer {seeded.tokens[name]}"}


@pytest.fixture
def make_client(seeded):
    """make_client(max_labelers_per_task=3, lease_seconds=600) -> a TestClient over the seeded database."""
    clients = []

    def make(max_labelers_per_task: int = 3, lease_seconds: float = 600) -> TestClient:
        client = TestClient(create_app(seeded.db, max_labelers_per_task, lease_seconds))
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def serve_live():
    """serve_live(app) -> base URL of the app under uvicorn in a thread, on a socket already bound to a free port."""
    import uvicorn

    running = []

    def serve(app) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        running.append((server, thread, sock))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(10)
        sock.close()
