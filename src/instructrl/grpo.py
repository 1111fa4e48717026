"""Step 3 with GRPO [GRPO]: k samples per prompt, each scored relative to its group, no value model.

The driver (`rl.py`) samples group_size responses per prompt; this file is what makes it GRPO:

  2. advantages: the sequence reward (the score, minus β·Σ_t k_t when the KL is in the reward) normalised within
     its group, A_i = (R_i − mean_group) / std_group (scale_rewards false: no division [DrGRPO]), the same on
     every token of the response
  3. update (`update.py`): epochs × minibatches of the clipped surrogate [PPO], aggregated over tokens (token |
     sequence | dr_grpo), plus β·KL in the loss (by default k3 with the ratio π_θ/π_old [KLG]) (+ γ · ptx loss),
     normalised by the minibatch's token (or row) count over all ranks and micro-batches

Under torchrun each rank holds whole groups (the driver splits prompts, not samples).
"""
from __future__ import annotations

from .losses import KL_ESTIMATORS, KL_PLACES, group_advantages
from .options import config, option
from .rl import RLConfig, register
from .rollout import Rollout
from .update import PolicyUpdate

AGGREGATIONS = ("token", "sequence", "dr_grpo")


@config
class GRPOConfig(RLConfig):
    kl_estimator: str = option("k3", "per-token KL estimator: k1 | k3 in the reward; k2 | k3 in the loss [KL, KLG]",
                               choices=tuple(KL_ESTIMATORS))
    kl_in: str = option("loss", "where the KL penalty goes: loss (β·KL aggregated like the policy loss; k3 with the "
                                "ratio π_θ/π_old) | reward (−β·Σ_t k_t in the sequence reward) [GRPO, KLG]",
                        choices=tuple(KL_PLACES))
    group_size: int = option(4, "k samples per prompt (divides batch_size) [GRPO]", ge=2)
    scale_rewards: bool = option(True, "divide the group-centred rewards by the group std (false: Dr. GRPO) [DrGRPO]")
    loss_agg: str = option("token", "loss aggregation: token (mean over all tokens) [DAPO] | sequence (mean of "
                                    "per-sequence means) [GRPO] | dr_grpo (sum / (max_new_tokens · rows)) [DrGRPO]",
                           choices=AGGREGATIONS)
    epochs: int = option(2, "passes over each batch of rollouts", ge=1)
    minibatch_size: int = option(32, "rollouts per optimizer step (global; divides batch_size)", ge=1)
    clip: float = option(0.2, "policy clip range ε", gt=0)

    def check(self) -> None:
        super().check()
        check_groups(self, "group_size")


def check_groups(cfg, k_field: str) -> None:
    """The rules GRPO and clipped RLOO share: whole groups of k samples per batch, minibatches that divide it."""
    k = getattr(cfg, k_field)
    if cfg.batch_size % k:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --{k_field.replace('_', '-')} {k}")
    if cfg.batch_size % cfg.minibatch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --minibatch-size {cfg.minibatch_size}")


class ClippedGroupAlgorithm(PolicyUpdate):
    """What GRPO and clipped RLOO share: k samples per prompt (the config field named by `group_field`)."""

    group_field = "samples_per_prompt"

    @property
    def samples_per_prompt(self) -> int:
        return getattr(self.cfg, self.group_field)


@register
class GRPO(ClippedGroupAlgorithm):
    """Step 3 with GRPO: group-normalised advantages, clipped updates, no value model, KL in the loss."""

    name, config, group_field = "grpo", GRPOConfig, "group_size"

    @property
    def aggregation(self) -> str:
        return self.cfg.loss_agg

    def advantages(self, r: Rollout, beta: float) -> dict:
        reward = self.rewards(r, beta).sum(1)  # score − β·Σ_t k_t (or the score)
        return {"advantages": group_advantages(reward, self.cfg.group_size, self.cfg.scale_rewards)[:, None] * r.mask}


def train_grpo(cfg: GRPOConfig) -> dict:
    """Step 3 with GRPO (the Python API of `instructrl grpo`)."""
    from .rl import train_rl

    return train_rl(cfg, GRPO)
