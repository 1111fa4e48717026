"""Step 2+3 in one, offline: DPO and its family trained directly on the rankings, no reward model, no sampling
[DPO, IPO, cDPO].

Each batch element is one prompt with all its K ranked responses; the loss averages over its C(K,2) pairs, then
over prompts, as the InstructGPT reward-model loss does [IG §3.5] (pairs data is K = 2). The reference is the SFT
model (--ref, default the initial policy) or, with LoRA, the policy with its adapters off (the weights held once).
Logged: the implicit rewards β(log π − log π_ref) of the preferred and the other responses, their margin and the
share of pairs they order correctly — on the training batches and on held-out prompts.
"""
from __future__ import annotations

import math
import random

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .chat import use_chat_template
from .data import Ranking, collate_right, read_rankings
from .losses import dpo_loss
from .models import (AdapterDisabled, apply_lora, context_length, freeze, load_causal_lm, load_tokenizer,
                     save_causal_lm, token_logprobs, trainable_parameters)
from .optim import adamw_cosine
from .options import LoraOptions, PairDataOptions, RunOptions, config, group, option
from .reward import check_fits, encode_pair, next_indices, split_by_prompt
from .run import Run

LOSSES = ("sigmoid", "ipo")


@config
class DPOConfig:
    policy: str = option("", "the SFT model: initial policy and, unless --ref is given, the frozen reference",
                         wired=True, required=True)
    data: str = option("", "rankings {prompt, responses, ranking} or pairs {prompt, chosen, rejected} (or {chosen, "
                           "rejected} transcripts): JSONL, or a .json/.parquet/.arrow file or directory read with "
                           "`datasets`", wired=True, required=True)
    out: str = option("", "output directory", wired=True, required=True)
    ref: str | None = option(None, "reference model (default: the policy's initial weights; with LoRA the policy "
                                   "with its adapters off)", wired=True)
    loss: str = option("sigmoid", "sigmoid (DPO) [DPO] | ipo [IPO]")
    beta: float = option(0.1, "β: strength of the implicit KL to the reference")
    label_smoothing: float = option(0.0, "ε of conservative DPO: the labels are wrong with probability ε (sigmoid "
                                         "only) [cDPO]")
    epochs: float = option(1.0, "passes over the training prompts")
    batch_size: int = option(8, "prompts per batch, each with all its K responses")
    lr: float = option(1e-4, "peak learning rate (AdamW, cosine decay)")
    warmup_ratio: float = option(0.05, "share of the steps spent warming the learning rate up")
    val_fraction: float = option(0.1, "share of the prompts held out for the implicit-reward accuracy")
    max_grad_norm: float = option(1.0, "gradient-norm clip")
    truncate_prompts: bool = option(False, "cut over-long prompts from the left instead of refusing them")
    run: RunOptions = group(RunOptions)
    lora: LoraOptions = group(LoraOptions, "lora_")
    fmt: PairDataOptions = group(PairDataOptions)  # of --data


def check_dpo(cfg: DPOConfig) -> None:
    if dist.launched():  # before Run joins the process group (world_size() is 1 until then)
        raise ValueError("dpo runs in a single process (torchrun is not supported yet)")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {cfg.loss!r}")
    if not cfg.beta > 0:
        raise ValueError(f"beta must be > 0, not {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), not {cfg.label_smoothing}")
    if cfg.label_smoothing and cfg.loss != "sigmoid":
        raise ValueError("label_smoothing (conservative DPO) applies to loss sigmoid only")


def sequence_logprobs(model, tokenizer, batch: list[Ranking], max_len: int, truncate: bool, device) -> torch.Tensor:
    """log π(response | prompt), summed over the response tokens (end of turn included), of every response of every
    ranking in `batch`, concatenated in order."""
    examples = [encode_pair(tokenizer, r.prompt, resp, max_len, truncate) for r in batch for resp in r.responses]
    ids, mask, loss_mask = collate_right(examples, tokenizer.pad_token_id)
    logp = token_logprobs(model, ids.to(device), mask.to(device))
    return (logp * loss_mask.to(device)).sum(1)


def batch_loss(policy, ref, tokenizer, batch: list[Ranking], cfg: DPOConfig, max_len: int, device):
    groups = [r.groups for r in batch]
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref, tokenizer, batch, max_len, cfg.truncate_prompts, device)
    logps = sequence_logprobs(policy, tokenizer, batch, max_len, cfg.truncate_prompts, device)
    return dpo_loss(logps, ref_logps, groups, cfg.beta, cfg.loss, cfg.label_smoothing)


@torch.no_grad()
def evaluate_dpo(policy, ref, tokenizer, rankings: list[Ranking], cfg: DPOConfig, max_len: int, device) -> dict:
    """Held-out loss, implicit-reward margin and pairwise accuracy (pair-weighted over batches)."""
    sums, n = {}, 0
    for b in range(0, len(rankings), cfg.batch_size):
        batch = rankings[b:b + cfg.batch_size]
        loss, stats = batch_loss(policy, ref, tokenizer, batch, cfg, max_len, device)
        pairs = sum(len(r.pairs()) for r in batch)
        for k, v in {"loss": loss, **stats}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * pairs
        n += pairs
    return {k: v / max(1, n) for k, v in sums.items()}


def dpo(cfg: DPOConfig) -> dict:
    """Offline preference optimisation on rankings (the Python API of `instructrl dpo`)."""
    check_dpo(cfg)
    run = Run("dpo", cfg, cfg.run, cfg.out)
    device, dtype = run.device, run.dtype
    rankings = read_rankings(cfg.data, split=cfg.fmt.split, columns=cfg.fmt.columns())
    tokenizer = use_chat_template(load_tokenizer(cfg.policy), cfg.fmt.chat_template)
    policy = load_causal_lm(cfg.policy, device, dtype)
    max_len = context_length(policy)
    check_fits(rankings, tokenizer, max_len, cfg.truncate_prompts, cfg.data)
    if cfg.lora.r:
        policy = apply_lora(policy, cfg.lora)
    ref = AdapterDisabled(policy) if cfg.lora.r and not cfg.ref else freeze(load_causal_lm(cfg.ref or cfg.policy,
                                                                                          device, dtype))
    # Held-out split by prompt, as the reward model's (same seed: the same prompts held out).
    rng = random.Random(cfg.run.seed)
    train, val = split_by_prompt(rankings, cfg.val_fraction, rng)  # as the reward model splits them
    steps, params = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size)), trainable_parameters(policy)
    optimizer, scheduler = adamw_cosine(params, cfg.lr, steps, cfg.warmup_ratio)
    st = run.resume({"policy": policy}, optimizer, scheduler, {"shuffle": rng}) or {"order": []}
    with run.output() as tmp:
        policy.train()
        for step in run.progress(steps, desc="dpo"):
            batch = [train[i] for i in next_indices(st["order"], len(train), cfg.batch_size, rng)]
            optimizer.zero_grad(set_to_none=True)
            loss, stats = batch_loss(policy, ref, tokenizer, batch, cfg, max_len, device)
            grad_norm = float("nan")
            if run.nonfinite.ok(step, loss=loss):
                loss.backward()
                grad_norm = clip_grad_norm_(params, cfg.max_grad_norm)
                if run.nonfinite.ok(step, grad_norm=grad_norm):
                    optimizer.step()
            scheduler.step()
            rec = {"step": step, "train/loss": loss.item(), "train/accuracy": float(stats["accuracy"]),
                   "train/margin": float(stats["margin"]), "train/chosen_reward": float(stats["chosen"]),
                   "train/rejected_reward": float(stats["rejected"]), "train/grad_norm": float(grad_norm),
                   "train/lr": scheduler.get_last_lr()[0]}
            run.log(rec)
            run.maybe_save(step, step == steps, st)
            run.show(loss=rec["train/loss"], acc=rec["train/accuracy"])
        policy.eval()
        held_out = evaluate_dpo(policy, ref, tokenizer, val, cfg, max_len, device) if val else {}
        if held_out:
            run.log({"step": steps, **{f"eval/{k}": v for k, v in held_out.items()}})
        if tmp is not None:
            save_causal_lm(policy, tmp)
            tokenizer.save_pretrained(str(tmp))
        return run.finish({"steps": steps, "train_prompts": len(train), "held_out_prompts": len(val),
                           "train_comparisons": sum(len(r.pairs()) for r in train), "held_out": held_out,
                           "final": {k: rec[k] for k in ("train/loss", "train/accuracy", "train/margin")}})
