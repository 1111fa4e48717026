"""Step 3 with PPO(-ptx): several epochs of clipped updates over minibatches of each batch of rollouts
[PPO, IG, LHP, N+]. The driver (`rl.py`) samples and scores; this file is what makes it PPO:

  2. advantages: the KL in the reward (−β·k_t per token, the score on EOS), GAE (γ_d, λ) with returns before
     whitening, advantages whitened over the whole batch (all ranks)
  3. update: ppo_epochs × minibatches of the clipped policy loss + c_v · clipped value loss (+ γ · ptx loss)

Under torchrun each rank updates on minibatch_size / N rollouts at a time; gradients are averaged (DDP), so N
ranks take as many optimizer steps as one (each loss is a per-rank token mean, averaged over ranks).
"""
from __future__ import annotations

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .losses import gae, masked_mean, masked_whiten, ppo_policy_loss, value_loss
from .models import trainable_parameters
from .optim import adam
from .options import config, option
from .rl import RLConfig, per_rank, ptx_term, register
from .rollout import Rollout, kl_in_loss, kl_in_reward, response_values, reward_beta, trim
from .sampling import response_logprobs


@config
class PPOConfig(RLConfig):
    ppo_epochs: int = option(4, "passes over each batch of rollouts")
    minibatch_size: int = option(16, "rollouts per optimizer step (global; divides batch_size)")
    clip: float = option(0.2, "policy clip range ε")
    value_clip: float = option(0.2, "value clip range ε_v")
    vf_coef: float = option(0.1, "value-loss coefficient c_v")
    gamma: float = option(1.0, "discount γ_d of GAE")
    lam: float = option(0.95, "GAE λ")
    whiten_rewards: bool = option(False, "whiten the shaped rewards (scale only) before GAE")


def whitening(x: torch.Tensor, mask: torch.Tensor) -> dict:
    """masked_whiten's mean and var over every rank's rollouts (in one process: its own, computed alike)."""
    mean, var = dist.masked_moments(x, mask)
    return {"mean": mean, "var": var}


@register
class PPO:
    name, config, needs_value = "ppo", PPOConfig, True

    @staticmethod
    def check(cfg: PPOConfig) -> None:
        if cfg.batch_size % cfg.minibatch_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of minibatch_size {cfg.minibatch_size}")

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
                mb, cols = trim(r.batch, rows)
                m = mask[rows, cols]
                self.optimizer.zero_grad(set_to_none=True)
                logp, entropy = response_logprobs(s.train_policy, mb, cfg.temperature, with_entropy=True)
                pl, pstats = ppo_policy_loss(logp, r.logprobs[rows, cols], advantages[rows, cols], m, cfg.clip)
                v = response_values(s.train_value, mb)
                vl, vstats = value_loss(v, r.values[rows, cols], returns[rows, cols], m, cfg.value_clip)
                loss = pl + cfg.vf_coef * vl
                kl = kl_in_loss(logp, r.logprobs[rows, cols], r.ref_logprobs[rows, cols], m, beta,
                                cfg.kl_estimator) if cfg.kl_in == "loss" else None
                if kl is not None:
                    loss = loss + kl
                ptx = ptx_term(s)
                if ptx is not None:
                    loss = loss + ptx
                if not self.nonfinite.ok(step, loss=loss):
                    continue
                loss.backward()
                grad_norm = clip_grad_norm_(self.params, cfg.max_grad_norm)
                if not self.nonfinite.ok(step, grad_norm=grad_norm):
                    continue
                self.optimizer.step()
                rec = {"policy/loss": pl.item(), "value/loss": vl.item(), "policy/entropy":
                       masked_mean(entropy.detach(), m).item(), "policy/grad_norm": float(grad_norm),
                       **{f"policy/{k}": float(x) for k, x in pstats.items()},
                       "value/clipfrac": float(vstats["vf_clipfrac"])}
                if ptx is not None:
                    rec["ptx/loss"] = ptx.item() / cfg.ptx_coef
                if kl is not None:
                    rec["policy/kl_loss"] = kl.item()
                for key, x in rec.items():
                    stats.setdefault(key, []).append(x)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        if stats:  # the sanity check of [N+]: on the first minibatch the ratio is 1 and the approx. KL 0
            out["policy/first_ratio"] = stats["policy/ratio_mean"][0]
            out["policy/first_approx_kl"] = stats["policy/approx_kl"][0]
        return dist.mean_dict(out)


def train_ppo(cfg: PPOConfig) -> dict:
    """Step 3 with PPO(-ptx) (the Python API of `instructrl ppo`)."""
    from .rl import train_rl

    return train_rl(cfg, PPO)
