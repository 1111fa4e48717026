"""Ranking other models' responses end to end: import 3 models' answers to 20 conversations from parquet, rank them
through the HTTP API as 3 labelers (one disagreeing), then check the consensus, the pairs, the per-model win rates
and `label exclude` against numbers computed by hand, and train `instructrl rm` on the consensus and on the pairs."""
from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from instructrl.data import read_rankings
from instructrl.label.app import create_app
from instructrl.label.cli import label_app
from instructrl.label.export import consensus, model_win_rates, export_records

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the tiny chat model's builder
from test_chat_pipeline import chat_model  # noqa: E402

runner = CliRunner()
MODELS = {"good": "vendor-x-large", "ok": "vendor-y-medium", "bad": "vendor-z-small"}  # never shown to labelers


def invoke(*args):
    r = runner.invoke(label_app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def conversation(i: int) -> list[dict]:
    """A 3-turn conversation that ends with the user's question."""
    return [{"role": "user", "content": f"Hello there {i}"}, {"role": "assistant", "content": "I am fine, thank you."},
            {"role": "user", "content": f"What is two plus {i}?"}]


def answer(quality: str, i: int) -> str:
    return {"good": f"It is {i + 2}.", "ok": f"Maybe {i + 2}, I think.", "bad": "No."}[quality] + f" [{i}]"


# Each labeler's ranking of a task, by quality; bob ties ok and bad on even tasks; carol disagrees with both.
def wanted(labeler: str, i: int) -> list[list[str]]:
    if labeler == "carol":
        return [["bad"], ["ok"], ["good"]]
    if labeler == "bob" and i % 2 == 0:
        return [["good"], ["ok", "bad"]]
    return [["good"], ["ok"], ["bad"]]


@pytest.fixture
def ranked(tmp_path):
    """The imported and ranked database: (db, tokens)."""
    rows = [{"prompt": conversation(i), "response": answer(q, i), "model": MODELS[q]}
            for i in range(20) for q in ("bad", "good", "ok")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "responses.parquet")
    db = tmp_path / "label.db"
    r = invoke("import", tmp_path / "responses.parquet", "--db", db)
    assert "imported 20 tasks (60 responses)" in r.stderr
    tokens = {name: invoke("add-labeler", name, "--db", db).stdout.strip() for name in ("alice", "bob", "carol")}
    client = TestClient(create_app(str(db), max_labelers_per_task=3))
    orders = {}
    for name, token in tokens.items():
        headers = {"Authorization": f"Bearer {token}"}
        while (task := client.get("/api/tasks/next", headers=headers).json()["task"]) is not None:
            payload = json.dumps(task)
            assert "model" not in payload and not any(m in payload for m in MODELS.values())
            assert task["prompt"] == conversation(task["id"] - 1)
            quality = {answer(q, task["id"] - 1): q for q in MODELS}
            shown = [quality[text] for text in task["responses"]]
            orders.setdefault(task["id"], []).append(shown)
            ranking = [[shown.index(q) for q in group] for group in wanted(name, task["id"] - 1)]
            r = client.post("/api/rankings", headers=headers, json={"task_id": task["id"], "ranking": ranking})
            assert r.status_code == 201, r.text
            assert r.json()["responses"] == task["responses"]  # the labeler's own order, back
    client.close()
    assert sorted(orders) == list(range(1, 21)) and all(len(o) == 3 for o in orders.values())
    assert any(len({tuple(o) for o in seen}) > 1 for seen in orders.values())  # each labeler their own order
    return db, tokens


def by_model(record) -> list[list[str]]:
    models = record["models"]
    return [sorted(models[i] for i in ([g] if isinstance(g, int) else g)) for g in record["ranking"]]


def test_consensus_pairs_and_win_rates_match_the_hand_computed_ones(ranked, tmp_path):
    db, _ = ranked
    invoke("export", "--db", db, "--consensus", "--out", tmp_path / "consensus.jsonl")
    records = [json.loads(line) for line in (tmp_path / "consensus.jsonl").read_text().splitlines()]
    assert len(records) == 20
    g, o, b = MODELS["good"], MODELS["ok"], MODELS["bad"]
    for i, rec in enumerate(records):
        assert rec["prompt"] == conversation(i) and rec["labelers"] == ["alice", "bob", "carol"]
        rank = dict(zip(rec["models"], rec["mean_ranks"]))
        if i % 2:  # mean ranks good (1+1+3)/3, ok (2+2+2)/3, bad (3+3+1)/3; agreement (1 + 0 + 0)/3
            assert by_model(rec) == [[g], [o], [b]]
            assert rank == pytest.approx({g: 5 / 3, o: 2, b: 7 / 3})
            assert rec["agreement"] == pytest.approx(1 / 3)
        else:  # bob's tie gives ok and bad 2.5 each: both (2+2.5+2)/3 = (3+2.5+1)/3; agreement (2/3 + 0 + 0)/3
            assert by_model(rec) == [[g], sorted([o, b])]
            assert rank == pytest.approx({g: 5 / 3, o: 13 / 6, b: 13 / 6})
            assert rec["agreement"] == pytest.approx(2 / 9)
    # the same rule on its own: ties kept exactly where the mean ranks are equal
    assert consensus([[[0], [1], [2]], [[0], [1, 2]], [[2], [1], [0]]]) == (
        [[0], [1, 2]], [Fraction(5, 3), Fraction(13, 6), Fraction(13, 6)])

    # per-model win rates, by hand: alice (and bob on odd tasks) puts good > ok > bad, carol the reverse, bob ties
    # ok with bad on the 10 even tasks; each ranking compares each pair of models once
    hand = {g: (40 + 20 + 20, 40, 0), o: (20 + 20 + 10, 20 + 20 + 10 + 10, 10), b: (40, 40 + 20 + 10, 10)}
    want = {m: {"wins": w, "losses": l, "ties": t, "comparisons": 120, "win_rate": (w + t / 2) / 120}
            for m, (w, l, t) in hand.items()}
    assert model_win_rates(export_records(db)) == want
    assert json.loads(invoke("stats", "--db", db, "--json").stdout)["models"] == want
    assert "vendor-x-large" in invoke("stats", "--db", db).stdout

    # pairs: 20 odd-or-even tasks give 3 + 2 consensus pairs each (tied pairs skipped)
    invoke("export", "--db", db, "--consensus", "--format", "pairs", "--out", tmp_path / "pairs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 10 * 3 + 10 * 2
    # task 1 was imported as bad, good, ok: its consensus [good], [bad, ok] gives (good, bad) then (good, ok)
    assert pairs[:2] == [{"prompt": conversation(0), "chosen": answer("good", 0), "rejected": answer(q, 0),
                          "task_id": 1, "chosen_model": g, "rejected_model": MODELS[q]} for q in ("bad", "ok")]
    invoke("export", "--db", db, "--consensus", "--format", "pairs", "--implicit-prompt", "--out",
           tmp_path / "implicit.parquet")
    back = read_rankings(tmp_path / "implicit.parquet")
    turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    assert [(r.prompt, r.responses) for r in back] == [(p["prompt"], [turn(p["chosen"]), turn(p["rejected"])])
                                                       for p in pairs]

    # per-labeler K-way as parquet reads back as the same rankings
    invoke("export", "--db", db, "--format", "parquet", "--out", tmp_path / "all.parquet")
    invoke("export", "--db", db, "--out", tmp_path / "all.jsonl")
    as_table, as_lines = read_rankings(tmp_path / "all.parquet"), read_rankings(tmp_path / "all.jsonl")
    assert len(as_table) == 60 and [(r.prompt, r.responses, r.groups) for r in as_table] == [
        (r.prompt, r.responses, r.groups) for r in as_lines]


def test_exclude_drops_a_labeler_from_exports_and_include_brings_them_back(ranked, tmp_path):
    db, _ = ranked
    r = runner.invoke(label_app, ["exclude", "carol", "--db", str(db)])
    assert r.exit_code == 0 and "is now excluded" in r.stderr
    invoke("export", "--db", db, "--consensus", "--out", tmp_path / "c.jsonl")
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    g, o, b = MODELS["good"], MODELS["ok"], MODELS["bad"]
    # without carol: odd tasks alice = bob (agreement 1); even: ok (2 + 2.5)/2 < bad (3 + 2.5)/2 (agreement 2/3)
    assert all(by_model(rec) == [[g], [o], [b]] and rec["labelers"] == ["alice", "bob"] for rec in records)
    assert [rec["agreement"] for rec in records] == pytest.approx([2 / 3, 1] * 10)
    invoke("export", "--db", db, "--out", tmp_path / "k.jsonl")
    assert {x.extra["labeler"] for x in read_rankings(tmp_path / "k.jsonl")} == {"alice", "bob"}
    stats = json.loads(invoke("stats", "--db", db, "--json").stdout)
    assert [(l["name"], l["rankings"], l["excluded"]) for l in stats["labelers"]] == [
        ("alice", 20, False), ("bob", 20, False), ("carol", 20, True)]  # nothing deleted
    assert "already excluded" in runner.invoke(label_app, ["exclude", "carol", "--db", str(db)]).stderr
    invoke("include", "carol", "--db", db)
    invoke("export", "--db", db, "--out", tmp_path / "k2.jsonl")
    assert len(read_rankings(tmp_path / "k2.jsonl")) == 60


@pytest.mark.slow
def test_rm_and_dpo_train_on_the_consensus_and_on_the_pairs(ranked, tmp_path):
    from instructrl.cli import app

    db, _ = ranked
    base = chat_model(tmp_path / "base")
    for name, args in (("consensus.jsonl", ["--consensus"]),
                       ("pairs.parquet", ["--consensus", "--format", "pairs", "--implicit-prompt"])):
        invoke("export", "--db", db, *args, "--out", tmp_path / name)
        out = tmp_path / f"rm-{name}"
        r = runner.invoke(app, ["rm", "--model", str(base), "--data", str(tmp_path / name), "--out", str(out),
                                "--batch-size", "8", "--device", "cpu", "--no-progress"])
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        # the 20 consensus rankings (50 comparisons), or their 50 pairs, each pair a prompt of its own
        n = 20 if name.endswith(".jsonl") else 50
        assert summary["train_prompts"] + summary["held_out_prompts"] == n, (name, summary)
    r = runner.invoke(app, ["dpo", "--policy", str(base), "--data", str(tmp_path / "consensus.jsonl"), "--out",
                            str(tmp_path / "dpo"), "--batch-size", "8", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dpo" / "summary.json").is_file()
