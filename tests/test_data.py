"""The JSONL formats: round trips, and every malformed case stops with file, line and field — exit 2, no output."""
import json
import subprocess
import sys

import pytest

from instructrl.data import (DataError, Ranking, parse_ranking_record, read_demos, read_prompts, read_rankings,
                             read_texts, write_jsonl)


def test_round_trips(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": " r"}])
    assert read_demos(tmp_path / "d.jsonl") == [("q", " r")]
    write_jsonl(tmp_path / "t.jsonl", [{"text": "héllo ✓"}])
    assert read_texts(tmp_path / "t.jsonl") == ["héllo ✓"]
    rec = {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1], "labeler": "x"}
    write_jsonl(tmp_path / "r.jsonl", [rec])
    (r,) = read_rankings(tmp_path / "r.jsonl")
    assert r.groups == [[2], [0, 3], [1]] and r.extra == {"labeler": "x"}
    assert r.to_json() == rec
    assert sorted(r.pairs()) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])


def test_pairs_are_k2_rankings():
    r = parse_ranking_record({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert r.responses == ["good", "bad"] and r.pairs() == [(0, 1)]


CASES = {
    "invalid_json": ('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": \n', 2, None),
    "not_object": ('["a"]\n', 1, None),
    "missing_field": ('{"prompt": "q", "responses": ["a", "b"]}\n', 1, "ranking"),
    "wrong_type": ('{"prompt": 3, "responses": ["a", "b"], "ranking": [0, 1]}\n', 1, "prompt"),
    "not_permutation": ('{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}\n', 1, "ranking"),
    "index_out_of_range": ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}\n', 1, "ranking"),
    "k_below_2": ('{"prompt": "q", "responses": ["a"], "ranking": [0]}\n', 1, "responses"),
    "duplicate_responses": ('{"prompt": "q", "responses": ["a", "a"], "ranking": [0, 1]}\n', 1, "responses"),
    "empty_response": ('{"prompt": "q", "responses": ["a", " "], "ranking": [0, 1]}\n', 1, "responses"),
    "bool_index": ('{"prompt": "q", "responses": ["a", "b"], "ranking": [true, 0]}\n', 1, "ranking"),
    "empty_file": ("", None, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_rankings(tmp_path, name):
    text, line, field = CASES[name]
    f = tmp_path / f"{name}.jsonl"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        read_rankings(f)
    assert e.value.path == str(f) and e.value.line == line and e.value.field == field
    assert str(f) in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_prompts(f)


def test_huge_line_is_refused_without_reading_it_whole(tmp_path):
    f = tmp_path / "huge.jsonl"
    with open(f, "w") as out:
        out.write('{"prompt": "' + "x" * (100 * 1024 * 1024) + '"}\n')
    with pytest.raises(DataError, match=r"huge.jsonl:1: line longer than"):
        read_prompts(f)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "instructrl.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_bad_input_exit_2_and_no_output(tmp_path, tiny_lm_dir):
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "q", "response": "r"}\n{"prompt": "q"}\n')
    out = tmp_path / "out"
    p = run_cli("sft", "--model", tiny_lm_dir, "--data", bad, "--out", out)
    assert p.returncode == 2, p.stderr
    assert "demos.jsonl:2" in p.stderr and "response" in p.stderr
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".out")]


def test_cli_rm_rejects_non_permutation(tmp_path, tiny_sft_dir):
    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]}) + "\n")
    out = tmp_path / "rm"
    p = run_cli("rm", "--model", tiny_sft_dir, "--data", bad, "--out", out)
    assert p.returncode == 2 and "r.jsonl:1" in p.stderr and "ranking" in p.stderr
    assert not out.exists()


def test_ranking_dataclass_to_json_keeps_ties():
    r = Ranking("q", ["a", "b", "c"], [[1, 2], [0]])
    assert r.to_json()["ranking"] == [[1, 2], 0]
