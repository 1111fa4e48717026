"""The user-mistake corpus: ordinary mistakes with every command (paths, roles, values, data, config, resume,
concurrency), each through the real CLI. Each must exit 2 with a one-line message naming the option, file or key,
print no traceback, and leave every file the user has exactly as it was (the tree's hashes before and after)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instructrl import cli
from instructrl.config import load_pipeline_config

LONG_PROMPT = "User: " + " ".join(f"word{i}" for i in range(400)) + "\nAssistant:"


def tree(*roots) -> dict:
    """Every file and directory under the roots: path → sha256 (files) or 'dir'."""
    out = {}
    for root in roots:
        root = Path(root)
        for p in sorted(root.rglob("*")):
            key = str(p)
            out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code


@pytest.fixture
def proj(tmp_path, world_dir, tiny_sft_dir):
    """A user's project: data files, notes, a finished SFT output, a world directory with a file of theirs."""
    p = tmp_path / "proj"
    p.mkdir()
    shutil.copy(world_dir / "demos.jsonl", p / "demos.jsonl")
    shutil.copy(world_dir / "prompts_eval.jsonl", p / "prompts.jsonl")
    (p / "notes.txt").write_text("my notes\n")
    (p / "wdir").mkdir()
    (p / "wdir" / "keep.txt").write_text("keep me\n")
    shutil.copytree(tiny_sft_dir, p / "sft_done")
    (p / "config_only").mkdir()
    for f in Path(tiny_sft_dir).iterdir():  # the tokenizer and config.json, not the weights
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, p / "config_only" / f.name)
    (p / "tied.jsonl").write_text(json.dumps({"prompt": "User: hi\nAssistant:", "responses": [" a", " b"],
                                              "ranking": [0, 1]}) + "\n" +
                                  json.dumps({"prompt": "User: yo\nAssistant:", "responses": [" a", " b", " c"],
                                              "ranking": [[0, 1, 2]]}) + "\n")
    (p / "ranked.jsonl").write_text(json.dumps({"prompt": "User: hi\nAssistant:", "responses": [" a", " b"],
                                                "ranking": [0, 1]}) + "\n")
    (p / "long_prompts.jsonl").write_text(json.dumps({"prompt": "User: hi\nAssistant:"}) + "\n"
                                          + json.dumps({"prompt": LONG_PROMPT}) + "\n")
    (p / "bad_demos.jsonl").write_text('{"prompt": "x"}\n')
    (p / "userrun").mkdir()  # a directory of the user's that looks like a run's: their own config and report
    (p / "userrun" / "config.yaml").write_text("seed: 1\n")
    (p / "userrun" / "report.json").write_text("{}\n")
    (p / "pipe.yaml").write_text(f"data: {{demos: {p / 'demos.jsonl'}}}\n")
    from instructrl.label import store

    store.open_store(str(p / "labels.db")).dispose()
    return p


# name: (args with {proj}/{sft}/{rm}/{lm}/{world} placeholders, what the message must say)
SFT = ["sft", "--model", "{lm}", "--data", "{proj}/demos.jsonl", "--device", "cpu"]
PPO = ["ppo", "--policy", "{sft}", "--reward", "{rm}", "--prompts", "{proj}/prompts.jsonl", "--device", "cpu"]
PG = ["pg", "--policy", "{sft}", "--reward", "{rm}", "--prompts", "{proj}/prompts.jsonl", "--device", "cpu"]
RM = ["rm", "--model", "{sft}", "--data", "{proj}/tied.jsonl", "--device", "cpu"]
EVAL = ["eval", "--model", "{sft}", "--prompts", "{proj}/prompts.jsonl", "--device", "cpu"]
PRE = ["pretrain", "--corpus", "{world}/corpus.jsonl"]
WORLD = ["world"]
GRPO = ["grpo"] + PPO[1:]
RLOO = ["rloo"] + PPO[1:]
DPO = ["dpo", "--policy", "{sft}", "--data", "{proj}/tied.jsonl", "--device", "cpu"]
SIM = ["label", "simulate", "--policy", "{sft}", "--prompts", "{proj}/prompts.jsonl", "--world", "{world}"]
EXPORT = ["label", "export", "--db", "{proj}/labels.db"]
PIPE = ["pipeline", "--config", "{proj}/pipe.yaml"]
CASES = {
    # paths: never replace what the user made, never write over the inputs, never look a local path up on a hub
    "out_contains_the_input": (["sft", "--model", "{lm}", "--data", "{proj}/demos.jsonl", "--out", "{proj}"],
                               "contains the input"),
    "world_out_with_user_file": (WORLD + ["--out", "{proj}/wdir"], "other files in it"),
    "out_is_an_existing_file": (SFT + ["--out", "{proj}/notes.txt"], "is an existing file"),
    "out_parent_is_a_file": (SFT + ["--out", "{proj}/notes.txt/model"], "is a file, not a directory"),
    "out_is_another_steps_output": (RM + ["--out", "{proj}/sft_done"],
                                    "holds a finished 'sft' output"),
    "out_finished_without_overwrite": (SFT + ["--out", "{proj}/sft_done"], "pass --overwrite"),
    "model_path_missing": (["sft", "--model", "{proj}/no_such_model", "--data", "{proj}/demos.jsonl",
                            "--out", "{proj}/o"], "no such directory"),
    "model_hub_name": (["sft", "--model", "gpt2-typo/not-here", "--data", "{proj}/demos.jsonl",
                        "--out", "{proj}/o"], "nothing is downloaded"),
    "model_config_without_weights": (["eval", "--model", "{proj}/config_only", "--prompts", "{proj}/prompts.jsonl"],
                                     "no weights"),
    "reward_path_missing": (PPO[:4] + ["{proj}/no_rm"] + PPO[5:] + ["--out", "{proj}/o"], "no such directory"),
    "data_file_missing": (["sft", "--model", "{lm}", "--data", "{proj}/demoz.jsonl", "--out", "{proj}/o"],
                          "demoz.jsonl"),
    "prompts_file_missing": (EVAL[:4] + ["{proj}/nope.jsonl"], "nope.jsonl"),
    # roles: a reward model is not a policy, a language model is not a reward model
    "ppo_policy_is_a_reward_model": (["ppo", "--policy", "{rm}"] + PPO[3:] + ["--out", "{proj}/o"],
                                     "a reward model"),
    "pg_ref_is_a_reward_model": (PG + ["--ref", "{rm}", "--out", "{proj}/o", "--baseline", "mean"],
                                 "a reward model"),
    "sample_model_is_a_reward_model": (["sample", "--model", "{rm}", "--prompts", "{proj}/prompts.jsonl",
                                        "--device", "cpu"], "a reward model"),
    "eval_model_is_a_reward_model": (["eval", "--model", "{rm}", "--prompts", "{proj}/prompts.jsonl"],
                                     "a reward model"),
    "eval_reference_is_a_reward_model": (EVAL + ["--reference", "{rm}"], "a reward model"),
    "sft_from_a_reward_model": (["sft", "--model", "{rm}", "--data", "{proj}/demos.jsonl", "--out", "{proj}/o"],
                                "a reward model"),
    "ppo_reward_is_a_language_model": (PPO[:4] + ["{sft}"] + PPO[5:] + ["--out", "{proj}/o"],
                                       "no trained reward head"),
    "label_enqueue_policy_is_a_reward_model": (["label", "enqueue", "--policy", "{rm}", "--prompts",
                                                "{proj}/prompts.jsonl", "--db", "{proj}/o.db", "--device", "cpu"],
                                               "a reward model"),
    # values
    "sft_negative_epochs": (SFT + ["--out", "{proj}/o", "--epochs", "-1"], "--epochs must be >= 0"),
    "sft_val_fraction_above_one": (SFT + ["--out", "{proj}/o", "--val-fraction", "1.5"], "--val-fraction must be < 1"),
    "sft_zero_batch": (SFT + ["--out", "{proj}/o", "--batch-size", "0"], "--batch-size must be >= 1"),
    "sft_zero_lr": (SFT + ["--out", "{proj}/o", "--lr", "0"], "--lr must be > 0"),
    "sft_lora_dropout_one": (SFT + ["--out", "{proj}/o", "--lora-dropout", "1.0"], "--lora-dropout must be < 1"),
    "sft_negative_save_every": (SFT + ["--out", "{proj}/o", "--save-every", "-1"], "--save-every must be >= 0"),
    "sft_unknown_dtype": (SFT + ["--out", "{proj}/o", "--dtype", "float8"], "unknown dtype"),
    "ppo_episodes_below_batch": (PPO + ["--out", "{proj}/o", "--episodes", "8", "--batch-size", "16"],
                                 "--episodes (8) must be at least --batch-size (16)"),
    "ppo_zero_batch": (PPO + ["--out", "{proj}/o", "--batch-size", "0"], "--batch-size must be >= 1"),
    "ppo_zero_minibatch": (PPO + ["--out", "{proj}/o", "--minibatch-size", "0"], "--minibatch-size must be >= 1"),
    "ppo_batch_not_multiple_of_minibatch": (PPO + ["--out", "{proj}/o", "--batch-size", "30", "--minibatch-size",
                                                   "8"], "must be a multiple of --minibatch-size"),
    "ppo_zero_max_new_tokens": (PPO + ["--out", "{proj}/o", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "ppo_zero_temperature": (PPO + ["--out", "{proj}/o", "--temperature", "0"], "--temperature must be > 0"),
    "ppo_unknown_kl_estimator": (PPO + ["--out", "{proj}/o", "--kl-estimator", "k9"], "--kl-estimator must be one of"),
    "ppo_ptx_without_data": (PPO + ["--out", "{proj}/o", "--ptx-coef", "0.5"], "--ptx-coef > 0 needs --ptx-data"),
    "ppo_gamma_above_one": (PPO + ["--out", "{proj}/o", "--gamma", "1.5"], "--gamma must be <= 1"),
    "pg_loo_k_not_dividing_batch": (PG + ["--out", "{proj}/o", "--baseline", "loo", "--samples-per-prompt", "3",
                                          "--batch-size", "16", "--episodes", "16"], "--baseline loo needs --samples-per-prompt >= 2"),
    "rm_zero_batch": (RM + ["--out", "{proj}/o", "--batch-size", "0"], "--batch-size must be >= 1"),
    "rm_zero_epochs": (RM + ["--out", "{proj}/o", "--epochs", "0"], "--epochs must be > 0"),
    "eval_greedy_with_reference": (EVAL + ["--temperature", "0", "--reference", "{sft}"], "--temperature 0"),
    "eval_zero_max_new_tokens": (EVAL + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "sample_zero_max_new_tokens": (["sample", "--model", "{sft}", "--prompts", "{proj}/prompts.jsonl",
                                    "--max-new-tokens", "0"], "max-new-tokens"),
    "pretrain_heads_not_dividing_width": (PRE + ["--out", "{proj}/o", "--n-embd", "64", "--n-head", "3"],
                                          "--n-embd 64 must be a multiple of --n-head 3"),
    "pretrain_block_beyond_context": (PRE + ["--out", "{proj}/o", "--block-size", "256", "--n-positions", "128"],
                                      "--block-size 256 must be at most --n-positions 128"),
    "world_share_above_one": (WORLD + ["--out", "{proj}/w2", "--p-rude", "1.5"], "--p-rude must be <= 1"),
    "label_simulate_k_one": (["label", "simulate", "--policy", "{sft}", "--prompts", "{proj}/prompts.jsonl",
                              "--out", "{proj}/r.jsonl", "--world", "{world}", "--k", "1"], "'--k': must be >= 2"),
    # data
    "rm_all_tied_ranking": (RM + ["--out", "{proj}/o"], "tied.jsonl:2"),
    "dpo_all_tied_ranking": (["dpo", "--policy", "{sft}", "--data", "{proj}/tied.jsonl", "--device", "cpu", "--out",
                              "{proj}/o"], "tied.jsonl:2"),
    "eval_prompt_too_long": (EVAL[:4] + ["{proj}/long_prompts.jsonl"], "long_prompts.jsonl:2"),
    "sft_demo_missing_response": (["sft", "--model", "{lm}", "--data", "{proj}/bad_demos.jsonl", "--out", "{proj}/o"],
                                  "bad_demos.jsonl:1"),
    # the labeling tool
    "label_stats_missing_db": (["label", "stats", "--db", "{proj}/typo.db"], "typo.db"),
    "label_export_missing_db": (["label", "export", "--db", "{proj}/typo.db", "--out", "{proj}/r.jsonl"], "typo.db"),
    # every command that writes: refused before any work when its output would replace what the user has or
    # lie inside an input
    "eval_out_is_its_prompts": (EVAL + ["--out", "{proj}/prompts.jsonl"], "contains the input"),
    "eval_out_is_an_existing_file": (EVAL + ["--out", "{proj}/notes.txt"], "exists; refusing to replace it"),
    "eval_out_is_a_directory": (EVAL + ["--out", "{proj}/wdir"], "is a directory"),
    "eval_out_inside_the_model": (EVAL + ["--out", "{sft}/eval.json"], "is inside the input"),
    "eval_out_parent_is_a_file": (EVAL + ["--out", "{proj}/notes.txt/e.json"], "is a file, not a directory"),
    "label_simulate_out_is_the_worlds_demos": (SIM + ["--out", "{world}/demos.jsonl"], "is inside the input"),
    "label_simulate_out_is_its_prompts": (SIM + ["--out", "{proj}/prompts.jsonl"], "contains the input"),
    "label_simulate_out_is_an_existing_file": (SIM + ["--out", "{proj}/demos.jsonl"], "exists; refusing"),
    "label_simulate_out_is_a_directory": (SIM + ["--out", "{proj}/wdir"], "is a directory"),
    "label_simulate_prompts_missing": (SIM[:5] + ["{proj}/nope.jsonl"] + SIM[6:] + ["--out", "{proj}/r.jsonl"],
                                       "nope.jsonl"),
    "label_export_over_its_database": (EXPORT + ["--out", "{proj}/labels.db", "--overwrite"], "contains the input"),
    "label_export_over_a_file": (EXPORT + ["--out", "{proj}/notes.txt"], "exists; pass --overwrite"),
    "label_export_into_a_directory": (EXPORT + ["--out", "{proj}/wdir"], "is a directory"),
    "pipeline_out_is_a_users_directory": (PIPE + ["--out", "{proj}/userrun"], "not a pipeline run"),
    "pipeline_seeds_out_is_a_users_directory": (PIPE + ["--seeds", "2", "--out", "{proj}/userrun"],
                                                "not a pipeline run"),
    "pipeline_out_is_a_file": (PIPE + ["--out", "{proj}/notes.txt"], "is an existing file"),
    "pipeline_out_contains_its_data": (PIPE + ["--out", "{proj}"], "contains the input"),
    "pipeline_out_is_a_step_output": (PIPE + ["--out", "{proj}/sft_done"], "not a pipeline run"),
    "pipeline_config_missing": (["pipeline", "--config", "{proj}/nope.yaml", "--out", "{proj}/run"], "nope.yaml"),
    # the trainers' outputs and inputs, every command
    "sft_out_with_user_files": (SFT + ["--out", "{proj}/wdir"], "other files in it"),
    "sft_out_inside_the_model": (SFT + ["--out", "{lm}/sft"], "is inside the input"),
    "rm_out_inside_the_model": (RM + ["--out", "{sft}/rm"], "is inside the input"),
    "rm_data_missing": (RM[:4] + ["{proj}/nope.jsonl"] + RM[5:] + ["--out", "{proj}/o"], "nope.jsonl"),
    "pretrain_out_is_an_existing_file": (PRE + ["--out", "{proj}/notes.txt"], "is an existing file"),
    "pretrain_corpus_missing": (["pretrain", "--corpus", "{proj}/nope.jsonl", "--out", "{proj}/o"], "nope.jsonl"),
    "world_out_is_an_existing_file": (WORLD + ["--out", "{proj}/notes.txt"], "is an existing file"),
    "ppo_out_inside_the_reward_model": (PPO + ["--out", "{rm}/ppo"], "is inside the input"),
    "pg_out_is_another_steps_output": (PG + ["--out", "{proj}/sft_done"], "holds a finished 'sft' output"),
    "grpo_out_is_an_existing_file": (GRPO + ["--out", "{proj}/notes.txt"], "is an existing file"),
    "grpo_out_is_its_policy": (GRPO + ["--out", "{sft}"], "contains the input"),
    "grpo_policy_is_a_reward_model": (["grpo", "--policy", "{rm}"] + GRPO[3:] + ["--out", "{proj}/o"],
                                      "a reward model"),
    "grpo_reward_path_missing": (GRPO[:4] + ["{proj}/no_rm"] + GRPO[5:] + ["--out", "{proj}/o"], "no such directory"),
    "rloo_out_is_another_steps_output": (RLOO + ["--out", "{proj}/sft_done"], "holds a finished 'sft' output"),
    "rloo_out_with_user_files": (RLOO + ["--out", "{proj}/wdir"], "other files in it"),
    "rloo_prompts_missing": (RLOO[:6] + ["{proj}/nope.jsonl"] + RLOO[7:] + ["--out", "{proj}/o"], "nope.jsonl"),
    "rloo_reward_is_a_language_model": (RLOO[:4] + ["{sft}"] + RLOO[5:] + ["--out", "{proj}/o"],
                                        "no trained reward head"),
    "dpo_out_is_an_existing_file": (DPO + ["--out", "{proj}/notes.txt"], "is an existing file"),
    "dpo_out_inside_the_policy": (DPO + ["--out", "{sft}/dpo"], "is inside the input"),
    "dpo_data_missing": (DPO[:4] + ["{proj}/nope.jsonl"] + DPO[5:] + ["--out", "{proj}/o"], "nope.jsonl"),
    "dpo_policy_is_a_reward_model": (["dpo", "--policy", "{rm}", "--data", "{proj}/ranked.jsonl", "--device", "cpu",
                                      "--out", "{proj}/o"], "a reward model"),
    "dpo_out_contains_its_data": (DPO + ["--out", "{proj}"], "contains the input"),
    "serve_rm_reward_missing": (["serve-rm", "--reward", "{proj}/no_rm", "--device", "cpu"], "no such directory"),
    "serve_rm_reward_is_a_language_model": (["serve-rm", "--reward", "{sft}", "--device", "cpu"],
                                            "no trained reward head"),
}


@pytest.fixture
def fill(proj, tiny_lm_dir, tiny_sft_dir, tiny_rm_dir, world_dir):
    names = {"proj": proj, "lm": tiny_lm_dir, "sft": tiny_sft_dir, "rm": tiny_rm_dir, "world": world_dir}
    return lambda args: [a.format(**names) for a in args]


@pytest.mark.parametrize("name", sorted(CASES))
def test_mistake_exits_2_with_one_line_and_changes_nothing(name, fill, proj, tmp_path, tiny_lm_dir, tiny_sft_dir,
                                                           tiny_rm_dir, world_dir, monkeypatch, capsys):
    args, message = CASES[name]
    roots = tmp_path, tiny_lm_dir, tiny_sft_dir, tiny_rm_dir, world_dir
    before = tree(*roots)
    code = run_main(monkeypatch, fill(args))
    raw = capsys.readouterr().err
    err = " ".join(raw.split())  # rich may wrap long lines
    assert code == 2, err
    assert "Traceback" not in err, err
    assert message in err, err
    assert len([line for line in raw.splitlines() if line.strip()]) == 1, raw  # one line, nothing else
    assert tree(*roots) == before, "a file was written, changed or removed"


def test_corpus_is_large():
    assert len(CASES) + len(PIPELINE_CASES) >= 90


def test_unwritable_out_parent(proj, monkeypatch, capsys, fill):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = proj / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = tree(proj)
        assert run_main(monkeypatch, fill(SFT + ["--out", "{proj}/locked/o"])) == 2
        assert "cannot write" in capsys.readouterr().err
        assert tree(proj) == before
    finally:
        locked.chmod(0o755)


# --- pipeline configs: refused before any stage runs (the run directory is not even created) ------------------
PIPELINE_CASES = {
    "yaml_zero_batch": ("ppo: {batch_size: 0}\n", "ppo.batch_size must be >= 1"),
    "yaml_zero_minibatch": ("ppo: {minibatch_size: 0}\n", "ppo.minibatch_size must be >= 1"),
    "yaml_batch_not_multiple": ("ppo: {batch_size: 30, minibatch_size: 8}\n",
                                "ppo.batch_size 30 must be a multiple of ppo.minibatch_size 8"),
    "yaml_negative_epochs": ("sft: {epochs: -1}\n", "sft.epochs must be >= 0"),
    "yaml_val_fraction": ("reward: {val_fraction: 1.5}\n", "reward.val_fraction must be < 1"),
    "yaml_episodes_below_batch": ("ppo: {episodes: 16, batch_size: 64}\n", "ppo.episodes (16) must be at least"),
    "yaml_label_k_one": ("label: {k: 1}\n", "label.k must be >= 2"),
    "yaml_eval_greedy": ("eval: {temperature: 0.0}\n", "eval.temperature 0"),
    "yaml_missing_data_file": ("data: {demos: nowhere.jsonl}\n", "data.demos: nowhere.jsonl: no such file"),
    "yaml_base_model_is_reward_model": ("base_model: {rm}\n", "a reward model"),
}


@pytest.mark.parametrize("name", sorted(PIPELINE_CASES))
def test_pipeline_config_mistake_refused_before_any_stage(name, tmp_path, tiny_rm_dir, monkeypatch, capsys):
    text, message = PIPELINE_CASES[name]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.replace("{rm}", str(tiny_rm_dir)))
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert run_main(monkeypatch, ["pipeline", "--config", cfg, "--out", tmp_path / "run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err, err
    assert tree(tmp_path) == before


def test_pipeline_refuses_to_reuse_a_changed_stage(tmp_path, tiny_sft_dir, monkeypatch, capsys):
    """A finished world stage, then its options change: refused before anything runs, naming the change; with
    --rerun-changed it is recomputed."""
    bad = tmp_path / "bad_demos.jsonl"
    bad.write_text('{"prompt": "x"}\n')  # the SFT stage stops on it, after the world stage finished
    cfg = tmp_path / "c.yaml"
    world = "world: {n_corpus: 300, n_corpus_val: 20, n_demos: 20, n_prompts_train: 20, n_prompts_eval: 10}\n"
    cfg.write_text(f"base_model: {tiny_sft_dir}\ndevice: cpu\ndata: {{demos: {bad}}}\n{world}")
    out = tmp_path / "run"
    assert run_main(monkeypatch, ["pipeline", "--config", cfg, "--out", out]) == 2
    assert (out / "world" / "summary.json").is_file() and "world" in json.loads((out / "fingerprints.json").read_text())
    capsys.readouterr()
    cfg.write_text(cfg.read_text().replace("n_corpus: 300", "n_corpus: 400"))
    before = tree(tmp_path)
    assert run_main(monkeypatch, ["pipeline", "--config", cfg, "--out", out]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "world.n_corpus 300 → 400" in err and "--rerun-changed" in err and "Traceback" not in err, err
    assert tree(tmp_path) == before, "config.yaml or a stage was rewritten"
    # asked to: the world is recomputed with the new setting (then SFT stops on the bad demos again)
    assert run_main(monkeypatch, ["pipeline", "--config", cfg, "--out", out, "--rerun-changed"]) == 2
    assert json.loads((out / "world" / "summary.json").read_text())["corpus"] == 400
    assert "n_corpus: 400" in (out / "config.yaml").read_text()
    assert load_pipeline_config(out / "config.yaml").world.n_corpus == 400  # the run's config is a valid --config


# --- resume ------------------------------------------------------------------------------------------------------
@pytest.fixture
def interrupted_sft(tmp_path, tiny_lm_dir, world_dir):
    """An SFT run that left checkpoints (its output removed, as if it was stopped before the end)."""
    data = tmp_path / "demos.jsonl"
    shutil.copy(world_dir / "demos.jsonl", data)
    args = ["sft", "--model", tiny_lm_dir, "--data", data, "--epochs", 1, "--batch-size", 32, "--save-every", 1,
            "--lr", "1e-3", "--device", "cpu", "--no-progress"]
    out = tmp_path / "o"
    from instructrl.sft import SFTConfig, sft

    sft(SFTConfig(model=str(tiny_lm_dir), data=str(data), out=str(out), epochs=1, batch_size=32, save_every=1,
                  lr=1e-3, device="cpu", progress=False))
    shutil.rmtree(out)
    assert any(p.name.startswith("step-") for p in (tmp_path / "o-checkpoints").iterdir())
    return args, out, data


def test_resume_with_other_data_is_refused(interrupted_sft, tmp_path, monkeypatch, capsys):
    args, out, data = interrupted_sft
    other = tmp_path / "other.jsonl"
    other.write_text("".join(data.read_text().splitlines(keepends=True)[:60]))
    args = [other if a == data else a for a in args]
    before = tree(tmp_path)
    assert run_main(monkeypatch, [*args, "--out", out, "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "belong to a run with other settings" in err and "changed" in err and "Traceback" not in err, err
    assert tree(tmp_path) == before


def test_resume_with_other_lr_is_refused_naming_it(interrupted_sft, tmp_path, monkeypatch, capsys):
    args, out, _ = interrupted_sft
    args = ["2e-3" if a == "1e-3" else a for a in args]
    before = tree(tmp_path)
    assert run_main(monkeypatch, [*args, "--out", out, "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--lr 0.001 → 0.002" in err and "Traceback" not in err, err
    assert tree(tmp_path) == before


def test_fresh_run_over_old_checkpoints_is_refused(interrupted_sft, tmp_path, monkeypatch, capsys):
    args, out, _ = interrupted_sft
    before = tree(tmp_path)
    assert run_main(monkeypatch, [*args, "--out", out]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds checkpoints of an earlier run" in err and "--resume" in err, err
    assert tree(tmp_path) == before


def test_resume_without_checkpoint_says_so(tmp_path, tiny_lm_dir, world_dir, monkeypatch, capsys):
    args = ["sft", "--model", tiny_lm_dir, "--data", world_dir / "demos.jsonl", "--epochs", 1, "--batch-size", 64,
            "--device", "cpu", "--no-progress", "--out", tmp_path / "o", "--resume"]
    assert run_main(monkeypatch, args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no checkpoint in" in err and "starting from the beginning" in err, err
    assert (tmp_path / "o" / "summary.json").is_file()


# --- concurrency and Ctrl-C ---------------------------------------------------------------------------------------
def test_two_runs_on_one_out_exactly_one_proceeds_then_ctrl_c(tmp_path, tiny_lm_dir, world_dir):
    """A second run on the same --out stops at once (exit 2) while the first goes on; Ctrl-C on the first then
    exits 130 saying where its checkpoints are and how to resume, and leaves no OUT."""
    import signal

    out, ckpt, lock = tmp_path / "o", tmp_path / "o-checkpoints", tmp_path / ".o.lock"
    args = [sys.executable, "-m", "instructrl.cli", "sft", "--model", str(tiny_lm_dir), "--data",
            str(world_dir / "demos.jsonl"), "--epochs", "1000", "--patience", "100000", "--batch-size", "8", "--device",
            "cpu", "--save-every", "5", "--out", str(out)]  # a patience that never stops it early: Ctrl-C does
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C as in a terminal: a test run started as a background job of a non-interactive shell inherits SIGINT
    # ignored, and Python then keeps ignoring it
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not (lock.exists() and ckpt.is_dir() and any(x.name.startswith("step-") for x in ckpt.iterdir())):
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    t0 = time.time()
    second = subprocess.run(args, capture_output=True, text=True, env=env)
    took = time.time() - t0
    assert second.returncode == 2, second.stderr
    assert "another run is writing" in second.stderr and "Traceback" not in second.stderr, second.stderr
    assert first.poll() is None, "the first run should still be running"
    assert took < 60
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    err = " ".join(err.split())
    assert first.returncode == 130, err
    assert f"checkpoints in {ckpt}" in err and "--resume" in err and "Traceback" not in err, err
    assert not out.exists() and not lock.exists()


def test_outputs_follow_the_umask(tmp_path):
    from instructrl.utils import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "o") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_no_cuda_device_is_refused(tmp_path, proj, fill, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert run_main(monkeypatch, fill(SFT[:-2] + ["--device", "cuda", "--out", "{proj}/o"])) == 2
    assert "no CUDA device" in capsys.readouterr().err


# --- a run that learns nothing, or learns NaN, is a failure: exit 3, no output, the last checkpoint intact ------
def test_a_finite_reward_does_not_reset_a_count_of_nan_losses():
    """pg checks one loss per iteration after the reward: the count must still reach the limit."""
    from instructrl.optim import NonFinite, NonFiniteError

    nf = NonFinite("pg", limit=3)
    with pytest.warns(UserWarning):
        for step in (1, 2):
            assert nf.ok(step, reward=1.0) and not nf.ok(step, loss=float("nan"))
        assert nf.ok(3, reward=1.0)
        with pytest.raises(NonFiniteError, match="stopped at step 3: non-finite loss, 3 checks"):
            nf.ok(3, loss=float("nan"))
    nf = NonFinite("sft", limit=3)
    with pytest.warns(UserWarning):
        assert not nf.ok(1, loss=float("inf"))
    assert nf.ok(2, loss=1.0) and nf.ok(2, grad_norm=1.0)  # an applied update resets the count
    assert nf.bad == 0 and nf.updates == 1
    nf.check_learned()
    with pytest.warns(UserWarning):
        skipped = NonFinite("sft", limit=3)
        skipped.ok(1, loss=float("nan"))
    with pytest.raises(NonFiniteError, match="every update was skipped"):
        skipped.check_learned()


def rl_command(name: str, episodes: int = 16) -> list[str]:
    from instructrl.options import flat_fields
    from instructrl.rl import algorithms

    mb = ["--minibatch-size", "4"] if any(f.name == "minibatch_size" for f in flat_fields(algorithms()[name].config)) \
        else []
    return [name, "--policy", "{sft}", "--reward", "{rm}", "--prompts", "{proj}/prompts.jsonl", "--device", "cpu",
            "--no-progress", "--episodes", str(episodes), "--batch-size", "8", "--max-new-tokens", "8", *mb]


RANKINGS = "{rm}/../rankings.jsonl"  # conftest's simulated rankings, beside the tiny reward model
TRAINERS = {
    "sft": SFT + ["--batch-size", "32", "--epochs", "1", "--no-progress"],
    "rm": ["rm", "--model", "{sft}", "--data", RANKINGS, "--device", "cpu", "--batch-size", "8", "--no-progress"],
    "dpo": ["dpo", "--policy", "{sft}", "--data", RANKINGS, "--device", "cpu", "--batch-size", "8", "--no-progress"],
    "pretrain": PRE + ["--steps", "4", "--batch-size", "8", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                       "--vocab-size", "300", "--no-progress"],
    **{name: rl_command(name, episodes=32) for name in ("ppo", "pg", "grpo", "rloo")},
}


def stops_with_exit_3(monkeypatch, capsys, args, out: Path) -> str:
    code = run_main(monkeypatch, [*args, "--out", out])
    raw = capsys.readouterr().err
    err = " ".join(raw.split())
    assert code == 3, raw
    assert "Traceback" not in raw, raw
    assert [line for line in raw.splitlines() if line.startswith("stopped:")] == [raw.splitlines()[-1]], raw
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "an output or a temp was left"
    return err


def nan_reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "nan_reward.py").write_text("def score(prompts, responses):\n"
                                            "    return [float('nan')] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nan_reward:score"


def _algorithm_names():
    from instructrl.rl import algorithms

    return sorted(algorithms())


@pytest.mark.parametrize("name", _algorithm_names())
def test_nan_reward_every_update_skipped_exits_3(name, fill, tmp_path, monkeypatch, capsys):
    """Every reward NaN: both iterations skipped (under the limit of 3), so nothing was learned: exit 3."""
    from instructrl.rl import algorithms

    args = fill(rl_command(name) + (["--value", "{rm}"] if algorithms()[name].needs_value else []))
    args[args.index("--reward") + 1] = nan_reward_module(tmp_path, monkeypatch)
    err = stops_with_exit_3(monkeypatch, capsys, args, tmp_path / "o")
    assert "every update was skipped" in err and "was not written" in err, err


def _nan_logprobs(orig):
    def patched(*a, **k):
        out = orig(*a, **k)
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    return patched


NAN_LOSS = {"sft": ("instructrl.sft", "sft_loss"), "rm": ("instructrl.reward", "rm_loss"),
            "pretrain": ("instructrl.pretrain", "lm_loss")}


@pytest.mark.parametrize("name", _algorithm_names() + ["sft", "rm", "dpo", "pretrain"])
def test_nan_loss_reaches_the_limit_and_exits_3(name, fill, tmp_path, monkeypatch, capsys):
    """The update's log-probabilities (RL) or the loss NaN while the rewards are finite: the count of non-finite
    checks is not reset by the finite rewards, so the run stops at the limit (pg checks one loss per iteration)."""
    import importlib

    if name in NAN_LOSS:
        module, fn = NAN_LOSS[name]
        monkeypatch.setattr(f"{module}.{fn}", _nan_logprobs(getattr(importlib.import_module(module), fn)))
    elif name == "dpo":
        from instructrl import dpo

        orig = dpo.batch_loss
        monkeypatch.setattr(dpo, "batch_loss", lambda *a, **k: (orig(*a, **k)[0] * float("nan"), orig(*a, **k)[1]))
    else:
        for module in ("update", "ppo", "pg", "grpo", "rloo"):  # the shared update takes the log-probs
            mod = importlib.import_module(f"instructrl.{module}")
            if hasattr(mod, "response_logprobs"):
                monkeypatch.setattr(mod, "response_logprobs", _nan_logprobs(mod.response_logprobs))
    err = stops_with_exit_3(monkeypatch, capsys, fill(TRAINERS[name]), tmp_path / "o")
    assert "non-finite loss" in err and "checks without an update" in err, err


def finite_checkpoints(root: Path) -> list[Path]:
    """Every checkpoint under root, each readable and all its weights finite."""
    from safetensors.torch import load_file

    steps = sorted(root.glob("step-*")) if root.is_dir() else []
    for step in steps:
        for f in step.glob("model.*.safetensors"):
            assert all(bool(torch.isfinite(t).all()) for t in load_file(str(f)).values() if t.is_floating_point())
    return steps


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_lr_1e30_in_every_trainer_exits_3_and_keeps_the_last_checkpoint(name, fill, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    args = fill(TRAINERS[name]) + ["--lr", "1e30", "--save-every", "1", "--max-nonfinite", "1"]
    err = stops_with_exit_3(monkeypatch, capsys, args, out)
    assert "non-finite" in err and ("the last good checkpoint is" in err or "no checkpoint was written" in err), err
    steps = finite_checkpoints(tmp_path / "o-checkpoints")
    if "the last good checkpoint is" in err:
        assert str(steps[-1]) in err, err


# --- an outside failure: disk full while saving ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["out", "checkpoint"])
def test_disk_full_while_saving_exits_4_naming_the_path_and_keeps_the_checkpoint(where, fill, tmp_path, monkeypatch,
                                                                                  capsys):
    """out: OUT's final fsync fails (ENOSPC as an OSError); checkpoint: safetensors fails writing the second
    checkpoint (ENOSPC in its own error type). Both: exit 4, one line naming the path, the first checkpoint kept."""
    import errno

    from safetensors import SafetensorError

    from instructrl import checkpoint, utils

    if where == "out":
        def full(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(utils, "fsync_tree", full)  # OUT's last write fails; the checkpoints' own do not
    else:
        def full(*a, **k):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

        real = checkpoint.Checkpointer.save

        def save(self, step, *a, **k):
            if step == 2:
                monkeypatch.setattr(checkpoint, "save_file", full)
            return real(self, step, *a, **k)

        monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    out = tmp_path / "o"
    code = run_main(monkeypatch, fill(TRAINERS["sft"]) + ["--save-every", "1", "--out", out])
    raw = capsys.readouterr().err
    err = " ".join(raw.split())
    assert code == 4, raw
    assert len(raw.strip().splitlines()) == 1 and "Traceback" not in raw, raw
    assert "No space left on device writing" in err and f"{out} was not written" in err, err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
    steps = finite_checkpoints(tmp_path / "o-checkpoints")
    assert steps and f"the last good checkpoint is {steps[-1]}" in err, err
    assert where == "out" or [s.name for s in steps] == ["step-00000001"]


# --- killed runs' leftovers, and inputs fingerprinted by content ------------------------------------------------
def test_a_killed_runs_temporaries_are_removed_and_a_moved_aside_output_put_back(tmp_path):
    from instructrl.outputs import clean_temporaries

    out = tmp_path / "o"
    left = [tmp_path / ".o.abcd_123.tmp", tmp_path / ".o.0123456789abcdef.tmp",
            tmp_path / "o-checkpoints" / ".step-x1y2z3w4.tmp"]
    for p in left:
        p.mkdir(parents=True) if "step" in p.name or "abcd" in p.name else p.write_text("half")
    kept = [tmp_path / ".o.b.abcd_123.tmp", tmp_path / "o-checkpoints" / "step-00000001", tmp_path / ".o.lock"]
    for p in kept:  # another output's temp ("o.b"), a finished checkpoint, the lock
        p.mkdir(parents=True)
    (tmp_path / ".o.old").mkdir()
    (tmp_path / ".o.old" / "summary.json").write_text("{}")  # killed between atomic_dir's two renames
    clean_temporaries(out)
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert (out / "summary.json").is_file() and not (tmp_path / ".o.old").exists()


def test_a_directory_input_is_fingerprinted_by_every_byte(tmp_path):
    from instructrl.outputs import content_id

    d = tmp_path / "model"
    d.mkdir()
    blob = bytearray(5 << 20)  # larger than the first and last MiB that an earlier fingerprint read
    (d / "model.safetensors").write_bytes(blob)
    before = content_id(str(d))
    blob[len(blob) // 2] = 1
    (d / "model.safetensors").write_bytes(blob)
    assert content_id(str(d)) != before
