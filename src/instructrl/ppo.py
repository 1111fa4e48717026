"""Step 3 with PPO(-ptx): several epochs of clipped updates over minibatches of each batch of rollouts
[PPO, IG, LHP, N+]. The driver (`rl.py`) samples and scores; this file is what makes it PPO:

  2. advantages: the KL in the reward (−β·k_t per token, the score on EOS), GAE (γ_d, λ) with returns before
     whitening, advantages whitened over the whole batch (all ranks)
  3. update (`update.py`): ppo_epochs × minibatches of the clipped policy loss + c_v · clipped value loss
     (+ γ · ptx loss), every loss normalised by the minibatch's token count over all ranks
"""
from __future__ import annotations

import torch

from . import distributed as dist
from .losses import gae, masked_whiten, value_loss
from .options import config, option
from .rl import RLConfig, register
from .rollout import Rollout
from .sampling import response_values
from .update import PolicyUpdate


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
class PPO(PolicyUpdate):
    name, config, needs_value = "ppo", PPOConfig, True

    def schedule(self, cfg: PPOConfig) -> tuple[int, int]:
        return cfg.ppo_epochs, cfg.minibatch_size

    def advantages(self, r: Rollout, beta: float) -> dict:
        """GAE on the KL-shaped rewards; the advantages whitened over the whole batch (all ranks) [LHP, N+]."""
        cfg, mask = self.cfg, r.mask
        rewards = self.rewards(r, beta)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, **whitening(rewards, mask))
        advantages, returns = gae(rewards, r.values, mask, cfg.gamma, cfg.lam)
        return {"advantages": masked_whiten(advantages, mask, **whitening(advantages, mask)), "returns": returns}

    def critic_loss(self, r: Rollout, mb, rows, cols, mask, n, targets) -> tuple[torch.Tensor, dict]:
        """c_v · the clipped value loss [LHP] of a micro-batch."""
        v = response_values(self.s.train_value, mb)
        vl, stats = value_loss(v, r.values[rows, cols], targets["returns"][rows, cols], mask, self.cfg.value_clip, n)
        return self.cfg.vf_coef * vl, {"value/loss": vl, "value/clipfrac": stats["vf_clipfrac"]}


def train_ppo(cfg: PPOConfig) -> dict:
    """Step 3 with PPO(-ptx) (the Python API of `instructrl ppo`)."""
    from .rl import train_rl

    return train_rl(cfg, PPO)
