"""Step 3 with PPO(-ptx): several epochs of clipped updates over minibatches of each batch of rollouts
[PPO, IG, LHP, N+]. The driver (`rl.py`) samples and scores; this file is what makes it PPO:

  2. advantages: the KL in the reward (−β·k_t per token, the score on EOS), GAE (γ_d, λ) with returns before
     whitening, advantages whitened over the whole batch (all ranks)
  3. update: ppo_epochs × minibatches of the clipped policy loss + c_v · clipped value loss (+ γ · ptx loss)

Under torchrun each rank updates on minibatch_size / N rollouts at a time, in micro-batches of --micro-batch-size
(gradient accumulation); every loss is normalised by the token count of the whole minibatch over all ranks, so N
ranks × k micro-batches take exactly the optimizer step of one process on the whole minibatch.
"""
from __future__ import annotations

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .losses import gae, masked_mean, masked_whiten, ppo_policy_loss, value_loss
from .models import trainable_parameters
from .optim import adam
from .options import config, option
from .rl import RLConfig, per_rank, ptx_batches, ptx_term, register
from .rollout import Rollout, kl_in_loss, kl_in_reward, response_values, reward_beta, trim
from .sampling import response_logprobs


@config
class PPOConfig(RLConfig):
    ppo_epochs: int = option(4, "passes over each batch of rollouts", ge=1)
    minibatch_size: int = option(16, "rollouts per optimizer step (global; divides batch_size)", ge=1)
    clip: float = option(0.2, "policy clip range ε", gt=0)
    value_clip: float = option(0.2, "value clip range ε_v", gt=0)
    vf_coef: float = option(0.1, "value-loss coefficient c_v", ge=0)
    gamma: float = option(1.0, "discount γ_d of GAE", ge=0, le=1)
    lam: float = option(0.95, "GAE λ", ge=0, le=1)
    whiten_rewards: bool = option(False, "whiten the shaped rewards (scale only) before GAE")

    def check(self) -> None:
        super().check()
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --minibatch-size "
                             f"{self.minibatch_size}")


def whitening(x: torch.Tensor, mask: torch.Tensor) -> dict:
    """masked_whiten's mean and var over every rank's rollouts (in one process: its own, computed alike)."""
    mean, var = dist.masked_moments(x, mask)
    return {"mean": mean, "var": var}


@register
class PPO:
    name, config, needs_value = "ppo", PPOConfig, True

    def __init__(self, cfg: PPOConfig, s, nonfinite):
        self.cfg, self.s, self.nonfinite = cfg, s, nonfinite
        self.minibatch = per_rank(cfg.minibatch_size, "minibatch_size")
        s.policy.train()
        s.value_model.train()
        self.params = trainable_parameters(s.policy) + trainable_parameters(s.value_model)
        self.optimizer = adam(self.params, lr=cfg.lr, eps=cfg.adam_eps)
        self.shuffle = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.models, self.generators = {"policy": s.policy, "value": s.value_model}, {"shuffle": self.shuffle}
        self.samples_per_prompt = 1

    def update(self, r: Rollout, beta: float, step: int) -> dict:
        """Advantages, then ppo_epochs passes over shuffled minibatches of this batch; statistics averaged."""
        cfg, s, mask = self.cfg, self.s, r.mask
        rewards = kl_in_reward(r, reward_beta(cfg, beta), cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, **whitening(rewards, mask))
        advantages, returns = gae(rewards, r.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, **whitening(advantages, mask))
        stats: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            for rows in torch.randperm(mask.shape[0], generator=self.shuffle).split(self.minibatch):
                micro = rows.split(cfg.mem.micro_batch_size) if cfg.mem.micro_batch_size else (rows,)
                n = dist.all_reduce_sum(mask[rows].sum())  # response tokens of the minibatch, all ranks
                ptx = ptx_batches(s, len(micro))
                self.optimizer.zero_grad(set_to_none=True)
                parts: dict[str, list[float]] = {}
                for i, sub in enumerate(micro):  # gradient accumulation (DDP reduces on the last one)
                    with dist.accumulating(s.train_policy, s.train_value, sync=i == len(micro) - 1):
                        part = self.backward(r, sub, advantages, returns, n, ptx[i] if i < len(ptx) else None, beta)
                    for key, x in part.items():
                        parts.setdefault(key, []).append(x)
                rec = {key: sum(v) for key, v in parts.items()}  # the minibatch's means (× N: see backward)
                if not self.nonfinite.ok(step, loss=rec.pop("loss")):
                    continue
                grad_norm = clip_grad_norm_(self.params, cfg.max_grad_norm)
                if not self.nonfinite.ok(step, grad_norm=grad_norm):
                    continue
                self.optimizer.step()
                rec["policy/grad_norm"] = float(grad_norm)
                for key, x in rec.items():
                    stats.setdefault(key, []).append(x)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        if stats:  # the sanity check of [N+]: on the first minibatch the ratio is 1 and the approx. KL 0
            out["policy/first_ratio"] = stats["policy/ratio_mean"][0]
            out["policy/first_approx_kl"] = stats["policy/approx_kl"][0]
        return dist.mean_dict(out)

    def backward(self, r: Rollout, rows: torch.Tensor, advantages, returns, n, ptx, beta: float) -> dict:
        """Forward and backward of one micro-batch. Its loss and statistics are its share of the minibatch's token
        means (`n`: the minibatch's tokens over all ranks) × the number of ranks, as DDP averages gradients and
        `mean_dict` the statistics; summed over micro-batches they are the minibatch's means."""
        cfg, s, world = self.cfg, self.s, dist.world_size()
        mb, cols = trim(r.batch, rows)
        m = r.mask[rows, cols]
        logp, entropy = response_logprobs(s.train_policy, mb, cfg.temperature, with_entropy=True)
        pl, pstats = ppo_policy_loss(logp, r.logprobs[rows, cols], advantages[rows, cols], m, cfg.clip, n)
        v = response_values(s.train_value, mb)
        vl, vstats = value_loss(v, r.values[rows, cols], returns[rows, cols], m, cfg.value_clip, n)
        loss = pl + cfg.vf_coef * vl
        kl = kl_in_loss(logp, r.logprobs[rows, cols], r.ref_logprobs[rows, cols], m, beta, cfg.kl_estimator, n=n) \
            if cfg.kl_in == "loss" else None
        if kl is not None:
            loss = loss + kl
        ptx_part = ptx_term(s, *ptx) if ptx is not None else None
        if ptx_part is not None:
            loss = loss + ptx_part
        (loss * world).backward()
        rec = {"loss": loss.item() * world, "policy/loss": pl.item() * world, "value/loss": vl.item() * world,
               "policy/entropy": masked_mean(entropy.detach(), m, n=n).item() * world,
               **{f"policy/{k}": float(x) * world for k, x in pstats.items()},
               "value/clipfrac": float(vstats["vf_clipfrac"]) * world}
        if ptx_part is not None:
            rec["ptx/loss"] = ptx_part.item() / cfg.ptx_coef * world
        if kl is not None:
            rec["policy/kl_loss"] = kl.item() * world
        return rec


def train_ppo(cfg: PPOConfig) -> dict:
    """Step 3 with PPO(-ptx) (the Python API of `instructrl ppo`)."""
    from .rl import train_rl

    return train_rl(cfg, PPO)
