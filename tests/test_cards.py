"""A model card (README.md, Hugging Face form) in every trained output: front matter, base model, data, options,
final metrics and the method's references, from the tiny runs of the shared fixtures and a tiny run per RL method."""
import json
import sys

import pytest
import yaml

from instructrl.cards import CITATIONS


def read_card(out):
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def section(body: str, step: str) -> str:
    [part] = [s for s in body.split("\n## ") if s.split("\n", 1)[0] == step]
    return part


def check_card(out, stage: str, tag: str, base: str | None, data: list[str]):
    front, body = read_card(out)
    summary = json.loads((out / "summary.json").read_text())
    assert front["library_name"] == "transformers" and {"instructrl", "rlhf", tag} <= set(front["tags"])
    assert "base_model" not in front and "datasets" not in front  # local paths: named in the body only
    part = section(body, stage)
    assert f"- **base model**: `{base}`" in part if base else "- **base model**: none" in part
    for d in data:
        assert f"`{d}`" in part, d
    for reference in CITATIONS[stage]:
        assert reference in part
    assert yaml.safe_load(part.split("```yaml\n")[1].split("```")[0]) == summary["config"]
    metrics = part.split("- **final metrics**: ")[1].split("\n")[0]
    return {k: float(v) for k, v in (m.split(" = ") for m in metrics.split(", "))}, front


def test_pretrain_sft_and_reward_outputs_have_cards(tiny_lm_dir, tiny_sft_dir, tiny_rm_dir, world_dir):
    metrics, front = check_card(tiny_lm_dir, "pretrain", "pretrain", None, [str(world_dir / "corpus.jsonl")])
    summary = json.loads((tiny_lm_dir / "summary.json").read_text())
    assert metrics["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert front["pipeline_tag"] == "text-generation"
    metrics, _ = check_card(tiny_sft_dir, "sft", "sft", str(tiny_lm_dir), [str(world_dir / "demos.jsonl")])
    assert metrics["steps"] == json.loads((tiny_sft_dir / "summary.json").read_text())["steps"]
    metrics, front = check_card(tiny_rm_dir, "reward", "reward-model", str(tiny_sft_dir),
                                [str(tiny_rm_dir.parent / "rankings.jsonl"), str(world_dir / "demos.jsonl")])
    assert "pipeline_tag" not in front
    _, body = read_card(tiny_rm_dir)
    assert "normalisation" in section(body, "reward / value model")  # the head's own section is kept beside it


@pytest.mark.parametrize("method", ["ppo", "pg", "grpo", "rloo"])
def test_every_rl_output_has_a_card(method, tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    from instructrl.options import flat_fields
    from instructrl.rl import algorithms, train_rl

    algorithm = algorithms()[method]
    prompts = str(world_dir / "prompts_train.jsonl")
    minibatch = {"minibatch_size": 16} if "minibatch_size" in {f.name for f in flat_fields(algorithm.config)} else {}
    cfg = algorithm.config(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=prompts, episodes=16,
                           batch_size=16, max_new_tokens=8, out=str(tmp_path / method), progress=False,
                           device="cpu", **minibatch)
    summary = train_rl(cfg, algorithm)
    metrics, _ = check_card(tmp_path / method, method, {"pg": "reinforce"}.get(method, method), str(tiny_sft_dir),
                            [prompts])
    assert f"- **reward**: `{tiny_rm_dir}`" in read_card(tmp_path / method)[1]
    assert metrics["objective/score"] == pytest.approx(summary["final"]["objective/score"], rel=1e-5)


def test_dpo_card_names_the_command(tiny_sft_dir, tiny_rm_dir, tmp_path, monkeypatch):
    from instructrl import cli

    rankings, out = tiny_rm_dir.parent / "rankings.jsonl", tmp_path / "dpo"
    args = ["dpo", "--policy", str(tiny_sft_dir), "--data", str(rankings), "--out", str(out), "--batch-size", "8",
            "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/instructrl", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    metrics, _ = check_card(out, "dpo", "dpo", str(tiny_sft_dir), [str(rankings)])
    held_out = json.loads((out / "summary.json").read_text())["held_out"]
    assert metrics["held_out/accuracy"] == pytest.approx(held_out["accuracy"], rel=1e-5)
    assert f"- **command**: `instructrl {' '.join(args)}`" in read_card(out)[1]
