"""Step 3 with PPO(-ptx): several epochs of clipped updates over minibatches of each batch of rollouts.

Per iteration [IG, LHP, N+]:
  1. rollout: sample responses, score them (policy, reference, value, reward), shape per-token rewards −β·k_t + r
  2. advantages: GAE (γ_d, λ) on the shaped rewards, returns before whitening, whitened advantages
  3. update: ppo_epochs × minibatches of the clipped policy loss + c_v · clipped value loss (+ γ · ptx loss)
  4. KL control: fixed β, or the adaptive controller

Under torchrun each rank samples batch_size / N rollouts and updates on minibatch_size / N of them at a time;
advantages are whitened with the statistics of all ranks, gradients are averaged (DDP), and the KL the controller
sees is the global one. batch_size and minibatch_size stay global: N ranks take as many optimizer steps as one
(each loss is a per-rank token mean, averaged over ranks by DDP).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import distributed as dist
from .losses import adaptive_kl_beta, gae, masked_mean, masked_whiten, ppo_policy_loss, value_loss
from .checkpoint import Checkpointer, NonFiniteGuard
from .models import trainable_parameters
from .rollout import (RLConfig, make_rollout, per_rank, ptx_step_loss, response_logprobs, response_values,
                      rollout_metrics, save_policy, setup_rl, trim)
from .utils import MetricsLog, adam, checkpoint_dir, peak_rss_mb, set_seed, write_json


@dataclass
class PPOConfig(RLConfig):
    ppo_epochs: int = 4
    minibatch_size: int = 16
    clip: float = 0.2               # ε
    value_clip: float = 0.2         # ε_v
    vf_coef: float = 0.1            # c_v
    gamma: float = 1.0              # γ_d
    lam: float = 0.95               # λ
    whiten_rewards: bool = False


def ppo_update(s, r, cfg: PPOConfig, optimizer, params, shuffle: torch.Generator, guard: NonFiniteGuard,
               it: int) -> dict:
    """Steps 2–3: advantages, then ppo_epochs passes over shuffled minibatches of this batch of rollouts.

    Whitening uses the mean and variance over all ranks' rollouts; the returned statistics are averaged over ranks.
    """
    mask = r.mask
    rewards = masked_whiten(r.rewards, mask, shift_mean=False, **whitening(r.rewards, mask)) \
        if cfg.whiten_rewards else r.rewards
    advantages, returns = gae(rewards, r.values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask, **whitening(advantages, mask))
    B = mask.shape[0]
    stats: dict[str, list[float]] = {}
    for epoch in range(cfg.ppo_epochs):
        for rows in torch.randperm(B, generator=shuffle).split(per_rank(cfg.minibatch_size, "minibatch_size")):
            mb, cols = trim(r.batch, rows)
            m = mask[rows, cols]
            logp, entropy = response_logprobs(s.train_policy, mb, cfg.temperature, with_entropy=True)
            pl, pstats = ppo_policy_loss(logp, r.logprobs[rows, cols], advantages[rows, cols], m, cfg.clip)
            v = response_values(s.train_value, mb)
            vl, vstats = value_loss(v, r.values[rows, cols], returns[rows, cols], m, cfg.value_clip)
            loss = pl + cfg.vf_coef * vl
            ptx = None
            if s.ptx is not None:
                ptx = ptx_step_loss(s.train_policy, s.ptx, max(1, cfg.ptx_batch_size // dist.world_size()),
                                    cfg.ptx_coef, s.device)
                loss = loss + ptx
            stepped, _ = guard.step(it, optimizer, loss, params, cfg.max_grad_norm)
            if not stepped:
                continue
            rec = {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy": masked_mean(entropy.detach(), m).item(),
                   **{k: float(x) for k, x in {**pstats, **vstats}.items()}}
            if ptx is not None:
                rec["ptx_loss"] = ptx.item() / cfg.ptx_coef
            if epoch == 0 and not stats:
                rec["first_ratio"], rec["first_approx_kl"] = rec["ratio_mean"], rec["approx_kl"]
            for k, x in rec.items():
                stats.setdefault(k, []).append(x)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    if stats:
        out["first_ratio"], out["first_approx_kl"] = stats["first_ratio"][0], stats["first_approx_kl"][0]
    return dist.mean_dict(out)


def whitening(x: torch.Tensor, mask: torch.Tensor) -> dict:
    """masked_whiten's mean and var over every rank's rollouts (in one process: its own, computed alike)."""
    mean, var = dist.masked_moments(x, mask)
    return {"mean": mean, "var": var}


def train_ppo(cfg: PPOConfig) -> dict:
    t0 = time.time()
    set_seed(cfg.seed)
    if cfg.batch_size % cfg.minibatch_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of minibatch_size {cfg.minibatch_size}")
    s = setup_rl(cfg, with_value=True)
    per_rank(cfg.minibatch_size, "minibatch_size")
    s.policy.train()
    s.value_model.train()
    params = trainable_parameters(s.policy) + trainable_parameters(s.value_model)
    optimizer = adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    shuffle = torch.Generator().manual_seed(cfg.seed + 1)
    guard = NonFiniteGuard("ppo", cfg.max_nonfinite)
    iterations = max(1, cfg.episodes // cfg.batch_size)
    ckpt = Checkpointer(checkpoint_dir(cfg.out), cfg.keep_checkpoints)
    models = {"policy": s.policy, "value": s.value_model}
    generators = {**s.generators(), "shuffle": shuffle}
    start, beta, episodes, previous = 0, cfg.beta, 0, []
    if cfg.resume and (restored := ckpt.load_latest(models, optimizer, None, generators)):
        start, state, previous = restored
        beta, episodes, s.prompts.order = state["beta"], state["episodes"], state["prompt_order"]
    with dist.output_dir(cfg.out) as tmp:
        log = MetricsLog(tmp / "metrics.jsonl" if tmp else None, previous)
        rec: dict = json.loads(previous[-1]) if previous else {}
        bar = tqdm(range(start, iterations), desc="ppo", disable=not (cfg.progress and dist.is_main()),
                   dynamic_ncols=True)
        for it in bar:
            t_it = time.time()
            # 1. rollout (this rank's share of the batch)
            prompts, ids = s.prompts.next(per_rank(cfg.batch_size, "batch_size"))
            r = make_rollout(s.policy, s.ref, s.reward_model, s.value_model, s.tokenizer, prompts, ids, cfg, beta,
                             s.generator, s.judge, lockstep=s.lockstep)
            t_roll = time.time() - t_it
            episodes += cfg.batch_size
            # 2.–3. advantages and clipped updates (skipped when the rewards are not finite on any rank)
            upd = ppo_update(s, r, cfg, optimizer, params, shuffle, guard, it + 1) \
                if guard.ok(it + 1, reward=dist.sync_finite(r.scores)) else {}
            rec = {"iteration": it + 1, "episodes": episodes, "beta": beta, **rollout_metrics(r), **upd,
                   "seconds_rollout": t_roll, "seconds": time.time() - t_it}
            # 4. KL control
            if cfg.kl_target is not None:
                beta = adaptive_kl_beta(beta, rec["kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
            log.log(rec)
            if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < iterations:
                ckpt.save(it + 1, models, optimizer, None, generators, metrics=log.lines,
                          state={"beta": beta, "episodes": episodes, "prompt_order": s.prompts.order})
            bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec['kl']:.2f}",
                            **({"gold": f"{rec['gold_reward']:.2f}"} if "gold_reward" in rec else {}), refresh=False)
        log.close()
        s.policy.eval()
        full_policy, full_value = dist.full_state_dict(s.policy), dist.full_state_dict(s.value_model)
        if tmp is not None:
            save_policy(s.policy, s.tokenizer, tmp, full_policy)
            s.value_model.save_pretrained(tmp / "value_model", full_value)
        summary = {"stage": "ppo", "algorithm": "ppo", "iterations": iterations, "episodes": episodes,
                   "final": {k: rec[k] for k in ("reward", "kl", "gold_reward", "response_length") if k in rec},
                   "beta": beta, "world_size": dist.world_size(), "seconds": time.time() - t0,
                   "peak_rss_mb": peak_rss_mb(), "config": asdict(cfg)}
        if tmp is not None:
            write_json(tmp / "summary.json", summary)
    return summary
