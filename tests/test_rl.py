"""RL invariants on real (tiny) models: first ratio = 1, reward on EOS, pads carry nothing, KL(π‖π) = 0, KL ≥ 0."""
import json

import pytest
import torch

from instructrl.losses import gae, kl_in_reward, masked_whiten
from instructrl.models import ScalarHeadModel, freeze, load_causal_lm, load_tokenizer
from instructrl.rewards import ModelReward, Rewards
from instructrl.rl import RLConfig, RLSetup
from instructrl.rollout import make_rollout
from instructrl.sampling import encode_prompts, response_logprobs, sample, trim


@pytest.fixture(scope="module")
def rollout_parts(tiny_sft_dir, tiny_rm_dir, world_dir):
    from instructrl.data import read_prompts

    tok = load_tokenizer(tiny_sft_dir)
    policy = load_causal_lm(tiny_sft_dir)
    ref = freeze(load_causal_lm(tiny_sft_dir))
    rm = freeze(ScalarHeadModel.from_pretrained(tiny_rm_dir))
    value = ScalarHeadModel.from_pretrained(tiny_rm_dir)
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:24]
    ids = encode_prompts(tok, prompts, 100)
    return tok, policy, ref, rm, value, prompts, ids


def run_rollout(cfg, tok, policy, ref, rm, value, prompts, ids, beta, seed):
    """A rollout with its PPO/PG-style shaped rewards and per-token k1 attached (as .rewards and .kl)."""
    s = RLSetup(cfg, torch.device("cpu"), tok, policy, ref, Rewards([ModelReward("rm", rm)], [1.0]), value, None,
                None, None, torch.Generator().manual_seed(seed))
    r = make_rollout(s, prompts, ids, with_values=value is not None)
    r.rewards, r.kl = kl_in_reward(r.scores, r.logprobs, r.ref_logprobs, r.mask, beta, "k1"), (r.logprobs - r.ref_logprobs) * r.mask
    return r


def rollout(parts, beta=0.05, seed=0, **kw):
    tok, policy, ref, rm, value, prompts, ids = parts
    return run_rollout(RLConfig(max_new_tokens=20, temperature=0.7, **kw), tok, policy, ref, rm, value, prompts, ids,
                       beta, seed)


def test_kl_of_policy_to_itself_is_zero(rollout_parts):
    """π_old comes from the sampler's KV-cache pass, π_ref from one full pass: equal up to float32 rounding."""
    r = rollout(rollout_parts)
    assert r.kl.abs().max().item() < 1e-5
    assert torch.allclose(r.logprobs, r.ref_logprobs, atol=1e-5, rtol=0)


def test_sampler_logprobs_equal_a_full_forward_pass(rollout_parts):
    """The rollout reuses the sampler's log-probs as log π_old; a separate full-sequence pass of the same policy
    (dropout off, same temperature, float32) gives the same numbers, so skipping that pass changes nothing."""
    tok, policy, *_, ids = rollout_parts
    for temperature in (0.7, 1.0):
        b = sample(policy, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=20,
                   temperature=temperature, generator=torch.Generator().manual_seed(3))
        mask = b.response_mask.float()
        with torch.no_grad():
            full = response_logprobs(policy, b, temperature)
        assert (b.logprobs[mask == 0] == 0).all()
        assert torch.allclose(b.logprobs * mask, full * mask, atol=1e-5, rtol=0)
        assert (b.logprobs * mask).sum().item() < -1.0  # real log-probs, not zeros


def test_finished_rows_leave_the_sampled_batch_and_change_no_sample(rollout_parts):
    """Rows that produced EOS stop running (the model sees fewer rows), yet every token, mask and end flag is what
    the whole batch sampled, and the log-probs agree to float rounding: the noise is drawn for the whole batch."""
    tok, policy, *_, ids = rollout_parts
    rows_seen: list[int] = []
    hook = policy.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                            with_kwargs=True)
    try:
        out = {}
        for drop in (False, True):
            rows_seen.clear()
            out[drop] = sample(policy, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=20,
                               temperature=1.0, generator=torch.Generator().manual_seed(5), drop_finished=drop)
            out[drop, "rows"] = list(rows_seen)
    finally:
        hook.remove()
    full, dropped = out[False], out[True]
    assert set(out[False, "rows"]) == {len(ids)}                    # every call ran the whole batch
    assert min(out[True, "rows"]) < len(ids) and len(out[True, "rows"]) == len(out[False, "rows"])
    assert torch.equal(full.response_ids, dropped.response_ids)
    assert torch.equal(full.response_mask, dropped.response_mask) and torch.equal(full.ended, dropped.ended)
    assert torch.allclose(full.logprobs, dropped.logprobs, atol=1e-5, rtol=0)


def test_gumbel_max_sampling_draws_from_the_softmax():
    """The sampler's Gumbel-max draw matches the tempered softmax's frequencies (chi-square-sized tolerance)."""
    from instructrl.models import build_tiny_model, tiny_gpt_config

    model = build_tiny_model(tiny_gpt_config(12, eos_id=0, pad_id=1, n_layer=1, n_embd=16, n_head=2), seed=4).eval()
    n = 4000
    b = sample(model, [[5, 6]] * n, eos_id=0, pad_id=1, max_new_tokens=1, temperature=0.7,
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([[5, 6]])).logits[0, -1] / 0.7, -1)
    freq = torch.bincount(b.response_ids[:, 0], minlength=12).float() / n
    assert (freq - p).abs().max().item() < 4 * (p * (1 - p) / n).sqrt().max().item()


def test_reward_lands_on_eos_not_after(rollout_parts):
    r = rollout(rollout_parts, beta=0.0)
    mask = r.mask
    lengths = mask.sum(1).long()
    for b in range(len(lengths)):
        n = int(lengths[b])
        assert r.rewards[b, n - 1].item() == pytest.approx(r.scores[b].item())
        assert (r.rewards[b, :n - 1] == 0).all() and (r.rewards[b, n:] == 0).all()
        if r.batch.ended[b]:
            assert r.batch.response_ids[b, n - 1].item() == rollout_parts[0].eos_token_id
        else:
            assert r.scores[b].item() == RLConfig().missing_eos_penalty


def test_pads_carry_no_kl_no_advantage(rollout_parts):
    r = rollout(rollout_parts)
    pad = r.mask == 0
    assert pad.any(), "expected some responses shorter than the batch width"
    adv, ret = gae(r.rewards, r.values, r.mask)
    adv = masked_whiten(adv, r.mask)
    assert (r.kl[pad] == 0).all() and (adv[pad] == 0).all() and (ret[pad] == 0).all()
    assert (r.logprobs[pad] == 0).all() and (r.ref_logprobs[pad] == 0).all()
    assert (r.batch.response_ids[pad] == rollout_parts[0].pad_token_id).all()


def test_first_minibatch_ratio_is_one(rollout_parts):
    """Recomputing log-probs on a trimmed minibatch with gradients on reproduces the rollout's to 1e-5."""
    policy = rollout_parts[1]
    r = rollout(rollout_parts)
    rows = torch.arange(8)
    mb, cols = trim(r.batch, rows)
    assert mb.prompt_ids.shape[1] <= r.batch.prompt_ids.shape[1]
    logp = response_logprobs(policy, mb, 0.7)
    m = r.mask[rows, cols]
    ratio = torch.exp((logp - r.logprobs[rows, cols]) * m)
    assert (ratio - 1).abs().max().item() < 1e-5


def test_sampling_gives_non_negative_mean_kl(tiny_sft_dir, tiny_lm_dir, world_dir):
    """top_k = 0 / top_p = 1 samples from π: mean Σ k1 over a batch estimates KL(π‖π_ref) ≥ 0."""
    from instructrl.data import read_prompts

    tok = load_tokenizer(tiny_sft_dir)
    policy, ref = load_causal_lm(tiny_sft_dir), freeze(load_causal_lm(tiny_lm_dir))
    rm = freeze(ScalarHeadModel.from_backbone(tiny_sft_dir))
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:128]
    ids = encode_prompts(tok, prompts, 100)
    r = run_rollout(RLConfig(max_new_tokens=20, temperature=1.0), tok, policy, ref, rm, None, prompts, ids, 0.05, 0)
    seq_kl = (r.kl * r.mask).sum(1)
    assert seq_kl.mean().item() > 0


def test_sampling_stops_at_eos_and_masks_after(rollout_parts):
    tok, policy, *_, ids = rollout_parts
    b = sample(policy, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=20, temperature=1.0,
               generator=torch.Generator().manual_seed(1))
    for row, m, ended in zip(b.response_ids.tolist(), b.response_mask.tolist(), b.ended.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        assert (tok.eos_token_id in row[:n]) == ended
        if ended:
            assert row.index(tok.eos_token_id) == n - 1


def test_ppo_and_pg_train_end_to_end(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    from instructrl.pg import PGConfig, train_pg
    from instructrl.ppo import PPOConfig, train_ppo

    common = dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                  judge=str(world_dir), episodes=32, batch_size=16, max_new_tokens=16, progress=False, device="cpu")
    s = train_ppo(PPOConfig(out=str(tmp_path / "ppo"), minibatch_size=8, ptx_coef=0.5,
                            ptx_data=str(world_dir / "corpus.jsonl"), kl_target=1.0, **common))
    recs = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and s["episodes"] == 32
    for key in ("objective/score", "objective/gold", "objective/kl", "objective/beta", "policy/loss", "value/loss",
                "policy/clipfrac", "policy/approx_kl", "policy/entropy", "rollout/response_length", "policy/ratio_mean",
                "ptx/loss", "train/episodes", "time/iteration", "time/rollout"):
        assert key in recs[0], key
    assert recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert recs[0]["policy/first_approx_kl"] < 1e-10
    assert recs[1]["objective/beta"] != recs[0]["objective/beta"]  # the adaptive controller moved β
    load_causal_lm(tmp_path / "ppo")           # the policy is a loadable HF directory
    s = train_pg(PGConfig(out=str(tmp_path / "pg"), baseline="loo", samples_per_prompt=4, **common))
    assert s["episodes"] == 32 and (tmp_path / "pg" / "model.safetensors").is_file()


def test_frozen_models_hold_no_gradients_or_optimizer_state(tiny_sft_dir, tiny_rm_dir, world_dir):
    """After a PPO update only the policy and the value model have gradients and Adam state [issue 8: memory]."""
    from instructrl.optim import NonFinite
    from instructrl.ppo import PPO, PPOConfig
    from instructrl.rl import setup_rl

    cfg = PPOConfig(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                    out="", batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, progress=False,
                    device="cpu")
    s = setup_rl(cfg, torch.device("cpu"), torch.float32, with_value=True)
    ppo = PPO(cfg, s, NonFinite("ppo"))
    params, optimizer = ppo.params, ppo.optimizer
    prompts, ids = s.prompts.next(cfg.batch_size)
    ppo.update(make_rollout(s, prompts, ids, with_values=True), cfg.beta, 1)
    rm = s.reward.sources[0].model
    for frozen in (s.ref, rm):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    stateful = {id(p) for p in optimizer.state}
    assert stateful == {id(p) for p in params} and len(params) > 0
    assert not stateful & {id(p) for m in (s.ref, rm) for p in m.parameters()}


def test_rl_refuses_temperature_zero(tiny_sft_dir, tiny_rm_dir, world_dir):
    """Log-probs are taken at the sampling temperature: T = 0 would divide by zero, so it is refused up front."""
    from instructrl.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                    out="", temperature=0.0, device="cpu")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        train_ppo(cfg)


def test_pretrain_refuses_torchrun(monkeypatch, tmp_path):
    from instructrl.pretrain import PretrainConfig, pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="single process"):
        pretrain(PretrainConfig(corpus=str(tmp_path / "c.jsonl"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_pg_reuses_its_batch_only_when_asked(tiny_sft_dir, tiny_rm_dir, world_dir):
    """Vanilla PG takes one gradient step per batch, in rollout order; --epochs E --minibatch-size M (claim 3's
    ablation, benchmarks/claim3.py) takes E × batch/M steps on the same samples, shuffled as PPO's, with the same
    −A·log π loss (no ratio, no clip)."""
    from instructrl.optim import NonFinite
    from instructrl.pg import PGConfig, PolicyGradient
    from instructrl.rl import setup_rl

    def steps(**kw) -> tuple[int, bool]:
        cfg = PGConfig(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), out="", batch_size=8, max_new_tokens=8,
                       prompts=str(world_dir / "prompts_train.jsonl"), progress=False, device="cpu", **kw)
        cfg.validate()
        s = setup_rl(cfg, torch.device("cpu"), torch.float32, with_value=False)
        pg = PolicyGradient(cfg, s, NonFinite("pg"))
        prompts, ids = s.prompts.next(cfg.batch_size)
        pg.update(make_rollout(s, prompts, ids, with_values=False), cfg.beta, 1)
        state = pg.optimizer.state[pg.params[0]]
        return int(state["step"]), pg.shuffle

    assert steps() == (1, False)
    assert steps(epochs=1, minibatch_size=8) == (1, False)      # the whole batch: the same as the default
    assert steps(epochs=4, minibatch_size=4) == (8, True)
    assert steps(epochs=3) == (3, True)
    with pytest.raises(ValueError, match="--minibatch-size 3"):
        PGConfig(policy="p", reward="r", prompts="x", out="o", batch_size=8, minibatch_size=3).validate()
