"""One batch of experience for every RL algorithm: sample → score (policy, reference, value, reward sources).

What the rollout does not decide is the algorithm's: where the KL goes (`losses.kl_in_reward` shapes per-token
rewards, `losses.kl_in_loss` adds it to the loss) and how advantages are formed. Under torchrun every rank samples
its own share of each batch (its own seed); `rollout_metrics` spans all ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed as dist
from .chat import stop_token_id
from .models import base_model, evaluating
from .sampling import SampleBatch, decode_responses, response_logprobs, response_values, sample


@dataclass
class Rollout:
    batch: SampleBatch
    logprobs: torch.Tensor        # [B, R] log π_old(y_t | s_t), temperature-scaled
    ref_logprobs: torch.Tensor    # [B, R] log π_ref(y_t | s_t), same temperature
    values: torch.Tensor | None   # [B, R] V(s_t) from the value model (algorithms with a critic)
    scores: torch.Tensor          # [B] the (weighted) reward (missing-EOS penalty applied)
    prompts: list                 # text or messages
    texts: list[str]
    gold: list[float] | None = None
    parts: dict[str, torch.Tensor] | None = None  # [B] each reward source's own score, by name

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.response_mask.float()


def make_rollout(s, prompts: list[str], prompt_ids: list[list[int]], with_values: bool,
                 generator: torch.Generator | None = None) -> Rollout:
    """Sample responses from `s.policy` (an `rl.RLSetup`), then one batched forward pass per model, no gradients.
    `generator`: the sampling noise (default: the run's, `s.generator`)."""
    with dist.inference(s.lockstep):
        cfg = s.cfg
        # Every row stays in the sampled batch to the end (drop_finished=False): its log-probs become log π_old
        # below, and the RL results the README reports were measured so; dropping rows would round them otherwise
        # (~1e-6) to save a share of the rollout, itself 0.4 s of a 3.6 s iteration on the default PPO-ptx stage.
        with evaluating(s.policy):  # a checkpointed model in training mode would sample without its KV cache
            batch = sample(s.policy, prompt_ids, eos_id=stop_token_id(s.tokenizer),
                           pad_id=s.tokenizer.pad_token_id,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           generator=s.generator if generator is None else generator, lockstep=s.lockstep,
                           drop_finished=False)
        mask = batch.response_mask.float()
        # log π_old: in float32 the sampler's own log-probs of the tokens it drew (same weights, dropout off, same
        # temperature) equal a full forward pass to ~1e-6 (tests/test_rl.py), so that pass is skipped. In bf16/fp16
        # the KV-cache and full-sequence numerics differ by ~1e-2: recompute, so the first PPO ratio stays 1; so in
        # bf16 autocast (--autocast).
        if (getattr(base_model(s.policy), "dtype", None) == torch.float32
                and not torch.is_autocast_enabled(batch.input_ids.device.type)):
            logprobs = batch.logprobs * mask
        else:
            logprobs = response_logprobs(s.policy, batch, cfg.temperature) * mask
        ref_logprobs = response_logprobs(s.ref, batch, cfg.temperature) * mask
        values = response_values(s.value_model, batch) * mask if with_values else None
        texts = decode_responses(s.tokenizer, batch)
        scores, parts = s.reward.score(prompts, texts, batch)
        scores = torch.where(batch.ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
        gold = s.judge.score_batch(prompts, texts) if s.judge is not None else None
        return Rollout(batch, logprobs, ref_logprobs, values, scores, prompts, texts, gold, parts)


def rollout_metrics(r: Rollout) -> dict:
    """Per-iteration statistics of a batch of experience, over every rank's rollouts. `objective/kl` is the
    sequence KL Σ_t (log π − log π_ref), whatever estimator shapes the reward."""
    return sequence_metrics(*sequence_stats(r))


def sequence_stats(r: Rollout) -> tuple:
    """Per response: score, sequence KL Σ_t (log π − log π_ref), length, ended; each source's score; gold."""
    mask = r.mask
    return (r.scores, ((r.logprobs - r.ref_logprobs) * mask).sum(1), mask.sum(1), r.batch.ended, r.parts or {},
            r.gold)


def sequence_metrics(scores, seq_kl, lengths, ended, parts: dict, gold: list[float] | None,
                     gather: bool = True) -> dict:
    """`rollout_metrics` of per-response values (`sequence_stats`), over every rank's rows (`gather`) or these."""
    rows = dist.gather_rows if gather else (lambda *t: t)
    objects = dist.gather_objects if gather else (lambda x: [x])
    scores, seq_kl, lengths, ended = rows(scores, seq_kl, lengths, ended)
    out = {"objective/score": float(scores.mean()), "objective/score_std": float(scores.std()),
           "objective/kl": float(seq_kl.mean()), "rollout/response_length": float(lengths.mean()),
           "rollout/eos_rate": float(ended.float().mean())}
    for name, part in parts.items():  # each source's own score, before weights and the missing-EOS penalty
        out[f"objective/score/{name}"] = float(rows(part)[0].mean())
    if gold is not None:
        gold = [g for part in objects(gold) for g in part]
        out["objective/gold"] = sum(gold) / len(gold)
    return out
