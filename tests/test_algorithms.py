"""GRPO, clipped RLOO, DPO and the KL placement end to end on the tiny fixtures."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def cli(*args):
    return subprocess.run([sys.executable, "-m", "instructrl.cli", *map(str, args)], capture_output=True, text=True)


def recs_of(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def rl_common(tiny_sft_dir, tiny_rm_dir, world_dir):
    return dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                judge=str(world_dir), episodes=32, batch_size=16, max_new_tokens=12, progress=False, device="cpu")


@pytest.mark.parametrize("agg", ["token", "sequence", "dr_grpo"])
def test_grpo_trains_end_to_end(rl_common, tmp_path, agg):
    from instructrl.grpo import GRPOConfig, train_grpo
    from instructrl.models import load_causal_lm

    s = train_grpo(GRPOConfig(out=str(tmp_path / "grpo"), minibatch_size=8, loss_agg=agg, **rl_common))
    recs = recs_of(tmp_path / "grpo")
    assert s["episodes"] == 32 and len(recs) == 2
    for key in ("objective/score", "objective/gold", "objective/kl", "policy/loss", "policy/kl_loss",
                "policy/clipfrac", "policy/entropy"):
        assert key in recs[0], key
    assert recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert s["config"]["kl_in"] == "loss" and s["config"]["kl_estimator"] == "k3"  # GRPO's defaults
    load_causal_lm(tmp_path / "grpo")


def test_one_epoch_one_minibatch_rloo_is_pg_with_loo(rl_common, tmp_path):
    """The clipped surrogate at ratio 1 has the policy gradient's gradient: clipped RLOO with one epoch and one
    minibatch trains as `pg --baseline loo` (same samples, same seed), up to float rounding."""
    from instructrl.pg import PGConfig, train_pg
    from instructrl.rloo import RLOOConfig, train_rloo

    train_rloo(RLOOConfig(out=str(tmp_path / "rloo"), epochs=1, minibatch_size=16, **rl_common))
    train_pg(PGConfig(out=str(tmp_path / "pg"), baseline="loo", samples_per_prompt=4, **rl_common))
    a, b = load_file(tmp_path / "rloo" / "model.safetensors"), load_file(tmp_path / "pg" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    sft = load_file(rl_common["policy"] + "/model.safetensors")
    assert max((a[k] - sft[k]).abs().max().item() for k in a) > 1e-5  # and it did train
    ra, rb = recs_of(tmp_path / "rloo"), recs_of(tmp_path / "pg")
    assert [r["objective/score"] for r in ra] == pytest.approx([r["objective/score"] for r in rb], abs=1e-4)


def test_rloo_with_several_epochs_trains(rl_common, tmp_path):
    from instructrl.rloo import RLOOConfig, train_rloo

    s = train_rloo(RLOOConfig(out=str(tmp_path / "rloo"), epochs=2, minibatch_size=8, **rl_common))
    recs = recs_of(tmp_path / "rloo")
    assert s["episodes"] == 32 and "policy/clipfrac" in recs[0] and "policy/kl_loss" not in recs[0]


@pytest.mark.parametrize("algo,kw", [("ppo", {"minibatch_size": 8, "ppo_epochs": 1}), ("pg", {})])
def test_kl_in_the_loss_for_ppo_and_pg(rl_common, tmp_path, algo, kw):
    from instructrl.rl import algorithms, train_rl

    a = algorithms()[algo]
    train_rl(a.config(out=str(tmp_path / algo), kl_in="loss", kl_estimator="k2", **kw, **rl_common), a)
    assert all("policy/kl_loss" in r for r in recs_of(tmp_path / algo))


@pytest.mark.parametrize("estimator,place,why", [("k2", "reward", "biased"), ("k1", "loss", "zero expected gradient"),
                                                 ("k4", "reward", "--kl-estimator must be one of")])
def test_refused_kl_combinations_exit_2_and_write_nothing(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path, estimator,
                                                          place, why):
    out = tmp_path / "grpo"
    p = cli("grpo", "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts", world_dir / "prompts_train.jsonl",
            "--out", out, "--kl-estimator", estimator, "--kl-in", place)
    assert p.returncode == 2 and why in p.stdout + p.stderr
    assert not out.exists()


@pytest.fixture
def rankings(tiny_rm_dir):
    return tiny_rm_dir.parent / "rankings.jsonl"


def test_dpo_cli_end_to_end(tiny_sft_dir, rankings, tmp_path):
    from instructrl.models import load_causal_lm

    out = tmp_path / "dpo"
    p = cli("dpo", "--policy", tiny_sft_dir, "--data", rankings, "--out", out, "--epochs", 2, "--batch-size", 4,
            "--device", "cpu")
    assert p.returncode == 0, p.stderr
    recs = [r for r in recs_of(out) if "train/loss" in r]
    s = json.loads((out / "summary.json").read_text())
    n = s["train_prompts"]  # the rankings less the held-out tenth of their distinct prompts
    assert n + s["held_out_prompts"] == len(rankings.read_text().splitlines()) and n >= 30
    assert s["steps"] == len(recs) == math.ceil(2 * n / 4)  # 2 epochs of n prompts, 4 a step
    first = recs[0]
    assert first["train/margin"] == pytest.approx(0.0, abs=1e-5)  # policy = reference at step 1
    assert first["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert sum(r["train/margin"] for r in recs[-4:]) > 0  # the implicit reward learned to order the training pairs
    assert {"loss", "accuracy", "margin"} <= set(s["held_out"])
    load_causal_lm(out)


@pytest.mark.parametrize("kw", [{"loss": "ipo"}, {"label_smoothing": 0.2}, {"lora_r": 4}])
def test_dpo_variants_train(tiny_sft_dir, rankings, tmp_path, kw):
    """IPO, conservative DPO, and the LoRA policy whose reference is itself with the adapters off."""
    from instructrl.dpo import DPOConfig, dpo

    s = dpo(DPOConfig(policy=str(tiny_sft_dir), data=str(rankings), out=str(tmp_path / "d"), batch_size=8,
                      progress=False, device="cpu", **kw))
    recs = recs_of(tmp_path / "d")
    assert recs[0]["train/margin"] == pytest.approx(0.0, abs=1e-5)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in recs if "train/loss" in r)
    assert s["steps"] == 5


def test_dpo_refuses_label_smoothing_with_ipo(tiny_sft_dir, rankings, tmp_path):
    p = cli("dpo", "--policy", tiny_sft_dir, "--data", rankings, "--out", tmp_path / "d", "--loss", "ipo",
            "--label-smoothing", 0.1)
    assert p.returncode == 2 and "sigmoid only" in p.stdout + p.stderr and not (tmp_path / "d").exists()
