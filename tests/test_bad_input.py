"""The bad-input corpus: every malformed file, through the real command, exits 2 naming file and line, writes nothing."""
import json
import sys

import pytest

from instructrl import cli

LONG_PROMPT = "User: " + " ".join(f"word{i}" for i in range(400)) + "\nAssistant:"
GOOD_RANK = json.dumps({"prompt": "User: hi\nAssistant:", "responses": [" a", " b"], "ranking": [0, 1]})
GOOD_DEMO = json.dumps({"prompt": "User: hi\nAssistant:", "response": " hello"})

# name: (command, file contents (str or bytes), expected line, expected field)
CASES = {
    "demos_invalid_json": ("sft", GOOD_DEMO + '\n{"prompt": "x", \n', 2, None),
    "demos_wrong_type": ("sft", GOOD_DEMO + "\n" + json.dumps({"prompt": "x", "response": 5}) + "\n", 2, "response"),
    "demos_missing_field": ("sft", json.dumps({"prompt": "x"}) + "\n", 1, "response"),
    "demos_empty_response": ("sft", json.dumps({"prompt": "x", "response": ""}) + "\n", 1, "response"),
    "demos_non_utf8": ("sft", GOOD_DEMO.encode() + b'\n{"prompt": "\xc3\x28", "response": "r"}\n', 2, None),
    "demos_empty_file": ("sft", "", None, None),
    "demos_prompt_too_long": ("sft", GOOD_DEMO + "\n\n" + json.dumps({"prompt": LONG_PROMPT, "response": " ok"}) + "\n",
                              3, "prompt"),
    "rankings_not_permutation": ("rm", json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 1, 2]}),
                                 1, "ranking"),
    "rankings_duplicate_responses": ("rm", GOOD_RANK + "\n" + json.dumps(
        {"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}), 2, "responses"),
    "rankings_k_below_2": ("rm", json.dumps({"prompt": "p", "responses": ["a"], "ranking": [0]}), 1, "responses"),
    "rankings_empty_response": ("rm", json.dumps({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}), 1,
                                "responses"),
    "rankings_wrong_type": ("rm", json.dumps({"prompt": "p", "responses": "ab", "ranking": [0, 1]}), 1, "responses"),
    "rankings_missing_field": ("rm", json.dumps({"prompt": "p", "responses": ["a", "b"]}), 1, "ranking"),
    "rankings_invalid_json": ("rm", "{oops}\n", 1, None),
    "rankings_too_long": ("rm", GOOD_RANK + "\n" + json.dumps(
        {"prompt": LONG_PROMPT, "responses": [" a", " b"], "ranking": [1, 0]}), 2, "responses"),
    "pairs_same_text": ("rm", json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}), 1, "rejected"),
    "prompts_missing_field": ("ppo", json.dumps({"text": "x"}) + "\n", 1, "prompt"),
    "prompts_too_long": ("ppo", json.dumps({"prompt": "User: hi\nAssistant:"}) + "\n" +
                         json.dumps({"prompt": LONG_PROMPT}) + "\n", 2, "prompt"),
    "prompts_empty_file": ("ppo", "\n\n", None, None),
    "text_wrong_type": ("pretrain", json.dumps({"text": ["a"]}) + "\n", 1, "text"),
    "text_huge_line": ("pretrain", None, 1, None),  # written in the test: one 100 MB line
}


def command(kind, path, out, models):
    sft_dir, rm_dir = models
    if kind == "sft":
        return ["sft", "--model", sft_dir, "--data", path, "--out", out, "--device", "cpu"]
    if kind == "rm":
        return ["rm", "--model", sft_dir, "--data", path, "--out", out, "--device", "cpu"]
    if kind == "ppo":
        return ["ppo", "--policy", sft_dir, "--reward", rm_dir, "--prompts", path, "--out", out, "--device", "cpu"]
    return ["pretrain", "--corpus", path, "--out", out]


def run_main(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exit_2_names_file_and_line_writes_nothing(name, tmp_path, monkeypatch, capsys, tiny_sft_dir,
                                                             tiny_rm_dir):
    kind, content, line, field = CASES[name]
    path = tmp_path / "in" / f"{name}.jsonl"
    path.parent.mkdir()
    if content is None:
        with open(path, "w") as f:
            f.write('{"text": "' + "x" * (100 * 1024 * 1024) + '"}\n')
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    out = tmp_path / "out"
    code = run_main(monkeypatch, command(kind, path, out, (tiny_sft_dir, tiny_rm_dir)))
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap long lines
    assert code == 2, err
    where = f"{path.name}:{line}" if line else path.name
    assert where in err, err
    if field:
        assert f"'{field}'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "an output or temp directory was left behind"


def test_truncate_prompts_runs_with_a_warning(tmp_path, monkeypatch, tiny_sft_dir, tiny_rm_dir):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "User: hi\nAssistant:"}) + "\n" + json.dumps({"prompt": LONG_PROMPT}) + "\n")
    args = command("ppo", path, tmp_path / "out", (tiny_sft_dir, tiny_rm_dir))
    args += ["--truncate-prompts", "--episodes", 16, "--batch-size", 16, "--max-new-tokens", 8]
    with pytest.warns(UserWarning, match="left-truncated"):
        assert run_main(monkeypatch, args) == 0
    assert (tmp_path / "out" / "summary.json").is_file()


def test_sft_truncate_prompts_warns(tmp_path, monkeypatch, tiny_lm_dir):
    path = tmp_path / "demos.jsonl"
    path.write_text(GOOD_DEMO + "\n" + json.dumps({"prompt": LONG_PROMPT, "response": " ok"}) + "\n" + GOOD_DEMO + "\n")
    args = ["sft", "--model", tiny_lm_dir, "--data", path, "--out", tmp_path / "out", "--device", "cpu",
            "--epochs", 1, "--truncate-prompts"]
    with pytest.warns(UserWarning, match=r"1 demonstration\(s\) longer than the context.*left-truncated"):
        assert run_main(monkeypatch, args) == 0
    assert (tmp_path / "out" / "summary.json").is_file()
