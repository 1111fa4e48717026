"""Step 3 with GRPO [GRPO]: k samples per prompt, each scored relative to its group, no value model.

The driver (`rl.py`) samples group_size responses per prompt; this file is what makes it GRPO:

  2. advantages: the sequence reward (the score, minus β·Σ_t k_t when the KL is in the reward) normalised within
     its group, A_i = (R_i − mean_group) / std_group (scale_rewards false: no division [DrGRPO]), the same on
     every token of the response
  3. update: epochs × minibatches of the clipped surrogate [PPO], aggregated over tokens (token | sequence |
     dr_grpo), plus β·KL in the loss (by default k3 with the ratio π_θ/π_old [KLG]) (+ γ · ptx loss)

Under torchrun each rank holds whole groups (the driver splits prompts, not samples) and gradients are averaged.
"""
from __future__ import annotations

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .losses import aggregate, clipped_surrogate, group_advantages, masked_mean, surrogate_stats
from .models import trainable_parameters
from .optim import adam
from .options import config, option
from .rl import RLConfig, per_rank, ptx_batches, ptx_term, register
from .rollout import KL_ESTIMATORS, KL_PLACES, Rollout, kl_in_loss, kl_in_reward, reward_beta, trim
from .sampling import response_logprobs

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


def clipped_epochs(algo, r: Rollout, advantages: torch.Tensor, beta: float, step: int, mode: str) -> dict:
    """epochs × shuffled minibatches of the clipped surrogate (+ KL in the loss, + ptx), aggregated by `mode`:
    the update GRPO and clipped RLOO share. Statistics averaged over minibatches and ranks."""
    cfg, s, mask = algo.cfg, algo.s, r.mask
    stats: dict[str, list[float]] = {}
    for epoch in range(cfg.epochs):
        for rows in torch.randperm(mask.shape[0], generator=algo.shuffle).split(algo.minibatch):
            mb, cols = trim(r.batch, rows)
            m = mask[rows, cols]
            algo.optimizer.zero_grad(set_to_none=True)
            logp, entropy = response_logprobs(s.train_policy, mb, cfg.temperature, with_entropy=True)
            old = r.logprobs[rows, cols]
            per_token, clipped, unclipped, log_ratio = clipped_surrogate(logp, old, advantages[rows, cols], m, cfg.clip)
            pl = aggregate(per_token, m, mode, cfg.max_new_tokens)
            loss = pl
            kl = kl_in_loss(logp, old, r.ref_logprobs[rows, cols], m, beta, cfg.kl_estimator, mode,
                            cfg.max_new_tokens) if cfg.kl_in == "loss" else None
            if kl is not None:
                loss = loss + kl
            ptx = next((ptx_term(s, *b) for b in ptx_batches(s, 1)), None)  # this minibatch's pretraining text
            if ptx is not None:
                loss = loss + ptx
            if not algo.nonfinite.ok(step, loss=loss):
                continue
            loss.backward()
            grad_norm = clip_grad_norm_(algo.params, cfg.max_grad_norm)
            if not algo.nonfinite.ok(step, grad_norm=grad_norm):
                continue
            algo.optimizer.step()
            rec = {"policy/loss": pl.item(), "policy/entropy": masked_mean(entropy.detach(), m).item(),
                   "policy/grad_norm": float(grad_norm),
                   **{f"policy/{k}": float(x) for k, x in surrogate_stats(clipped, unclipped, log_ratio, m).items()}}
            if kl is not None:
                rec["policy/kl_loss"] = kl.item()
            if ptx is not None:
                rec["ptx/loss"] = ptx.item() / cfg.ptx_coef
            for key, x in rec.items():
                stats.setdefault(key, []).append(x)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    if stats:  # on the first minibatch the ratio is 1 [N+]
        out["policy/first_ratio"] = stats["policy/ratio_mean"][0]
    return dist.mean_dict(out)


class ClippedGroupAlgorithm:
    """What GRPO and clipped RLOO share: a policy, Adam, a shuffle stream, k samples per prompt (the config field
    named by `group_field`)."""

    needs_value = False
    group_field = "samples_per_prompt"

    def __init__(self, cfg, s, nonfinite):
        self.cfg, self.s, self.nonfinite = cfg, s, nonfinite
        self.samples_per_prompt = getattr(cfg, self.group_field)
        self.minibatch = per_rank(cfg.minibatch_size, "minibatch_size")
        s.policy.train()
        self.params = trainable_parameters(s.policy)
        self.optimizer = adam(self.params, lr=cfg.lr, eps=cfg.adam_eps)
        self.shuffle = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.models, self.generators = {"policy": s.policy}, {"shuffle": self.shuffle}


@register
class GRPO(ClippedGroupAlgorithm):
    """Step 3 with GRPO: group-normalised advantages, clipped updates, no value model, KL in the loss."""

    name, config, group_field = "grpo", GRPOConfig, "group_size"

    def update(self, r: Rollout, beta: float, step: int) -> dict:
        cfg, mask = self.cfg, r.mask
        reward = kl_in_reward(r, reward_beta(cfg, beta), cfg.kl_estimator).sum(1)  # score − β·Σ_t k_t (or score)
        advantages = group_advantages(reward, cfg.group_size, cfg.scale_rewards)[:, None] * mask
        return clipped_epochs(self, r, advantages, beta, step, cfg.loss_agg)


def train_grpo(cfg: GRPOConfig) -> dict:
    """Step 3 with GRPO (the Python API of `instructrl grpo`)."""
    from .rl import train_rl

    return train_rl(cfg, GRPO)
