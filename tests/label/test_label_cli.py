"""`instructrl label ...` commands: exit codes, token printing, export/stats, and enqueue from a real policy."""
from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from instructrl.data import read_rankings
from instructrl.label.cli import label_app
from instructrl.label.store import enqueue_tasks, labeler_for_token, open_store, submit_ranking

runner = CliRunner()


def invoke(*args):
    return runner.invoke(label_app, [str(a) for a in args])


def test_add_labeler_prints_a_working_token_once(tmp_path):
    db = tmp_path / "l.db"
    r = invoke("add-labeler", "alice", "--db", db)
    assert r.exit_code == 0, r.output
    token = r.stdout.strip()
    engine = open_store(str(db))
    assert labeler_for_token(engine, token).name == "alice"
    engine.dispose()
    again = invoke("add-labeler", "alice", "--db", db)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_export_and_stats(tmp_path):
    db, out = tmp_path / "l.db", tmp_path / "r.jsonl"
    (task,) = enqueue_tasks(str(db), ["p"], [["a", "b", "c"]])
    engine = open_store(str(db))
    for name, groups in (("ann", [[0], [1], [2]]), ("ben", [[1], [0], [2]])):
        token = invoke("add-labeler", name, "--db", db).stdout.strip()
        submit_ranking(engine, labeler_for_token(engine, token).id, task, groups, [], 3)
    engine.dispose()
    r = invoke("export", "--db", db, "--out", out)
    assert r.exit_code == 0 and "wrote 2 rankings" in r.stderr
    assert [x.extra["labeler"] for x in read_rankings(out)] == ["ann", "ben"]
    stats = json.loads(invoke("stats", "--db", db, "--json").stdout)
    assert stats["agreement"]["pairwise_agreement"] == pytest.approx(2 / 3)
    table = invoke("stats", "--db", db)
    assert table.exit_code == 0 and "ann" in table.stdout and "0.667" in table.stdout


def test_bad_input_exits_2_with_one_clear_line(tmp_path):
    r = invoke("enqueue", "--policy", tmp_path, "--prompts", tmp_path / "missing.jsonl", "--db", tmp_path / "l.db")
    assert r.exit_code == 2 and "file not found" in r.stderr and "Traceback" not in r.output
    r = invoke("enqueue", "--policy", tmp_path, "--prompts", tmp_path / "p.jsonl", "--db", tmp_path / "l.db", "--k", 1)
    assert r.exit_code == 2 and "must be >= 2, not 1" in r.stderr
    r = invoke("export", "--db", tmp_path / "typo.db", "--out", tmp_path / "r.jsonl")
    assert r.exit_code == 2 and "no database at" in r.stderr and not (tmp_path / "typo.db").exists()
    r = invoke("add-labeler", "x", "--db", "sqlite:////nonexistent-dir/x.db")
    assert r.exit_code == 2 and r.stderr.strip() == "error: unable to open database file"


def test_enqueue_samples_k_distinct_responses_from_a_policy(tmp_path):
    from instructrl.models import build_tiny_model, tiny_gpt_config, train_tokenizer

    corpus = [f"the cat number {i} sat on mat {i % 7} and ate {i % 5} fish" for i in range(200)]
    tok = train_tokenizer(corpus, vocab_size=300)
    cfg = tiny_gpt_config(len(tok), tok.eos_token_id, tok.pad_token_id, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    policy = tmp_path / "policy"
    build_tiny_model(cfg).save_pretrained(policy)
    tok.save_pretrained(policy)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat", "a fish", "mat 3"]))
    db = tmp_path / "l.db"
    r = invoke("enqueue", "--policy", policy, "--prompts", prompts, "--db", db, "--k", 3, "--max-new-tokens", 6,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    with sqlite3.connect(db) as con:
        rows = con.execute("select prompt, responses from tasks order by id").fetchall()
    assert [p for p, _ in rows] == ["the cat", "a fish", "mat 3"]
    for _, responses in rows:
        responses = json.loads(responses)
        assert len(responses) == 3 and len(set(responses)) == 3 and all(x.strip() for x in responses)
