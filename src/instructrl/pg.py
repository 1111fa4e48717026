"""Step 3 with vanilla policy gradient: the baseline the theory starts from ([RLHF-intro], its Figure 4).

Per iteration the driver (`rl.py`) samples k responses per prompt; this file takes ONE gradient step (`update.py`:
one epoch, one minibatch) on −mean_t((G_t − b) · log π_θ(y_t|s_t)) with the KL in the reward, and the samples are
discarded (`--epochs`/`--minibatch-size` reuse them instead: claim 3's ablation, the pipeline's `pg_reuse`
stage). b is the batch mean of the sequence return, or the leave-one-out mean over the k samples of the same
prompt [RLOO]. Under torchrun each rank samples batch_size / N of the rollouts; the batch-mean baseline spans all
ranks, and the loss is normalised by the batch's token count over all ranks.
"""
from __future__ import annotations

import torch

from . import distributed as dist
from .losses import leave_one_out_baseline, pg_loss, reward_to_go
from .options import config, option
from .rl import RLConfig, register
from .rollout import Rollout
from .update import PolicyUpdate


@config
class PGConfig(RLConfig):
    baseline: str = option("mean", "mean | loo (leave-one-out over samples_per_prompt) [RLOO]",
                           choices=("mean", "loo"))
    samples_per_prompt: int = option(4, "k samples per prompt, used by the leave-one-out baseline", ge=1)
    gamma: float = option(1.0, "discount of the reward-to-go", ge=0, le=1)
    epochs: int = option(1, "gradient passes over each batch of samples. Vanilla PG takes 1; more reuse the batch "
                            "without PPO's ratio or clip, which the theory warns makes destructively large updates "
                            "(benchmarks/claim3.py measures it)", ge=1)
    minibatch_size: int = option(0, "samples per gradient step (global; divides batch_size); 0: the whole batch",
                                 ge=0)

    def check(self) -> None:
        super().check()
        if self.minibatch_size and self.batch_size % self.minibatch_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --minibatch-size "
                             f"{self.minibatch_size}")
        if self.baseline == "loo" and (self.samples_per_prompt < 2 or self.batch_size % self.samples_per_prompt):
            raise ValueError(f"--baseline loo needs --samples-per-prompt >= 2 dividing --batch-size "
                             f"({self.batch_size}), not {self.samples_per_prompt}")


def pg_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, loo_k: int | None) -> torch.Tensor:
    """A_t = G_t − b, with b from the sequence returns G_0: the leave-one-out mean over loo_k samples per prompt
    [RLOO], or (loo_k None) the batch mean (all ranks' rows)."""
    returns = reward_to_go(rewards, mask, gamma)
    g0 = returns[:, 0]
    baseline = leave_one_out_baseline(g0, loo_k) if loo_k \
        else dist.all_reduce_mean(g0.mean()).expand_as(g0)
    return (returns - baseline[:, None]) * mask


@register
class PolicyGradient(PolicyUpdate):
    name, config, needs_value = "pg", PGConfig, False

    @property
    def shuffle(self) -> bool:
        """One epoch of one minibatch (vanilla PG) takes the whole batch in rollout order; more, shuffled as PPO's."""
        return self.cfg.epochs > 1 or self.cfg.minibatch_size not in (0, self.cfg.batch_size)

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.samples_per_prompt if self.cfg.baseline == "loo" else 1

    def schedule(self, cfg: PGConfig) -> tuple[int, int]:
        return cfg.epochs, cfg.minibatch_size or cfg.batch_size

    def advantages(self, r: Rollout, beta: float) -> dict:
        loo_k = self.samples_per_prompt if self.cfg.baseline == "loo" else None
        return {"advantages": pg_advantages(self.rewards(r, beta), r.mask, self.cfg.gamma, loo_k)}

    def policy_loss(self, logp, old_logp, advantages, mask, n, n_rows) -> tuple[torch.Tensor, dict]:
        """−mean_t(A_t · log π_θ(y_t|s_t)) [RLHF-intro]: no ratio, no clip."""
        return pg_loss(logp, advantages, mask, n), {}


def train_pg(cfg: PGConfig) -> dict:
    """Step 3 with vanilla policy gradient (the Python API of `instructrl pg`)."""
    from .rl import train_rl

    return train_rl(cfg, PolicyGradient)
