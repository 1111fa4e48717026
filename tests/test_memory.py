"""Fitting bigger models: gradient accumulation takes exactly the step of the whole batch (SFT, RM, every registered
RL algorithm; also 2 processes × 2 micro-batches against 1 × 1, with unequal token counts across the ranks), and
activation checkpointing gives the gradients of a plain backward (policy, value, reward model; with and without LoRA).

Adam's first step is nearly sign(g)·lr, blind to a wrongly scaled gradient: so the logged gradient norm (before
clipping) and loss are compared too, and RL runs with a large Adam ε, where the step is linear in the gradient.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_distributed import torchrun

WEIGHT_TOL = 1e-6  # abs, after one optimizer step: the runs differ only in float summation order
STAT_TOL = 1e-5    # abs, on logged losses and gradient norms (values of order 1-10)


def weights(d: Path, skip: tuple = ()) -> dict:
    return {f"{f.name}:{k}": t for f in sorted(d.glob("*.safetensors")) for k, t in load_file(f).items()
            if not any(f"{f.name}:{k}".endswith(x) for x in skip)}


# A ranking loss is blind to a constant added to every reward: the head's bias and the final layer norm's bias (a
# constant shift of the head's input) get a zero gradient, which Adam's first step turns into ±lr from float noise.
SHIFT = (":bias", ":score.bias", "ln_f.bias")


def assert_same_weights(a: dict, b: dict, start: dict | None = None) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_TOL
    if start is not None:  # the step did move the weights
        assert max((a[k] - start[k]).abs().max().item() for k in a if k in start) > 50 * WEIGHT_TOL


def metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def assert_same_logs(a: Path, b: Path, keys) -> None:
    ma, mb = metrics(a), metrics(b)
    step_a, step_b = (next(r for r in m if "train/loss" in r) for m in (ma, mb))
    for key in keys:
        assert step_b[key] == pytest.approx(step_a[key], abs=STAT_TOL), key


# --- SFT and the reward model through their trainers (one optimizer step on the whole training set) ---------------
SFT_KW = dict(epochs=1, batch_size=64, lr=1e-4, val_fraction=0.05)   # 23 of 24 demonstrations: one step
RM_KW = dict(epochs=1.0, batch_size=64, val_fraction=0.1, normalize_gain=False)  # ~36 of 40 prompts: one step;
# the raw trained weights (the score normalisation would magnify float noise 8-fold)


@pytest.fixture(scope="module")
def demos(world_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    path.write_text("".join((world_dir / "demos.jsonl").read_text().splitlines(True)[:24]))
    return path


def run_sft(model, data, out, **kw):
    from instructrl.sft import SFTConfig, sft

    s = sft(SFTConfig(model=str(model), data=str(data), out=str(out), progress=False, device="cpu", **SFT_KW, **kw))
    assert s["steps"] == 1 and s["train_examples"] == 23
    return out


def run_rm(model, data, out, **kw):
    from instructrl.reward import RewardConfig, train_reward_model

    s = train_reward_model(RewardConfig(model=str(model), data=str(data), out=str(out), progress=False,
                                        device="cpu", **RM_KW, **kw))
    # a tenth of the distinct prompts held out: how many rankings that leaves depends on the world's draw
    assert s["steps"] == 1 and s["train_prompts"] + s["held_out_prompts"] == 40 and s["train_prompts"] <= 64
    return out


def cli(kw: dict) -> list:
    flag = lambda k: f"--{k.replace('_', '-')}"
    return sum(([flag(k if v else f"no_{k}")] if isinstance(v, bool) else [flag(k), v] for k, v in kw.items()), [])


@pytest.fixture(scope="module")
def sft_whole(tiny_lm_dir, demos, tmp_path_factory):
    return run_sft(tiny_lm_dir, demos, tmp_path_factory.mktemp("sft") / "whole")


@pytest.fixture(scope="module")
def rm_whole(tiny_sft_dir, tiny_rm_dir, tmp_path_factory):
    return run_rm(tiny_sft_dir, tiny_rm_dir.parent / "rankings.jsonl", tmp_path_factory.mktemp("rm") / "whole")


def test_sft_accumulation_4_equals_whole_batch(sft_whole, tiny_lm_dir, demos, tmp_path):
    """23 demonstrations as micro-batches of 6, 6, 6, 5 (unequal token counts) = one pass over all 23."""
    run_sft(tiny_lm_dir, demos, tmp_path / "acc", micro_batch_size=6)
    assert_same_weights(weights(sft_whole), weights(tmp_path / "acc"), weights(tiny_lm_dir))
    assert_same_logs(sft_whole, tmp_path / "acc", ("train/loss", "train/grad_norm", "eval/loss"))


def test_rm_accumulation_4_equals_whole_batch(rm_whole, tiny_sft_dir, tiny_rm_dir, tmp_path):
    run_rm(tiny_sft_dir, tiny_rm_dir.parent / "rankings.jsonl", tmp_path / "acc", micro_batch_size=9)
    assert_same_weights(weights(rm_whole, SHIFT), weights(tmp_path / "acc", SHIFT))
    assert_same_logs(rm_whole, tmp_path / "acc", ("train/loss", "train/grad_norm", "train/accuracy"))


def test_sft_two_ranks_by_two_micro_batches_equal_one_rank(sft_whole, tiny_lm_dir, demos, tmp_path):
    """2 ranks × 2 micro-batches (12 and 11 demonstrations per rank) = 1 process × the whole batch."""
    torchrun("-m", "instructrl.cli", "sft", "--model", tiny_lm_dir, "--data", demos, "--device", "cpu",
             "--out", tmp_path / "two", "--micro-batch-size", 6, *cli(SFT_KW))
    assert_same_weights(weights(sft_whole), weights(tmp_path / "two"), weights(tiny_lm_dir))
    assert_same_logs(sft_whole, tmp_path / "two", ("train/loss", "train/grad_norm", "eval/loss"))


def test_rm_two_ranks_by_two_micro_batches_equal_one_rank(rm_whole, tiny_sft_dir, tiny_rm_dir, tmp_path):
    torchrun("-m", "instructrl.cli", "rm", "--model", tiny_sft_dir, "--data", tiny_rm_dir.parent / "rankings.jsonl",
             "--device", "cpu", "--out", tmp_path / "two", "--micro-batch-size", 9, *cli(RM_KW))
    assert_same_weights(weights(rm_whole, SHIFT), weights(tmp_path / "two", SHIFT))
    assert_same_logs(rm_whole, tmp_path / "two", ("train/loss", "train/grad_norm", "train/accuracy"))


# --- every registered RL algorithm: one update on the same 8 rollouts, split over ranks and micro-batches --------
def registry() -> list[str]:
    from instructrl.rl import algorithms

    return sorted(algorithms())


# One optimizer step on the whole batch of 8 (one epoch, one minibatch), 2 samples per prompt for the group
# baselines: each option set only where the algorithm has it, so a newly registered algorithm runs unedited.
ONE_STEP = {"minibatch_size": 8, "ppo_epochs": 1, "epochs": 1, "group_size": 2, "samples_per_prompt": 2}


def rl_step(name: str, policy: str, reward: str, prompts: str, micro: int, out: str) -> None:
    """One `update` of algorithm `name` on a fixed global batch of 8 rollouts (every process samples the same 8,
    then takes its contiguous rows: whole groups); rank 0 writes the trained weights (out.safetensors) and the
    statistics (out.json)."""
    import dataclasses

    from instructrl import distributed as dist
    from instructrl.optim import NonFinite
    from instructrl.rl import algorithms, setup_rl
    from instructrl.rollout import Rollout, make_rollout
    from instructrl.sampling import SampleBatch

    dist.init(torch.device("cpu"))
    algo_cls = algorithms()[name]
    own = {f.name for f in dataclasses.fields(algo_cls.config)}
    cfg = algo_cls.config(policy=policy, reward=reward, prompts=prompts, out="", batch_size=8, max_new_tokens=12,
                          lr=1e-3, adam_eps=1.0, micro_batch_size=micro, device="cpu", progress=False,
                          **{k: v for k, v in ONE_STEP.items() if k in own})
    s = setup_rl(cfg, torch.device("cpu"), torch.float32, with_value=algo_cls.needs_value)
    s.generator.manual_seed(0)
    r = make_rollout(s, s.prompts.prompts[:8], s.prompts.ids[:8], with_values=algo_cls.needs_value)
    rows = torch.arange(8).view(dist.world_size(), -1)[dist.rank()]
    b = r.batch
    mine = Rollout(SampleBatch(b.prompt_ids[rows], b.prompt_mask[rows], b.response_ids[rows], b.response_mask[rows],
                               b.ended[rows]), r.logprobs[rows], r.ref_logprobs[rows],
                   None if r.values is None else r.values[rows], r.scores[rows], [r.prompts[i] for i in rows],
                   [r.texts[i] for i in rows])
    algo = algo_cls(cfg, s, NonFinite(name))
    stats = algo.update(mine, 0.05, 1)
    tokens = dist.gather_objects(float(mine.mask.sum()))
    if dist.is_main():
        save_file({f"{m}.{k}": t.detach().clone().contiguous() for m, model in algo.models.items()
                   for k, t in model.state_dict().items()}, out + ".safetensors")
        Path(out + ".json").write_text(json.dumps({"stats": stats, "tokens": tokens}))


RL_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from test_memory import registry, rl_step
for name in registry():
    rl_step(name, *sys.argv[2:5], int(sys.argv[5]), sys.argv[6] + name)
"""


@pytest.fixture(scope="module")
def rl_whole(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("rl")
    args = [str(tiny_sft_dir), str(tiny_rm_dir), str(world_dir / "prompts_train.jsonl")]
    out = {}
    for micro in (0, 2):
        for name in registry():
            rl_step(name, *args, micro, str(base / f"m{micro}-{name}"))
            out[micro, name] = base / f"m{micro}-{name}"
    return args, out


def rl_result(prefix: Path):
    return load_file(f"{prefix}.safetensors"), json.loads(Path(f"{prefix}.json").read_text())


def assert_same_update(a: Path, b: Path, start: dict | None = None) -> None:
    (wa, sa), (wb, sb) = rl_result(a), rl_result(b)
    assert_same_weights(wa, wb, start)
    assert sa["stats"].keys() == sb["stats"].keys()
    for key, x in sa["stats"].items():
        assert sb["stats"][key] == pytest.approx(x, abs=STAT_TOL), key


@pytest.mark.parametrize("name", registry())
def test_rl_accumulation_4_equals_whole_batch(rl_whole, tiny_sft_dir, name):
    """8 rollouts as 4 micro-batches of 2 (trimmed to their own lengths) = one pass over all 8."""
    _, out = rl_whole
    start = {f"policy.{k}": t for k, t in load_file(tiny_sft_dir / "model.safetensors").items()}
    assert_same_update(out[0, name], out[2, name], start)
    assert rl_result(out[0, name])[1]["stats"].get("policy/first_ratio", 1.0) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def rl_two_ranks(rl_whole, tmp_path_factory):
    """Every registered algorithm's update on 2 ranks × 2 micro-batches (one torchrun for all of them)."""
    args, _ = rl_whole
    base = tmp_path_factory.mktemp("rl-two")
    script = base / "rl_step.py"
    script.write_text(RL_SCRIPT)
    torchrun(script, Path(__file__).parent, *args, 2, base / "two-")
    return base


@pytest.mark.parametrize("name", registry())
def test_rl_two_ranks_by_two_micro_batches_equal_one_rank(rl_whole, rl_two_ranks, name):
    """2 ranks × 2 micro-batches = 1 process × 1, with the ranks holding different numbers of response tokens
    (per-rank means averaged by DDP would weight them wrongly)."""
    _, out = rl_whole
    tokens = rl_result(rl_two_ranks / f"two-{name}")[1]["tokens"]
    assert len(tokens) == 2 and tokens[0] != tokens[1]
    assert_same_update(out[0, name], rl_two_ranks / f"two-{name}")


# --- activation checkpointing ----------------------------------------------------------------------------------------
def builders(tiny_sft_dir, tiny_rm_dir):
    from instructrl.models import ScalarHeadModel, load_causal_lm

    return {"policy": lambda: load_causal_lm(tiny_sft_dir), "value": lambda: ScalarHeadModel.from_pretrained(tiny_rm_dir),
            "reward": lambda: ScalarHeadModel.from_backbone(tiny_sft_dir)}


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("kind", ["policy", "value", "reward"])
def test_checkpointing_gives_the_same_gradients(tiny_sft_dir, tiny_rm_dir, kind, lora):
    from instructrl.models import ScalarHeadModel, apply_lora, checkpoint_activations, token_logprobs
    from instructrl.options import LoraOptions

    models = []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # the same LoRA and head initialisation in both
        m = builders(tiny_sft_dir, tiny_rm_dir)[kind]()
        if lora and isinstance(m, ScalarHeadModel):
            m.backbone = apply_lora(m.backbone, LoraOptions(r=lora), causal_lm=False)
        elif lora:
            m = apply_lora(m, LoraOptions(r=lora))
        if checkpointed:
            checkpoint_activations(m)
        models.append(m.train())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    grads, saved = [], []
    for m in models:
        numel = []  # what autograd stores for backward (checkpointed blocks store only their inputs)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numel.append(t.numel()) or t, lambda t: t):
            out = token_logprobs(m, ids, mask) if kind == "policy" else m(ids, mask)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        saved.append(sum(numel))
    assert saved[1] < 0.7 * saved[0]
    assert grads[0].keys() == grads[1].keys() and all(v is not None for v in grads[0].values())
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) <= 1e-6


def test_ppo_with_checkpointing_and_accumulation_first_ratio_is_one(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    """The first PPO ratio stays 1 with checkpointed LoRA policy and value models in micro-batches (sampling keeps
    the KV cache: the policy samples in eval mode)."""
    from instructrl.ppo import PPOConfig, train_ppo

    train_ppo(PPOConfig(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                        out=str(tmp_path / "ppo"), episodes=16, batch_size=8, minibatch_size=4, ppo_epochs=2,
                        max_new_tokens=12, lora_r=4, gradient_checkpointing=True, micro_batch_size=2, progress=False,
                        device="cpu"))
    recs = metrics(tmp_path / "ppo")
    assert recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert recs[0]["policy/first_approx_kl"] < 1e-10


def test_negative_micro_batch_size_exits_2_and_writes_nothing(tiny_lm_dir, demos, tmp_path):
    import subprocess

    p = subprocess.run([sys.executable, "-m", "instructrl.cli", "sft", "--model", str(tiny_lm_dir), "--data",
                        str(demos), "--out", str(tmp_path / "out"), "--device", "cpu", "--micro-batch-size", "-1"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--micro-batch-size must be >= 0" in p.stderr
    assert list(tmp_path.iterdir()) == []
