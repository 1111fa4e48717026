"""Step 3 with PPO(-ptx): several epochs of clipped updates over minibatches of each batch of rollouts
[PPO, IG, LHP, N+]. The driver (`rl.py`) samples and scores; this file is what makes it PPO:

  2. advantages: the KL in the reward (−β·k_t per token, the score on EOS), GAE (γ_d, λ) with returns before
     whitening, advantages whitened over the whole batch (all ranks)
  3. update (`update.py`): ppo_epochs × minibatches of the clipped policy loss + c_v · clipped value loss
     (+ γ · ptx loss), every loss normalised by the minibatch's token count over all ranks

The knobs users of TRL's PPOTrainer and OpenRLHF expect are all off by default (README, PPO knobs): critic lr,
lr schedule, critic warm-up, entropy bonus, reward clip, overlong penalty, clip-higher, dual-clip.
"""
from __future__ import annotations

import torch

from . import distributed as dist
from .losses import gae, masked_whiten, value_loss
from .models import trainable_parameters
from .options import config, option
from .rl import RLConfig, register
from .rollout import Rollout
from .sampling import response_values
from .update import PolicyUpdate


SCHEDULES = ("constant", "linear", "cosine")


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
    # the knobs of TRL's PPOTrainer and OpenRLHF, off by default (update.py applies them)
    critic_lr: float | None = option(None, "learning rate of the value model (default: --lr) [ORLHF]", gt=0)
    lr_schedule: str = option("constant", "lr per iteration after the warm-up: constant | linear | cosine (to 0 at "
                                          "the last iteration) [TRL]", choices=SCHEDULES)
    warmup_iterations: int = option(0, "iterations of linear lr warm-up from 0 [TRL]", ge=0)
    critic_warmup_iterations: int = option(0, "first iterations that train the value model alone [ORLHF]", ge=0)
    entropy_coef: float = option(0.0, "entropy bonus c: − c · mean token entropy in the loss [PPO Eq. 9]", ge=0)
    reward_clip: float | None = option(None, "clip the score to [−C, C] before the KL and GAE [ORLHF]", gt=0)
    overlong_buffer: int = option(0, "last L tokens before --max-new-tokens where --overlong-penalty grows "
                                     "[DAPO Eq. 13]", ge=0)
    overlong_penalty: float = option(0.0, "score penalty at --max-new-tokens, linear over --overlong-buffer "
                                          "[DAPO Eq. 13]", ge=0)
    clip_high: float | None = option(None, "upper policy clip range ε_high ≥ ε, clip-higher (default: ε) [DAPO]",
                                     gt=0)
    dual_clip: float | None = option(None, "dual-clip c > 1: loss of A < 0 capped at −c·A [DualClip]", gt=1)

    def check(self) -> None:
        super().check()
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --minibatch-size "
                             f"{self.minibatch_size}")
        if self.clip_high is not None and self.clip_high < self.clip:
            raise ValueError(f"--clip-high ({self.clip_high}) must be at least --clip ({self.clip})")
        if (self.overlong_buffer > 0) != (self.overlong_penalty > 0):
            raise ValueError("--overlong-buffer and --overlong-penalty go together: set both > 0 (or neither)")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"--overlong-buffer ({self.overlong_buffer}) must be at most --max-new-tokens "
                             f"({self.max_new_tokens})")
        for name in ("warmup_iterations", "critic_warmup_iterations"):
            if getattr(self, name) >= self.iterations:
                raise ValueError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be below the run's "
                                 f"{self.iterations} iterations (--episodes // --batch-size)")


def whitening(x: torch.Tensor, mask: torch.Tensor) -> dict:
    """masked_whiten's mean and var over every rank's rollouts (in one process: its own, computed alike)."""
    mean, var = dist.masked_moments(x, mask)
    return {"mean": mean, "var": var}


@register
class PPO(PolicyUpdate):
    name, config, needs_value = "ppo", PPOConfig, True

    def schedule(self, cfg: PPOConfig) -> tuple[int, int]:
        return cfg.ppo_epochs, cfg.minibatch_size

    def param_groups(self) -> list:
        """The policy at --lr and, with --critic-lr, the value model in its own group at that rate [ORLHF]."""
        if self.cfg.critic_lr is None:
            return self.params
        return [{"params": trainable_parameters(self.s.policy)},
                {"params": trainable_parameters(self.s.value_model), "lr": self.cfg.critic_lr}]

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
