"""Step 3 with vanilla policy gradient: the baseline the theory starts from (the seed article's Figure 5).

Per iteration: the same rollouts and KL-shaped rewards as PPO, then ONE gradient step on
−mean_t((G_t − b) · log π_θ(y_t|s_t)), and the samples are discarded. b is the batch mean of the sequence
return, or the leave-one-out mean over the k samples of the same prompt [RLOO]. Under torchrun each rank samples
batch_size / N of the rollouts; the batch-mean baseline and the logged statistics span all ranks.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import distributed as dist
from .losses import adaptive_kl_beta, leave_one_out_baseline, masked_mean, pg_loss, reward_to_go
from .checkpoint import Checkpointer, NonFiniteGuard
from .models import trainable_parameters
from .rollout import (RLConfig, make_rollout, per_rank, ptx_step_loss, response_logprobs, rollout_metrics,
                      save_policy, setup_rl)
from .utils import MetricsLog, adam, checkpoint_dir, peak_rss_mb, set_seed, write_json


@dataclass
class PGConfig(RLConfig):
    baseline: str = "mean"          # mean | loo (leave-one-out over samples_per_prompt)
    samples_per_prompt: int = 4     # k, used by the leave-one-out baseline
    gamma: float = 1.0


def pg_advantages(rewards: torch.Tensor, mask: torch.Tensor, cfg: PGConfig) -> torch.Tensor:
    """A_t = G_t − b, with b from the sequence returns G_0 of the batch (all ranks' rows for the mean baseline)."""
    returns = reward_to_go(rewards, mask, cfg.gamma)
    g0 = returns[:, 0]
    baseline = leave_one_out_baseline(g0, cfg.samples_per_prompt) if cfg.baseline == "loo" \
        else dist.all_reduce_mean(g0.mean()).expand_as(g0)
    return (returns - baseline[:, None]) * mask


def train_pg(cfg: PGConfig) -> dict:
    t0 = time.time()
    set_seed(cfg.seed)
    if cfg.baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', not {cfg.baseline!r}")
    k = cfg.samples_per_prompt if cfg.baseline == "loo" else 1
    if cfg.batch_size % k or (cfg.baseline == "loo" and k < 2):
        raise ValueError(f"leave-one-out needs samples_per_prompt >= 2 dividing batch_size ({cfg.batch_size})")
    s = setup_rl(cfg, with_value=False)
    prompts_per_rank = per_rank(cfg.batch_size // k, "batch_size / samples_per_prompt")
    s.policy.train()
    params = trainable_parameters(s.policy)
    optimizer = adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    guard = NonFiniteGuard("pg", cfg.max_nonfinite)
    iterations = max(1, cfg.episodes // cfg.batch_size)
    ckpt = Checkpointer(checkpoint_dir(cfg.out), cfg.keep_checkpoints)
    models, generators = {"policy": s.policy}, s.generators()
    start, beta, episodes, previous = 0, cfg.beta, 0, []
    if cfg.resume and (restored := ckpt.load_latest(models, optimizer, None, generators)):
        start, state, previous = restored
        beta, episodes, s.prompts.order = state["beta"], state["episodes"], state["prompt_order"]
    with dist.output_dir(cfg.out) as tmp:
        log = MetricsLog(tmp / "metrics.jsonl" if tmp else None, previous)
        rec: dict = json.loads(previous[-1]) if previous else {}
        bar = tqdm(range(start, iterations), desc="pg", disable=not (cfg.progress and dist.is_main()),
                   dynamic_ncols=True)
        for it in bar:
            t_it = time.time()
            prompts, ids = s.prompts.next(prompts_per_rank)
            prompts, ids = [p for p in prompts for _ in range(k)], [x for x in ids for _ in range(k)]
            r = make_rollout(s.policy, s.ref, s.reward_model, None, s.tokenizer, prompts, ids, cfg, beta,
                             s.generator, s.judge, lockstep=s.lockstep)
            t_roll = time.time() - t_it
            mask = r.mask
            advantages = pg_advantages(r.rewards, mask, cfg)
            logp, entropy = response_logprobs(s.train_policy, r.batch, cfg.temperature, with_entropy=True)
            loss = pg_loss(logp, advantages, mask)
            rec_ptx = {}
            if s.ptx is not None:
                ptx = ptx_step_loss(s.train_policy, s.ptx, max(1, cfg.ptx_batch_size // dist.world_size()),
                                    cfg.ptx_coef, s.device)
                loss = loss + ptx
                rec_ptx = {"ptx_loss": ptx.item() / cfg.ptx_coef}
            # the one gradient step this batch of samples gets
            guard.step(it + 1, optimizer, loss, params, cfg.max_grad_norm, reward=dist.sync_finite(r.scores))
            episodes += cfg.batch_size
            rec = {"iteration": it + 1, "episodes": episodes, "beta": beta, **rollout_metrics(r),
                   **dist.mean_dict({"policy_loss": loss.item(), "entropy": masked_mean(entropy.detach(), mask).item(),
                                     **rec_ptx}), "seconds_rollout": t_roll, "seconds": time.time() - t_it}
            if cfg.kl_target is not None:
                beta = adaptive_kl_beta(beta, rec["kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
            log.log(rec)
            if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < iterations:
                ckpt.save(it + 1, models, optimizer, None, generators, metrics=log.lines,
                          state={"beta": beta, "episodes": episodes, "prompt_order": s.prompts.order})
            bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec['kl']:.2f}", refresh=False)
        log.close()
        s.policy.eval()
        full_policy = dist.full_state_dict(s.policy)
        if tmp is not None:
            save_policy(s.policy, s.tokenizer, tmp, full_policy)
        summary = {"stage": "pg", "algorithm": "pg", "iterations": iterations, "episodes": episodes,
                   "final": {k2: rec[k2] for k2 in ("reward", "kl", "gold_reward", "response_length") if k2 in rec},
                   "beta": beta, "world_size": dist.world_size(), "seconds": time.time() - t0,
                   "peak_rss_mb": peak_rss_mb(), "config": asdict(cfg)}
        if tmp is not None:
            write_json(tmp / "summary.json", summary)
    return summary
