"""The policy update every online algorithm shares [PPO, N+, CleanRL ppo.py]: epochs × shuffled minibatches of one
batch of rollouts, one optimizer step per minibatch, each minibatch in micro-batches (gradient accumulation).

An algorithm (ppo.py, pg.py, grpo.py, rloo.py) subclasses `PolicyUpdate` and gives `advantages(r, beta)`; it may
change `schedule` (epochs, global minibatch size), `shuffle`, `aggregation`, `policy_loss` (default: the clipped
surrogate [PPO]), `critic_loss` (PPO's value loss) and `param_groups` (PPO: the critic's own lr). The knobs PPO's
config declares (`knob`: entropy bonus, clip-higher, dual-clip, reward clip, overlong penalty, lr schedule, critic
warm-up) act here, so any algorithm whose config declares one gets it; all are off by default.
One minibatch (`step`):

  1. this rank's rows, in micro-batches of --micro-batch-size; n = the minibatch's response tokens (and rows) over
     all ranks, so that each micro-batch's loss is its share of the global mean
  2. per micro-batch: loss = policy loss (+ value loss) (+ β·KL in the loss) (+ γ·ptx loss) (− c·entropy; in the
     critic warm-up: the value loss alone); backward of loss × N
     (DDP averages gradients over the N ranks); DDP/FSDP reduce on the last micro-batch only
  3. the non-finite policy on the loss, clip the gradient norm, the non-finite policy on it, optimizer step

So N ranks × k micro-batches take the optimizer step of one process on the whole minibatch (tests/test_memory.py).
Statistics: a micro-batch records its share × N, summed over micro-batches, averaged over steps and ranks.
`policy/loss` is the policy loss alone (the surrogate; PG: −A·log π) in every algorithm, `loss/total` the sum.
"""
from __future__ import annotations

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .losses import (aggregate, clip_reward, clipped_surrogate, kl_in_loss, kl_in_reward, masked_mean,
                     overlong_penalty, ptx_loss, surrogate_stats)
from .models import token_logprobs, trainable_parameters
from .optim import adam, rl_schedule
from .rl import per_rank
from .rollout import Rollout
from .sampling import response_logprobs, trim


def ptx_batches(s, k: int) -> list[tuple]:
    """This update's pretraining text for PPO-ptx in up to `k` micro-batches, each (ids, mask, n) with n the token
    count of every rank's text; [] without PPO-ptx. `s`: the `rl.RLSetup`."""
    if s.ptx is None:
        return []
    ids, mask = s.ptx.next(max(1, s.cfg.ptx_batch_size // dist.world_size()))
    ids, mask = ids.to(s.device), mask.to(s.device)
    n = dist.all_reduce_sum(mask[:, 1:].float().sum())
    size = -(-len(ids) // k)
    return [(i, m, n) for i, m in zip(ids.split(size), mask.split(size))]


def ptx_term(s, ids: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """A micro-batch's share of γ · (−mean log-likelihood) of the update's pretraining text [IG Eq. 2]."""
    return ptx_loss(token_logprobs(s.train_policy, ids, mask), mask[:, 1:].float(), s.cfg.ptx_coef, n)


class PolicyUpdate:
    """An online algorithm's optimizer and update; subclasses say how rollouts become advantages."""

    needs_value = False       # PPO: a value model, trained beside the policy
    shuffle = True            # PG: one minibatch, in rollout order
    samples_per_prompt = 1    # k samples of each prompt per batch (the driver repeats the prompts)

    def __init__(self, cfg, s, nonfinite):
        self.cfg, self.s, self.nonfinite = cfg, s, nonfinite
        epochs, minibatch = self.schedule(cfg)
        self.epochs, self.minibatch = epochs, per_rank(minibatch, "minibatch_size")
        self.models = {"policy": s.policy, **({"value": s.value_model} if self.needs_value else {})}
        self.train_models = [s.train_policy, *([s.train_value] if self.needs_value else [])]  # DDP/FSDP wrappers
        for m in self.models.values():
            m.train()
        self.params = [p for m in self.models.values() for p in trainable_parameters(m)]
        self.optimizer = adam(self.param_groups(), lr=cfg.lr, eps=cfg.adam_eps)
        # None by default (constant lr): stepped once per update, in checkpoints
        self.scheduler = rl_schedule(self.optimizer, self.knob("lr_schedule", "constant"),
                                     self.knob("warmup_iterations", 0), cfg.iterations)
        self.generators = {"shuffle": torch.Generator().manual_seed(cfg.run.seed + 1)} if self.shuffle else {}

    def knob(self, name: str, off=None):
        """A training knob that PPO's config declares (ppo.py); `off` where the algorithm's config has none."""
        return getattr(self.cfg, name, off)

    # --- what an algorithm says ---------------------------------------------------------------------------------
    def param_groups(self) -> list:
        """What the optimizer trains: by default every trainable parameter at --lr."""
        return self.params

    def schedule(self, cfg) -> tuple[int, int]:
        """(epochs, global minibatch size)."""
        return cfg.epochs, cfg.minibatch_size

    @property
    def aggregation(self) -> str:
        """How the per-token policy loss and KL become a scalar (`losses.aggregate`)."""
        return "token"

    def advantages(self, r: Rollout, beta: float) -> dict[str, torch.Tensor]:
        """{"advantages": [B, R], and whatever `critic_loss` needs} from a batch of rollouts."""
        raise NotImplementedError

    def policy_loss(self, logp, old_logp, advantages, mask, n, n_rows) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate [PPO] aggregated by `aggregation` (n, n_rows: the minibatch's token and row counts,
        all ranks), and its statistics."""
        per_token, clipped, unclipped, log_ratio = clipped_surrogate(logp, old_logp, advantages, mask, self.cfg.clip,
                                                                     self.knob("clip_high"), self.knob("dual_clip"))
        return (aggregate(per_token, mask, self.aggregation, self.cfg.max_new_tokens, n, n_rows),
                surrogate_stats(clipped, unclipped, log_ratio, mask, n))

    def critic_loss(self, r: Rollout, mb, rows, cols, mask, n, targets) -> tuple[torch.Tensor, dict] | None:
        """A critic's weighted loss term and statistics (PPO) on a micro-batch; None without one."""
        return None

    def scores(self, r: Rollout) -> torch.Tensor:
        """The sequence score training sees: clipped to ±--reward-clip [ORLHF], plus the soft overlong penalty
        [DAPO Eq. 13]; without either, the rollout's own tensor. [B]"""
        scores, limit, penalty = r.scores, self.knob("reward_clip"), self.knob("overlong_penalty", 0.0)
        if limit is not None:
            scores = clip_reward(scores, limit)
        if penalty:
            scores = scores + overlong_penalty(r.mask.sum(1), self.cfg.max_new_tokens, self.cfg.overlong_buffer,
                                               penalty)
        return scores

    def rewards(self, r: Rollout, beta: float) -> torch.Tensor:
        """Per-token rewards: the score on the last token, −β·k_t on each token when the KL is in the reward. [B, R]"""
        cfg = self.cfg
        return kl_in_reward(self.scores(r), r.logprobs, r.ref_logprobs, r.mask, beta if cfg.kl_in == "reward" else 0.0,
                            cfg.kl_estimator)

    # --- the update ---------------------------------------------------------------------------------------------
    def update(self, r: Rollout, beta: float, step: int) -> dict:
        """Advantages, then epochs × minibatches of this batch; statistics averaged over the steps and ranks."""
        targets, B = self.advantages(r, beta), r.mask.shape[0]
        stats: dict[str, list[float]] = {}
        for epoch in range(self.epochs):
            order = torch.randperm(B, generator=self.generators["shuffle"]) if self.shuffle else torch.arange(B)
            for rows in order.split(self.minibatch):
                for key, x in self.step(r, rows, targets, beta, step).items():
                    stats.setdefault(key, []).append(x)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        trained_on = self.scores(r)
        if trained_on is not r.scores:  # reward clip or overlong penalty: the score trained on
            out["objective/train_score"] = float(trained_on.mean())
        if self.scheduler is not None or len(self.optimizer.param_groups) > 1:
            out.update({f"{name}/lr": g["lr"] for name, g in zip(self.models, self.optimizer.param_groups)})
        if self.scheduler is not None:
            self.scheduler.step()
        if "policy/ratio_mean" in stats:  # the sanity check of [N+]: on the first minibatch the ratio is 1, the KL 0
            out["policy/first_ratio"] = stats["policy/ratio_mean"][0]
            out["policy/first_approx_kl"] = stats["policy/approx_kl"][0]
        return dist.mean_dict(out)

    def step(self, r: Rollout, rows: torch.Tensor, targets: dict, beta: float, step: int) -> dict:
        """One optimizer step on a minibatch (this rank's `rows`); its statistics, {} when the step is skipped."""
        size = self.cfg.mem.micro_batch_size
        micro = rows.split(size) if size else (rows,)
        n = dist.all_reduce_sum(r.mask[rows].sum())  # response tokens of the minibatch, all ranks
        n_rows = len(rows) * dist.world_size()       # its rollouts, all ranks (each holds as many)
        # critic warm-up [ORLHF freezing_actor_steps]: the first iterations train the value model alone
        train_policy = step > self.knob("critic_warmup_iterations", 0)
        ptx = ptx_batches(self.s, len(micro)) if train_policy else []
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, list[float]] = {}
        for i, sub in enumerate(micro):  # gradient accumulation: DDP reduces on the last micro-batch only
            with dist.accumulating(*self.train_models, sync=i == len(micro) - 1):
                part = self.backward(r, sub, targets, n, n_rows, ptx[i] if i < len(ptx) else None, beta,
                                     train_policy)
            for key, x in part.items():
                parts.setdefault(key, []).append(x)
        rec = {key: sum(v) for key, v in parts.items()}  # the minibatch's means
        if not self.nonfinite.ok(step, loss=rec["loss/total"]):
            return {}
        grad_norm = clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if not self.nonfinite.ok(step, grad_norm=grad_norm):
            return {}
        self.optimizer.step()
        return {**rec, "policy/grad_norm": float(grad_norm)}

    def backward(self, r: Rollout, rows, targets: dict, n, n_rows: int, ptx, beta: float,
                 train_policy: bool = True) -> dict:
        """Forward and backward of one micro-batch; its statistics as its share of the minibatch's × N ranks.
        `train_policy` False (critic warm-up): the value loss alone, the policy not run (no gradient: Adam skips it)."""
        cfg, world = self.cfg, dist.world_size()
        mb, cols = trim(r.batch, rows)  # the micro-batch without its all-padding columns
        m, old = r.mask[rows, cols], r.logprobs[rows, cols]
        if not train_policy:
            loss, rec = self.critic_loss(r, mb, rows, cols, m, n, targets)
            (loss * world).backward()
            return {key: x.item() * world for key, x in {**rec, "loss/total": loss}.items()}
        entropy_coef = self.knob("entropy_coef", 0.0)
        logp, entropy = response_logprobs(self.s.train_policy, mb, cfg.temperature, with_entropy=True,
                                          entropy_grad=entropy_coef > 0)
        loss, stats = self.policy_loss(logp, old, targets["advantages"][rows, cols], m, n, n_rows)
        rec = {"policy/loss": loss, **{f"policy/{k}": x for k, x in stats.items()}}
        critic = self.critic_loss(r, mb, rows, cols, m, n, targets)
        if critic is not None:  # PPO: + c_v · value loss
            term, critic_stats = critic
            loss = loss + term
            rec.update(critic_stats)
        if cfg.kl_in == "loss":  # β·KL aggregated like the policy loss [KLG, GRPO]
            kl = kl_in_loss(logp, old, r.ref_logprobs[rows, cols], m, beta, cfg.kl_estimator, self.aggregation,
                            cfg.max_new_tokens, n, n_rows)
            loss = loss + kl
            rec["policy/kl_loss"] = kl
        if ptx is not None:  # PPO-ptx [IG Eq. 2]
            ptx_part = ptx_term(self.s, *ptx)
            loss = loss + ptx_part
            rec["ptx/loss"] = ptx_part / cfg.ptx_coef
        if entropy_coef:  # the entropy bonus [PPO Eq. 9]: −c·H, aggregated like the policy loss
            loss = loss - entropy_coef * aggregate(entropy, m, self.aggregation, cfg.max_new_tokens, n, n_rows)
        (loss * world).backward()
        rec.update({"loss/total": loss, "policy/entropy": masked_mean(entropy.detach(), m, n=n)})
        return {key: x.item() * world for key, x in rec.items()}
