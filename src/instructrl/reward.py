"""Step 2: a scalar reward model trained on K-way rankings with the InstructGPT loss.

All C(K,2) pairs of one prompt form one batch element (one forward pass per response) [IG §3.5]; pairs data is
the K = 2 case. About one epoch (more overfits). After training the scores are normalised: an optional gain so
the policy's samples have std 1 [LHP], then a bias so the demonstrations score mean 0 [IG].

Full fine-tuning or LoRA on the backbone (saved merged; the head is always trained), in one process or
data-parallel under torchrun: each rank takes its share of every global batch of prompts and the loss stays the
mean over the global batch's prompts.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import distributed as dist
from .checkpoint import Checkpointer, NonFiniteGuard
from .data import DataError, Ranking, collate_right, encode_example, read_demos, read_rankings
from .losses import pairwise_accuracy, ranking_loss
from .models import ScalarHeadModel, apply_lora, context_length, load_tokenizer, lora_options, trainable_parameters
from .utils import (MetricsLog, adam, checkpoint_dir, peak_rss_mb, resolve_device, resolve_dtype, set_seed,
                    write_json)


@dataclass
class RewardConfig:
    model: str = ""
    data: str = ""
    out: str = ""
    demos: str | None = None       # demonstrations for the mean-0 bias [IG]
    normalize_gain: bool = True    # scale so the ranked (policy) samples have std 1 [LHP]
    epochs: float = 1.0
    batch_size: int = 8            # prompts per batch (each with all its K responses)
    lr: float = 5e-5
    warmup_ratio: float = 0.05
    val_fraction: float = 0.1
    grouped: bool = True           # False: the same comparisons shuffled as independent pairs (for comparison)
    truncate_prompts: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    save_every: int = 0            # optimizer steps between checkpoints in OUT-checkpoints/ (0 = none)
    resume: bool = False
    keep_checkpoints: int = 2
    max_nonfinite: int = 3
    progress: bool = True
    lora_r: int = 0                # LoRA rank on the backbone (0: full fine-tuning); saved merged
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None
    fsdp: bool = False             # shard the model over the ranks (basic support: no checkpoints, no LoRA)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each right-padded row's last real token (the EOS) [N+ D12; pitfall 3]."""
    return mask.sum(1) - 1


@torch.no_grad()
def score_texts(model: ScalarHeadModel, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64,
                truncate: bool = True) -> torch.Tensor:
    """Normalised rewards of (prompt, response) pairs, read at the EOS appended to each response."""
    device = next(model.parameters()).device
    max_len = context_length(model.backbone)
    out = []
    for i in range(0, len(prompts), batch_size):
        ex = [encode_example(tokenizer, p, r, max_len, truncate) for p, r in zip(prompts[i:i + batch_size],
                                                                              responses[i:i + batch_size])]
        ids, mask, _ = collate_right(ex, tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        out.append(model.score(ids, mask, last_token_index(mask)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def score_texts_all_ranks(model, tokenizer, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """score_texts over every rank's share, gathered (in one process: score_texts itself)."""
    mine, gather = dist.eval_share(list(range(len(prompts))), model)
    s = score_texts(model, tokenizer, [prompts[i] for i in mine], [responses[i] for i in mine])
    return dist.gather_cat(s) if gather else s


def rm_loss(raw: torch.Tensor, groups: list, counts: bool = True) -> torch.Tensor:
    """The ranking loss as a mean over the global batch's prompts with ranked pairs: this rank's mean × its share
    of those prompts × the number of ranks (DDP averages gradients). In one process: `ranking_loss` itself."""
    if not dist.active():
        return ranking_loss(raw, groups)
    n_local = sum(len(g) > 1 for g in groups) if counts else 0
    (n_global,) = dist.sum_floats(float(n_local))
    if n_local == 0:
        return raw.sum() * 0.0
    return ranking_loss(raw, groups) * (n_local * dist.world_size() / n_global)


def _raw_rewards(model, tokenizer, batch: list[Ranking], max_len: int, truncate: bool, device, path) -> torch.Tensor:
    examples = []
    for r in batch:
        for resp in r.responses:
            try:
                examples.append(encode_example(tokenizer, r.prompt, resp, max_len, truncate))
            except ValueError as e:
                raise DataError(path, r.line, str(e), "responses") from None
    ids, mask, _ = collate_right(examples, tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    raw = model(ids, mask)
    return raw.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def as_independent_pairs(rankings: list[Ranking]) -> list[Ranking]:
    """The InstructGPT ablation: every comparison as its own K = 2 example, to be shuffled across prompts."""
    out = []
    for r in rankings:
        for w, l in r.pairs():
            out.append(Ranking(r.prompt, [r.responses[w], r.responses[l]], [[0], [1]],
                               {"gold_scores": [r.extra["gold_scores"][w], r.extra["gold_scores"][l]]}
                               if "gold_scores" in r.extra else {}))
    return out


@torch.no_grad()
def evaluate_rankings(model, tokenizer, rankings: list[Ranking], cfg: RewardConfig, device) -> dict:
    """Held-out loss and pairwise accuracy vs the labels, and vs the gold scores when the data carries them."""
    max_len = context_length(model.backbone)
    loss_sum, correct, total, gold_correct, gold_total = 0.0, 0, 0, 0, 0
    n = len(rankings)
    rankings, reduce = dist.eval_share(rankings, model)
    for b in range(0, len(rankings), cfg.batch_size):
        batch = rankings[b:b + cfg.batch_size]
        raw = _raw_rewards(model, tokenizer, batch, max_len, cfg.truncate_prompts, device, cfg.data).double().cpu()
        groups = [r.groups for r in batch]
        loss_sum += ranking_loss(raw, groups).item() * len(batch)
        c, t = pairwise_accuracy(raw, groups)
        correct, total = correct + c, total + t
        offset = 0
        for r in batch:  # gold order: a strict order of the gold scores, gold ties skipped
            gold = r.extra.get("gold_scores")
            k = len(r.responses)
            if isinstance(gold, list) and len(gold) == k:
                for i in range(k):
                    for j in range(k):
                        if gold[i] > gold[j]:
                            gold_total += 1
                            gold_correct += int(raw[offset + i] > raw[offset + j])
            offset += k
    if reduce:
        loss_sum, *counts = dist.sum_floats(loss_sum, correct, total, gold_correct, gold_total)
        correct, total, gold_correct, gold_total = (int(c) for c in counts)
    out = {"loss": loss_sum / max(1, n), "pairwise_accuracy": correct / max(1, total), "pairs": total}
    if gold_total:
        out["gold_pairwise_accuracy"] = gold_correct / gold_total
        out["gold_pairs"] = gold_total
    return out


def train_reward_model(cfg: RewardConfig) -> dict:
    t0 = time.time()
    set_seed(cfg.seed)
    dist.check_fsdp(cfg)
    device, dtype = dist.init(resolve_device(cfg.device)), resolve_dtype(cfg.dtype)
    rankings = read_rankings(cfg.data)
    demos = read_demos(cfg.demos) if cfg.demos else None
    tokenizer = load_tokenizer(cfg.model)
    model = ScalarHeadModel.from_backbone(cfg.model, device, dtype)
    max_len = context_length(model.backbone)
    for r in rankings:  # every example must fit the context: fail now, naming the line, not mid-training
        for resp in r.responses:
            try:
                encode_example(tokenizer, r.prompt, resp, max_len, cfg.truncate_prompts)
            except ValueError as e:
                raise DataError(cfg.data, r.line, str(e), "responses") from None

    # Held-out split by prompt, so no prompt's responses are in both.
    rng = random.Random(cfg.seed)
    prompts = sorted({r.prompt for r in rankings})
    rng.shuffle(prompts)
    held = set(prompts[: max(1, int(len(prompts) * cfg.val_fraction))]) if len(prompts) > 1 else set()
    train = [r for r in rankings if r.prompt not in held]
    val = [r for r in rankings if r.prompt in held]
    if cfg.grouped:
        train_items = train
    else:
        train_items = as_independent_pairs(train)

    comparisons = sum(len(r.pairs()) for r in train)
    # One epoch sees every comparison once; grouped and shuffled training take the same number of epochs.
    # Shuffled pairs use as many pairs per batch as a grouped batch holds, so both take the same optimizer steps.
    batch_size = cfg.batch_size if cfg.grouped else max(1, round(cfg.batch_size * comparisons / max(1, len(train))))
    steps = max(1, math.ceil(cfg.epochs * len(train_items) / batch_size))
    if cfg.lora_r:
        model.backbone = apply_lora(model.backbone, lora_options(cfg), causal_lm=False)
    if cfg.fsdp:
        dist.fsdp_shard(model)
    train_model = dist.wrap(model, cfg.fsdp)  # training forwards (gradients averaged over ranks)
    params = trainable_parameters(model)
    opt = adam(params, decoupled_weight_decay=True, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
    guard = NonFiniteGuard("rm", cfg.max_nonfinite)
    ckpt = Checkpointer(checkpoint_dir(cfg.out), cfg.keep_checkpoints)
    st: dict = {"step": 0, "order": []}  # the data position: indices still to visit in the current pass
    previous: list[str] = []
    if cfg.resume and (restored := ckpt.load_latest({"model": model}, opt, sched, {"shuffle": rng})):
        _, st, previous = restored
    with dist.output_dir(cfg.out) as tmp:
        log = MetricsLog(tmp / "metrics.jsonl" if tmp else None, previous)
        model.train()
        bar = tqdm(range(st["step"], steps), desc="reward model", disable=not (cfg.progress and dist.is_main()),
                   dynamic_ncols=True)
        for step in bar:
            if len(st["order"]) < batch_size:
                fresh = list(range(len(train_items)))
                rng.shuffle(fresh)
                st["order"] += fresh
            batch, counts = dist.local_batch([train_items[i] for i in st["order"][:batch_size]])
            del st["order"][:batch_size]
            raw = _raw_rewards(train_model, tokenizer, batch, max_len, cfg.truncate_prompts, device, cfg.data)
            groups = [r.groups for r in batch]
            loss = rm_loss(raw, groups, counts)
            guard.step(step + 1, opt, loss, params, 1.0)
            sched.step()
            c, t = pairwise_accuracy(raw.detach(), groups) if counts else (0, 0)
            c, t = dist.sum_floats(c, t)
            global_loss = dist.all_reduce_mean(loss.detach()).item()
            log.log({"step": step + 1, "loss": global_loss, "accuracy": c / max(1, t), "lr": sched.get_last_lr()[0]})
            st["step"] = step + 1
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                ckpt.save(step + 1, {"model": model}, opt, sched, {"shuffle": rng}, state=st, metrics=log.lines)
            bar.set_postfix(loss=f"{global_loss:.3f}", refresh=False)
        model.eval()
        held_out = evaluate_rankings(model, tokenizer, val, cfg, device) if val else {}

        # Normalisation, stored with the model and applied by score(): gain first, then bias.
        model.norm_gain, model.norm_bias = 1.0, 0.0
        gain, bias = 1.0, 0.0
        if cfg.normalize_gain:
            policy_texts = [(r.prompt, resp) for r in rankings for resp in r.responses]
            s = score_texts_all_ranks(model, tokenizer, [p for p, _ in policy_texts], [x for _, x in policy_texts])
            gain = 1.0 / max(float(s.std()), 1e-6)
        if demos:
            model.norm_gain = gain
            s = score_texts_all_ranks(model, tokenizer, [p for p, _ in demos], [r for _, r in demos])
            bias = -float(s.mean())
        model.norm_gain, model.norm_bias = gain, bias
        demo_mean = float(score_texts_all_ranks(model, tokenizer, [p for p, _ in demos],
                                                [r for _, r in demos]).mean()) if demos else None
        full = dist.full_state_dict(model)  # FSDP: gathered by every rank
        if tmp is not None:
            model.save_pretrained(tmp, full)
            tokenizer.save_pretrained(str(tmp))
        summary = {"stage": "reward", "steps": steps, "train_prompts": len(train), "train_comparisons": comparisons,
                   "train_items": len(train_items), "grouped": cfg.grouped, "held_out_prompts": len(val),
                   "held_out": held_out, "norm_gain": gain, "norm_bias": bias, "demo_score_mean": demo_mean,
                   "world_size": dist.world_size(), "seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb(),
                   "config": asdict(cfg)}
        if tmp is not None:
            write_json(tmp / "summary.json", summary)
    return summary
