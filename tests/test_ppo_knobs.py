"""PPO's knobs (issue 30, gap 4): critic lr, lr schedule with warm-up, critic warm-up, entropy bonus, reward clip,
overlong penalty, clip-higher and dual-clip. Each one's math against a hand-computed float64 reference, each one
switched on in a tiny PPO run doing what it should, and every knob at a value equivalent to "off" learning the
default run's weights bit for bit (benchmarks/same_weights.py compares the default run with the code before)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructrl.losses import clip_reward, clipped_surrogate, entropy_from_logits, overlong_penalty
from instructrl.optim import rl_schedule
from instructrl.ppo import PPOConfig, train_ppo

F64 = torch.float64
LR = 1e-4


# --- the math, float64 -------------------------------------------------------------------------------------------
def surrogate(ratio, adv, **kw):
    ratio, adv = torch.tensor(ratio, dtype=F64), torch.tensor(adv, dtype=F64)
    return clipped_surrogate(ratio.log(), torch.zeros_like(ratio), adv, torch.ones_like(ratio), **kw)[0]


def test_clip_higher_raises_only_the_upper_clip():
    # ρ = 1.5, 1.25, 0.5 (A = +1), 0.5, 1.5 (A = −1); ε = 0.2, ε_high = 0.28:
    # −A·ρ vs −A·clip(ρ, 0.8, 1.28):
    # max(−1.5, −1.28), max(−1.25, −1.25), max(−0.5, −0.8), max(0.5, 0.8), max(1.5, 1.28)
    ratio, adv = [1.5, 1.25, 0.5, 0.5, 1.5], [1.0, 1.0, 1.0, -1.0, -1.0]
    got = surrogate(ratio, adv, clip=0.2, clip_high=0.28)
    assert torch.allclose(got, torch.tensor([-1.28, -1.25, -0.5, 0.8, 1.5], dtype=F64), atol=1e-12)
    # symmetric ε: the upper clip at 1.2
    assert torch.allclose(surrogate(ratio, adv, clip=0.2), torch.tensor([-1.2, -1.2, -0.5, 0.8, 1.5], dtype=F64),
                          atol=1e-12)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # c = 3: A < 0 → min(max(−A·ρ, −A·clip(ρ)), −c·A); A > 0 unchanged
    ratio, adv = [5.0, 2.0, 0.5, 5.0], [-1.0, -1.0, -2.0, 1.0]
    got = surrogate(ratio, adv, clip=0.2, dual_clip=3.0)
    # min(max(5, 1.2), 3) = 3; min(max(2, 1.2), 3) = 2; min(max(1, 1.6), 6) = 1.6; max(−5, −1.2) = −1.2
    assert torch.allclose(got, torch.tensor([3.0, 2.0, 1.6, -1.2], dtype=F64), atol=1e-12)
    assert torch.allclose(surrogate(ratio, adv, clip=0.2), torch.tensor([5.0, 2.0, 1.6, -1.2], dtype=F64), atol=1e-12)
    # a dual-clipped token gives no gradient (the cap −c·A does not depend on θ)
    logp = torch.tensor([math.log(5.0), math.log(2.0)], dtype=F64, requires_grad=True)
    a = torch.tensor([-1.0, -1.0], dtype=F64)
    clipped_surrogate(logp, torch.zeros(2, dtype=F64), a, torch.ones(2, dtype=F64), 0.2, None, 3.0)[0].sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 2.0])  # d(−A·ρ)/d log π = −A·ρ = 2 for the unclipped one


def test_defaults_are_the_plain_clipped_surrogate_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    mask = (torch.rand(3, 5, generator=g) > 0.2).float()
    ratio = torch.exp((logp - old) * mask)
    plain = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    assert torch.equal(clipped_surrogate(logp, old, adv, mask, 0.2)[0], plain)
    assert torch.equal(clipped_surrogate(logp, old, adv, mask, 0.2, 0.2)[0], plain)  # ε_high = ε


def test_entropy_from_logits():
    # p = (1/2, 1/2): log 2; p = (1/4, 3/4) from logits (0, log 3): −(¼ log ¼ + ¾ log ¾) = log 4 − ¾ log 3
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]], dtype=F64)
    assert torch.allclose(entropy_from_logits(logits),
                          torch.tensor([math.log(2), math.log(4) - 0.75 * math.log(3), math.log(2)], dtype=F64))
    x = torch.randn(4, 7, 11, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.allclose(entropy_from_logits(x), torch.distributions.Categorical(logits=x).entropy())


def test_overlong_penalty_is_dapo_eq_13():
    # L_max = 10, buffer 4: 0 up to 6 tokens, then (6 − |y|)/4, −1 at 10; times the penalty
    lengths = torch.tensor([3.0, 6.0, 7.0, 8.0, 10.0], dtype=F64)
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0])
    assert overlong_penalty(lengths, 10, 4, 2.0).tolist() == pytest.approx([0, 0, -0.5, -1.0, -2.0])
    assert overlong_penalty(lengths, 10, 10, 1.0).tolist() == pytest.approx([-0.3, -0.6, -0.7, -0.8, -1.0])


def test_reward_clip():
    scores = torch.tensor([-5.0, -0.3, 0.2, 7.0], dtype=F64)
    assert clip_reward(scores, 1.0).tolist() == [-1.0, -0.3, 0.2, 1.0]


@pytest.mark.parametrize("kind, warmup, n, expected", [
    ("linear", 2, 6, [0, 0.5, 1, 0.75, 0.5, 0.25]),      # warm-up i/2, then (6 − i)/(6 − 2)
    ("cosine", 0, 4, [1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant", 2, 4, [0, 0.5, 1, 1]),
])
def test_lr_schedule_per_iteration(kind, warmup, n, expected):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = rl_schedule(opt, kind, warmup, n)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * x for x in expected])
    assert rl_schedule(opt, "constant", 0, n) is None  # the default: no scheduler at all


@pytest.mark.parametrize("kw, message", [
    ({"clip_high": 0.1}, "--clip-high (0.1) must be at least --clip (0.2)"),
    ({"overlong_buffer": 4}, "--overlong-buffer and --overlong-penalty go together"),
    ({"overlong_penalty": 1.0}, "--overlong-buffer and --overlong-penalty go together"),
    ({"overlong_buffer": 40, "overlong_penalty": 1.0}, "--overlong-buffer (40) must be at most --max-new-tokens (32)"),
    ({"warmup_iterations": 48}, "--warmup-iterations (48) must be below the run's 48 iterations"),
    ({"critic_warmup_iterations": 50}, "--critic-warmup-iterations (50) must be below the run's 48 iterations"),
    ({"dual_clip": 1.0}, "--dual-clip must be > 1, not 1.0"),
    ({"lr_schedule": "cos"}, "--lr-schedule must be one of constant, linear, cosine"),
])
def test_rules(kw, message):
    with pytest.raises(ValueError) as e:
        PPOConfig(**kw).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


# --- in a tiny PPO run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kw(tiny_sft_dir, tiny_rm_dir, world_dir):
    """3 iterations of 8 rollouts, 2 epochs × 2 minibatches each."""
    return dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                episodes=24, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8, lr=LR, progress=False,
                device="cpu")


def ppo(out, **kw):
    train_ppo(PPOConfig(out=str(out), **kw))
    return out


def weights(d, model="policy"):
    return load_file(d / ("model.safetensors" if model == "policy" else "value_model/model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unchanged(ckpt: dict, model_dir) -> bool:
    """A checkpoint's policy tensors (tied ones saved once) equal to those of the model it started from."""
    from instructrl.models import load_causal_lm

    start = load_causal_lm(model_dir).state_dict()
    return bool(ckpt) and all(torch.equal(t, start[k]) for k, t in ckpt.items())


def checkpoint(out, step: int, model: str) -> dict:
    """A model's weights after iteration `step` (there is no checkpoint after the last: OUT is written instead)."""
    return load_file(out.with_name(out.name + "-checkpoints") / f"step-{step:08d}" / f"model.{model}.safetensors")


def metrics(d) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(kw, tmp_path_factory):
    return ppo(tmp_path_factory.mktemp("knobs") / "base", **kw)


def test_knobs_at_values_equivalent_to_off_learn_the_default_weights(kw, base, tmp_path):
    """Each code path taken with a setting that changes nothing: clip-higher = ε, dual-clip and reward clip far out
    of reach, the critic's own param group at --lr, a constant schedule: the default run's weights, bit for bit."""
    out = ppo(tmp_path / "off", **kw, clip_high=0.2, dual_clip=1e9, reward_clip=1e9, critic_lr=LR)
    for model in ("policy", "value"):
        assert same(weights(base, model), weights(out, model)), model
    # and the options are not inert: on, they change what is learned
    for knob in ({"clip_high": 0.5}, {"dual_clip": 1.05}):
        on = ppo(tmp_path / next(iter(knob)), **kw, **knob)
        assert not same(weights(base), weights(on)), knob


def test_critic_lr_is_the_value_groups_rate(kw, tiny_sft_dir, tiny_rm_dir, tmp_path):
    """Iteration 1 as one Adam step (one minibatch, one epoch): its first step moves each weight by ≈ lr (g/|g|), so
    the largest change of the value model is --critic-lr and of the policy --lr; within one iteration the policy's
    update does not depend on the critic's (advantages come from the rollout's values), so its weights are equal."""
    from instructrl.models import ScalarHeadModel, load_causal_lm

    two = {**kw, "episodes": 16, "minibatch_size": 8, "ppo_epochs": 1, "save_every": 1}
    plain, fast = ppo(tmp_path / "plain", **two), ppo(tmp_path / "fast", **two, critic_lr=30 * LR)
    assert same(checkpoint(plain, 1, "policy"), checkpoint(fast, 1, "policy"))
    assert not same(checkpoint(plain, 1, "value"), checkpoint(fast, 1, "value"))
    init = {"policy": load_causal_lm(tiny_sft_dir).state_dict(),
            "value": ScalarHeadModel.from_pretrained(tiny_rm_dir).state_dict()}
    moved = {name: max((t - init[name][k]).abs().max().item() for k, t in checkpoint(fast, 1, name).items())
             for name in init}
    assert moved["value"] == pytest.approx(30 * LR, rel=0.02) and moved["policy"] == pytest.approx(LR, rel=0.02)
    assert [(r["policy/lr"], r["value/lr"]) for r in metrics(fast)] == [(LR, 30 * LR)] * 2


def test_lr_schedule_and_warmup_per_iteration_and_resume(kw, tiny_sft_dir, tmp_path):
    """linear with 1 warm-up iteration over 3: lr 0, lr, lr/2 (logged as used; at lr 0 the policy stays the SFT
    model); the scheduler's state is in the checkpoints: resumed from iteration 1 the run ends as the uninterrupted
    one."""
    sched = {**kw, "lr_schedule": "linear", "warmup_iterations": 1, "save_every": 1}
    out = ppo(tmp_path / "sched", **sched)
    assert [r["policy/lr"] for r in metrics(out)] == pytest.approx([0.0, LR, LR / 2])
    assert unchanged(checkpoint(out, 1, "policy"), tiny_sft_dir)
    import shutil

    whole = {model: weights(out, model) for model in ("policy", "value")}
    shutil.rmtree(tmp_path / "sched-checkpoints" / "step-00000002")
    resumed = ppo(tmp_path / "sched", **sched, resume=True, overwrite=True)
    assert all(same(weights(resumed, model), whole[model]) for model in whole)
    assert [r["policy/lr"] for r in metrics(resumed)] == pytest.approx([0.0, LR, LR / 2])


def test_critic_warmup_leaves_the_policy_unchanged(kw, tiny_sft_dir, tmp_path):
    """--critic-warmup-iterations 2 of 3: after iterations 1 and 2 the policy is the SFT model's (the value model
    trained), after 3 it has moved; the warm-up iterations log the value loss and no policy loss."""
    out = ppo(tmp_path / "cw", **kw, critic_warmup_iterations=2, save_every=1)
    assert all(unchanged(checkpoint(out, step, "policy"), tiny_sft_dir) for step in (1, 2))
    assert not same(weights(out), load_file(tiny_sft_dir / "model.safetensors"))
    assert not same(checkpoint(out, 1, "value"), checkpoint(out, 2, "value"))
    recs = metrics(out)
    assert ["policy/loss" in r for r in recs] == [False, False, True] and all("value/loss" in r for r in recs)


def sample_batch(model_dir, prompts_path, n=16):
    """A fixed batch of responses of the SFT model (to measure entropies on the same tokens)."""
    from instructrl.chat import stop_token_id
    from instructrl.data import read_prompts
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.sampling import encode_prompts, sample

    tok = load_tokenizer(model_dir)
    ids = encode_prompts(tok, read_prompts(prompts_path)[:n], 200)
    return sample(load_causal_lm(model_dir), ids, eos_id=stop_token_id(tok), pad_id=tok.pad_token_id,
                  max_new_tokens=8, temperature=0.7, generator=torch.Generator().manual_seed(0))


def mean_entropy(model_dir, batch) -> float:
    from instructrl.losses import masked_mean
    from instructrl.models import load_causal_lm
    from instructrl.sampling import response_logprobs

    with torch.no_grad():
        _, h = response_logprobs(load_causal_lm(model_dir), batch, 0.7, with_entropy=True)
    return float(masked_mean(h, batch.response_mask.float()))


def test_entropy_bonus_raises_the_policys_entropy(kw, tiny_sft_dir, tmp_path):
    """At lr 1e-3 (12 Adam steps), with and without the bonus: the entropy on a fixed batch of the SFT model's
    responses rises with it, above the run without it and above the SFT model's."""
    fast = {**kw, "lr": 1e-3}
    off, on = ppo(tmp_path / "off", **fast), ppo(tmp_path / "ent", **fast, entropy_coef=1.0)
    batch = sample_batch(tiny_sft_dir, kw["prompts"])
    h = {name: mean_entropy(d, batch) for name, d in (("sft", tiny_sft_dir), ("base", off), ("bonus", on))}
    print(h)
    assert h["bonus"] > h["base"] + 0.01 and h["bonus"] > h["sft"] + 0.01


def big(prompts, responses):
    """A reward function (`--reward test_ppo_knobs:big`) with scores of ±1…±20."""
    return [3.0 * len(r.split()) - 4.0 for r in responses]


def big_clipped(prompts, responses):
    return [min(max(x, -0.5), 0.5) for x in big(prompts, responses)]


def test_reward_clip_trains_as_a_clipped_reward_would(kw, tiny_rm_dir, tmp_path):
    """--reward-clip 0.5 on scores of ±1…±20 learns exactly what the reward clipped at its source learns (the
    missing-EOS penalty set inside the range), and not what the unclipped one learns."""
    fn = {**kw, "value": str(tiny_rm_dir), "missing_eos_penalty": -0.5}
    clipped = ppo(tmp_path / "clip", **{**fn, "reward": [f"{__name__}:big"]}, reward_clip=0.5)
    at_source = ppo(tmp_path / "source", **{**fn, "reward": [f"{__name__}:big_clipped"]})
    raw = ppo(tmp_path / "raw", **{**fn, "reward": [f"{__name__}:big"]})
    for model in ("policy", "value"):
        assert same(weights(clipped, model), weights(at_source, model)), model
    assert not same(weights(clipped), weights(raw))
    recs = metrics(clipped)
    assert all(abs(r["objective/train_score"]) <= 0.5 for r in recs)
    assert any(abs(r["objective/score"]) > 0.5 for r in recs)  # the logged score stays the reward's own


def test_overlong_penalty_enters_the_trained_score(kw, base, tmp_path):
    """buffer = max_new_tokens = 8: the penalty is −P·|y|/8 on every response, so the mean score trained on is the
    reward's mean minus P · mean length / 8."""
    out = ppo(tmp_path / "long", **kw, overlong_buffer=8, overlong_penalty=2.0)
    for r in metrics(out):
        expected = r["objective/score"] - 2.0 * r["rollout/response_length"] / 8
        assert r["objective/train_score"] == pytest.approx(expected, abs=1e-5)
    assert not same(weights(base), weights(out))
