"""Step 3 with vanilla policy gradient: the baseline the theory starts from ([RLHF-intro], its Figure 4).

Per iteration the driver (`rl.py`) samples k responses per prompt; this file takes ONE gradient step on
−mean_t((G_t − b) · log π_θ(y_t|s_t)) with the KL in the reward, and the samples are discarded. b is the batch
mean of the sequence return, or the leave-one-out mean over the k samples of the same prompt [RLOO]. Under
torchrun each rank samples batch_size / N of the rollouts; the batch-mean baseline spans all ranks, and the loss
(in micro-batches of --micro-batch-size) is normalised by the batch's token count over all ranks.
"""
from __future__ import annotations

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .losses import leave_one_out_baseline, masked_mean, pg_loss, reward_to_go
from .models import trainable_parameters
from .optim import adam
from .options import config, option
from .rl import RLConfig, ptx_batches, ptx_term, register
from .rollout import Rollout, kl_in_loss, kl_in_reward, reward_beta, trim
from .sampling import response_logprobs


@config
class PGConfig(RLConfig):
    baseline: str = option("mean", "mean | loo (leave-one-out over samples_per_prompt) [RLOO]",
                           choices=("mean", "loo"))
    samples_per_prompt: int = option(4, "k samples per prompt, used by the leave-one-out baseline", ge=1)
    gamma: float = option(1.0, "discount of the reward-to-go", ge=0, le=1)

    def check(self) -> None:
        super().check()
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
class PolicyGradient:
    name, config, needs_value = "pg", PGConfig, False

    def __init__(self, cfg: PGConfig, s, nonfinite):
        self.cfg, self.s, self.nonfinite = cfg, s, nonfinite
        self.samples_per_prompt = cfg.samples_per_prompt if cfg.baseline == "loo" else 1
        s.policy.train()
        self.params = trainable_parameters(s.policy)
        self.optimizer = adam(self.params, lr=cfg.lr, eps=cfg.adam_eps)
        self.models, self.generators = {"policy": s.policy}, {}

    def update(self, r: Rollout, beta: float, step: int) -> dict:
        """The one gradient step this batch of samples gets."""
        cfg, s, mask = self.cfg, self.s, r.mask
        advantages = pg_advantages(kl_in_reward(r, reward_beta(cfg, beta), cfg.kl_estimator), mask, cfg.gamma,
                                   cfg.samples_per_prompt if cfg.baseline == "loo" else None)
        rows, size, world = torch.arange(mask.shape[0]), cfg.mem.micro_batch_size, dist.world_size()
        micro = rows.split(size) if size else (rows,)
        n = dist.all_reduce_sum(mask.sum())  # response tokens of the batch, all ranks
        ptx = ptx_batches(s, len(micro))
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, list[float]] = {}
        for i, sub in enumerate(micro):  # gradient accumulation (DDP reduces on the last one); × N: DDP averages
            with dist.accumulating(s.train_policy, sync=i == len(micro) - 1):
                mb, cols = trim(r.batch, sub) if size else (r.batch, slice(None))
                m = mask[sub, cols]
                logp, entropy = response_logprobs(s.train_policy, mb, cfg.temperature, with_entropy=True)
                loss = pg_loss(logp, advantages[sub, cols], m, n)
                kl = kl_in_loss(logp, r.logprobs[sub, cols], r.ref_logprobs[sub, cols], m, beta, cfg.kl_estimator,
                                n=n) if cfg.kl_in == "loss" else None
                if kl is not None:
                    loss = loss + kl
                ptx_part = ptx_term(s, *ptx[i]) if i < len(ptx) else None
                if ptx_part is not None:
                    loss = loss + ptx_part
                (loss * world).backward()
            rec = {"policy/loss": loss.item() * world,
                   "policy/entropy": masked_mean(entropy.detach(), m, n=n).item() * world,
                   **({"ptx/loss": ptx_part.item() / cfg.ptx_coef * world} if ptx_part is not None else {}),
                   **({"policy/kl_loss": kl.item() * world} if kl is not None else {})}
            for key, x in rec.items():
                parts.setdefault(key, []).append(x)
        out = {key: sum(v) for key, v in parts.items()}
        grad_norm = float("nan")
        if self.nonfinite.ok(step, loss=out["policy/loss"]):
            grad_norm = clip_grad_norm_(self.params, cfg.max_grad_norm)
            if self.nonfinite.ok(step, grad_norm=grad_norm):
                self.optimizer.step()
        return dist.mean_dict({**out, "policy/grad_norm": float(grad_norm)})


def train_pg(cfg: PGConfig) -> dict:
    """Step 3 with vanilla policy gradient (the Python API of `instructrl pg`)."""
    from .rl import train_rl

    return train_rl(cfg, PolicyGradient)
