"""Crash and resume: SIGKILL after a checkpoint, --resume, and the result equals an uninterrupted run's;
a corrupt newest checkpoint falls back to the previous one; a planted NaN reward stops the run cleanly."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

TIMING = {"time/iteration", "time/rollout"}


def cli(*args):
    return [sys.executable, "-m", "instructrl.cli", *map(str, args)]


def metrics_without_timing(path):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_after_first_checkpoint(args, ckpt_dir, seed):
    """Start a run, wait for its first checkpoint, SIGKILL it at a random moment after that."""
    p = subprocess.Popen(cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (ckpt_dir.is_dir() and any(x.name.startswith("step-") for x in ckpt_dir.iterdir())):
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return p


@pytest.fixture
def ppo_args(tiny_sft_dir, tiny_rm_dir, world_dir):
    return ["ppo", "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts", world_dir / "prompts_train.jsonl",
            "--judge", world_dir, "--episodes", 96, "--batch-size", 16, "--minibatch-size", 8,
            "--max-new-tokens", 12, "--ptx-coef", 0.5, "--ptx-data", world_dir / "corpus.jsonl", "--kl-target", 1.0,
            "--device", "cpu"]


@pytest.mark.parametrize("memory", [[], ["--gradient-checkpointing", "--micro-batch-size", 2, "--lora-r", 4]],
                         ids=["plain", "checkpointing+accumulation+lora"])
def test_ppo_resume_after_sigkill_is_identical(ppo_args, memory, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert subprocess.run(cli(*ppo_args, *memory, "--out", ref), capture_output=True).returncode == 0
    args = [*ppo_args, *memory, "--out", out, "--save-every", 1]
    kill_after_first_checkpoint(args, tmp_path / "run-checkpoints", seed=0)
    assert not out.exists(), "a killed run must not leave a half-written output"
    done = subprocess.run(cli(*args, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert same_weights(ref, out)
    assert metrics_without_timing(ref / "metrics.jsonl") == metrics_without_timing(out / "metrics.jsonl")


def test_corrupt_newest_checkpoint_falls_back_with_warning(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    from instructrl.ppo import PPOConfig, train_ppo

    kw = dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
              episodes=64, batch_size=16, minibatch_size=8, max_new_tokens=12, progress=False, device="cpu")
    train_ppo(PPOConfig(out=str(tmp_path / "ref"), **kw))
    # A run that stops after 3 of 4 iterations, with checkpoints at 1, 2 and 3 (the last two kept).
    train_ppo(PPOConfig(out=str(tmp_path / "partial"), save_every=1, **{**kw, "episodes": 64}))
    ckpts = tmp_path / "partial-checkpoints"
    steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000002", "step-00000003"]
    newest = ckpts / steps[-1] / "model.policy.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_ppo(PPOConfig(out=str(tmp_path / "partial"), resume=True, overwrite=True, **kw))  # OUT is finished
    assert any("step-00000003" in str(w.message) and "unreadable" in str(w.message) for w in caught)
    assert same_weights(tmp_path / "ref", tmp_path / "partial")


def test_nan_reward_stops_the_run_and_keeps_the_last_checkpoint(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path,
                                                                monkeypatch):
    from instructrl.optim import NonFiniteError
    from instructrl.models import ScalarHeadModel, load_causal_lm
    from instructrl.ppo import PPOConfig, train_ppo

    calls = {"n": 0}
    real_score = ScalarHeadModel.score

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = real_score(self, *a, **k)
        return out * float("nan") if calls["n"] > 2 else out  # from the third rollout on

    monkeypatch.setattr(ScalarHeadModel, "score", poisoned)
    kw = dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
              episodes=160, batch_size=16, minibatch_size=8, max_new_tokens=12, progress=False, device="cpu",
              save_every=1, max_nonfinite=3)
    with pytest.raises(NonFiniteError, match=r"ppo stopped at step 5: non-finite reward, 3 checks without an update;"
                                             r" .*run was not written; the last good checkpoint is .*step-00000004"):
        train_ppo(PPOConfig(out=str(tmp_path / "run"), **kw))
    assert not (tmp_path / "run").exists()
    ckpts = sorted((tmp_path / "run-checkpoints").iterdir())
    assert ckpts[-1].name == "step-00000004"
    model = load_causal_lm(tiny_sft_dir)
    weights = load_file(ckpts[-1] / "model.policy.safetensors")
    model.load_state_dict(weights, strict=False)
    assert all(torch.isfinite(v).all() for v in weights.values())


def _kill_and_resume(args, out, tmp_path, seed):
    p = kill_after_first_checkpoint([*args, "--out", out, "--save-every", 1], tmp_path / f"{out.name}-checkpoints",
                                    seed)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    done = subprocess.run(cli(*args, "--out", out, "--save-every", 1, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sft_resume_after_sigkill_is_identical(tiny_lm_dir, world_dir, tmp_path):
    args = ["sft", "--model", tiny_lm_dir, "--data", world_dir / "demos.jsonl", "--epochs", 6, "--lr", 1e-3,
            "--patience", 100, "--device", "cpu"]
    assert subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True).returncode == 0
    _kill_and_resume(args, tmp_path / "run", tmp_path, seed=1)
    assert same_weights(tmp_path / "ref", tmp_path / "run")
    assert metrics_without_timing(tmp_path / "ref" / "metrics.jsonl") == \
        metrics_without_timing(tmp_path / "run" / "metrics.jsonl")


def test_rm_resume_after_sigkill_is_identical(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    rankings = tiny_rm_dir.parent / "rankings.jsonl"
    args = ["rm", "--model", tiny_sft_dir, "--data", rankings, "--demos", world_dir / "demos.jsonl", "--epochs", 3,
            "--batch-size", 2, "--device", "cpu"]
    assert subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True).returncode == 0
    _kill_and_resume(args, tmp_path / "run", tmp_path, seed=2)
    assert same_weights(tmp_path / "ref", tmp_path / "run")
    a = load_file(tmp_path / "ref" / "scalar_head.safetensors")
    b = load_file(tmp_path / "run" / "scalar_head.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_timing(tmp_path / "ref" / "metrics.jsonl") == \
        metrics_without_timing(tmp_path / "run" / "metrics.jsonl")


def test_pretrain_resume_after_sigkill_is_identical(world_dir, tmp_path):
    args = ["pretrain", "--corpus", world_dir / "corpus.jsonl", "--vocab-size", 600, "--n-layer", 2, "--n-embd", 64,
            "--n-head", 2, "--steps", 40, "--batch-size", 16]
    assert subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True).returncode == 0
    _kill_and_resume(args, tmp_path / "run", tmp_path, seed=3)
    assert same_weights(tmp_path / "ref", tmp_path / "run")
    assert metrics_without_timing(tmp_path / "ref" / "metrics.jsonl") == \
        metrics_without_timing(tmp_path / "run" / "metrics.jsonl")


def test_grpo_resume_after_sigkill_is_identical(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    args = ["grpo", "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts", world_dir / "prompts_train.jsonl",
            "--judge", world_dir, "--episodes", 96, "--batch-size", 16, "--minibatch-size", 8, "--max-new-tokens", 12,
            "--ptx-coef", 0.5, "--ptx-data", world_dir / "corpus.jsonl", "--kl-target", 1.0, "--device", "cpu"]
    assert subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True).returncode == 0
    _kill_and_resume(args, tmp_path / "run", tmp_path, seed=4)
    assert same_weights(tmp_path / "ref", tmp_path / "run")
    assert metrics_without_timing(tmp_path / "ref" / "metrics.jsonl") == \
        metrics_without_timing(tmp_path / "run" / "metrics.jsonl")


def test_dpo_resume_after_sigkill_is_identical(tiny_sft_dir, tiny_rm_dir, tmp_path):
    args = ["dpo", "--policy", tiny_sft_dir, "--data", tiny_rm_dir.parent / "rankings.jsonl", "--epochs", 3,
            "--batch-size", 2, "--device", "cpu"]
    assert subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True).returncode == 0
    _kill_and_resume(args, tmp_path / "run", tmp_path, seed=5)
    assert same_weights(tmp_path / "ref", tmp_path / "run")
    assert metrics_without_timing(tmp_path / "ref" / "metrics.jsonl") == \
        metrics_without_timing(tmp_path / "run" / "metrics.jsonl")
