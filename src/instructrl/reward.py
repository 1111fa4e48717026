"""Step 2: a scalar reward model trained on K-way rankings with the InstructGPT loss.

All C(K,2) pairs of one prompt form one batch element (one forward pass per response) [IG §3.5]; pairs data is
the K = 2 case. About one epoch (more overfits). After training the scores are normalised: an optional gain so
the policy's samples have std 1 [LHP], then a bias so the demonstrations score mean 0 [IG].

Full fine-tuning or LoRA on the backbone (saved merged; the head is always trained), in one process or
data-parallel under torchrun: each rank takes its share of every global batch of prompts and the loss stays the
mean over the global batch's prompts.
"""
from __future__ import annotations

import json
import math
import random

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .chat import encode_demo, use_chat_template
from .data import DataError, Demo, Prompt, Ranking, Response, collate_right, read_demos, read_rankings, refuse_all_tied
from .losses import gold_pair_agreement, pairwise_accuracy, ranking_loss
from .models import ScalarHeadModel, apply_lora, checkpoint_activations, context_length, load_tokenizer, trainable_parameters
from .optim import adamw_cosine
from .options import LoraOptions, MemoryOptions, PairDataOptions, RunOptions, config, group, option
from .run import Run


@config
class RewardConfig:
    model: str = option("", "backbone: any local HF causal-LM directory (usually the SFT model)", wired=True,
                        required=True)
    data: str = option("", "rankings {prompt, responses, ranking} or pairs {prompt, chosen, rejected} (or {chosen, "
                           "rejected} transcripts): JSONL, or a .json/.parquet/.arrow file or directory read with "
                           "`datasets`", wired=True, required=True)
    out: str = option("", "output directory", wired=True, required=True)
    demos: str | None = option(None, "demonstrations: a bias so they score mean 0 [IG]", wired=True)
    normalize_gain: bool = option(True, "a gain so the ranked (policy) samples have std 1 [LHP]")
    gain_policy: str | None = option(None, "with rankings of several policies' samples: the gain is computed on "
                                           "those whose `policy` field is this one (the policy RL starts from; all "
                                           "rankings when none has it)")
    epochs: float = option(1.0, "passes over the training prompts (about one: more overfits [IG])", gt=0)
    batch_size: int = option(8, "prompts per batch, each with all its K responses (global under torchrun)", ge=1)
    lr: float = option(5e-5, "peak learning rate (AdamW, cosine decay)", gt=0)
    warmup_ratio: float = option(0.05, "share of the steps spent warming the learning rate up", ge=0, lt=1)
    val_fraction: float = option(0.1, "share of the prompts held out for accuracy", ge=0, lt=1)
    eval_every: int = option(0, "optimizer steps between held-out evaluations (0: only at the end)", ge=0)
    max_grad_norm: float = option(1.0, "gradient-norm clip", gt=0)
    grouped: bool = option(True, "all C(K,2) pairs of a prompt in one batch element (InstructGPT); false: the same "
                                 "comparisons shuffled as independent pairs")
    truncate_prompts: bool = option(False, "cut over-long prompts from the left instead of refusing them")
    run: RunOptions = group(RunOptions)
    lora: LoraOptions = group(LoraOptions, "lora_")
    mem: MemoryOptions = group(MemoryOptions)
    fmt: PairDataOptions = group(PairDataOptions)  # split: of --data; the columns: of --data and --demos


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each right-padded row's last real token (the EOS, or the end of turn) [N+ D12; pitfall 3]."""
    return mask.sum(1) - 1


def encode_pair(tokenizer, prompt: Prompt, response: Response, max_len: int, truncate: bool):
    """(ids, loss mask) of a (prompt, response) pair, ending with the token the reward is read at: the EOS appended
    to the text, or the chat template's end of turn (the token the RL sampler stops at)."""
    return encode_demo(tokenizer, Demo(prompt, response), max_len, truncate)


@torch.no_grad()
def score_texts(model: ScalarHeadModel, tokenizer, prompts: list[Prompt], responses: list[Response],
                batch_size: int = 64, truncate: bool = True) -> torch.Tensor:
    """Normalised rewards of (prompt, response) pairs (text or messages), read at the EOS appended to each response
    or at its end of turn."""
    device = next(model.parameters()).device
    max_len = context_length(model.backbone)
    out = []
    for i in range(0, len(prompts), batch_size):
        ex = [encode_pair(tokenizer, p, r, max_len, truncate) for p, r in zip(prompts[i:i + batch_size],
                                                                           responses[i:i + batch_size])]
        ids, mask, _ = collate_right(ex, tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        out.append(model.score(ids, mask, last_token_index(mask)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def score_texts_all_ranks(model, tokenizer, prompts: list[Prompt], responses: list[Response]) -> torch.Tensor:
    """score_texts over every rank's share, gathered (in one process: score_texts itself)."""
    mine, gather = dist.eval_share(list(range(len(prompts))), model)
    s = score_texts(model, tokenizer, [prompts[i] for i in mine], [responses[i] for i in mine])
    return dist.gather_cat(s) if gather else s


def rm_loss(raw: torch.Tensor, groups: list, counts: bool, n: float) -> torch.Tensor:
    """This micro-batch's share of the ranking loss as a mean over the global batch's prompts with ranked pairs
    (`n`, counted over every micro-batch and rank): its own mean × its share of those prompts × the number of
    ranks (DDP averages gradients). In one process without accumulation: `ranking_loss` itself."""
    n_local = sum(len(g) > 1 for g in groups) if counts else 0
    if n_local == n and not dist.active():
        return ranking_loss(raw, groups)
    if n_local == 0:
        return raw.sum() * 0.0
    return ranking_loss(raw, groups) * (n_local * dist.world_size() / n)


def _raw_rewards(model, tokenizer, batch: list[Ranking], max_len: int, truncate: bool, device, path) -> torch.Tensor:
    examples = []
    for r in batch:
        for resp in r.responses:
            try:
                examples.append(encode_pair(tokenizer, r.prompt, resp, max_len, truncate))
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
                c, t = gold_pair_agreement(raw[offset:offset + k].tolist(), gold)
                gold_correct, gold_total = gold_correct + c, gold_total + t
            offset += k
    if reduce:
        loss_sum, *counts = dist.sum_floats(loss_sum, correct, total, gold_correct, gold_total)
        correct, total, gold_correct, gold_total = (int(c) for c in counts)
    out = {"loss": loss_sum / max(1, n), "pairwise_accuracy": correct / max(1, total), "pairs": total}
    if gold_total:
        out["gold_pairwise_accuracy"] = gold_correct / gold_total
        out["gold_pairs"] = gold_total
    return out


def prompt_key(prompt: Prompt) -> str:
    """A prompt as a set member and sort key: text itself, messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def check_fits(rankings: list[Ranking], tokenizer, max_len: int, truncate: bool, path) -> None:
    """Every (prompt, response) must fit the context: fail now, naming the line, not mid-training."""
    for r in rankings:
        for resp in r.responses:
            try:
                encode_pair(tokenizer, r.prompt, resp, max_len, truncate)
            except ValueError as e:
                raise DataError(path, r.line, str(e), "responses") from None


def split_by_prompt(rankings: list[Ranking], val_fraction: float, rng: random.Random) -> tuple[list, list]:
    """(train, held out): held-out prompts drawn in a seeded order, so no prompt's responses are in both."""
    prompts = sorted({prompt_key(r.prompt) for r in rankings})
    rng.shuffle(prompts)
    held = set(prompts[: max(1, int(len(prompts) * val_fraction))]) if len(prompts) > 1 else set()
    train = [r for r in rankings if prompt_key(r.prompt) not in held]
    return train, [r for r in rankings if prompt_key(r.prompt) in held]


def next_indices(order: list[int], n_items: int, size: int, rng: random.Random) -> list[int]:
    """The next `size` indices of passes over n_items, each pass in a fresh seeded order; `order` (the rest of the
    current pass, kept in checkpoints) is consumed in place."""
    if len(order) < size:
        fresh = list(range(n_items))
        rng.shuffle(fresh)
        order += fresh
    taken = order[:size]
    del order[:size]
    return taken


def train_reward_model(cfg: RewardConfig) -> dict:
    run = Run("reward", cfg, cfg.run, cfg.out)
    device, dtype = run.device, run.dtype
    rankings = read_rankings(cfg.data, split=cfg.fmt.split, columns=cfg.fmt.columns())
    refuse_all_tied(rankings, cfg.data)
    demos = read_demos(cfg.demos, columns=cfg.fmt.columns()) if cfg.demos else None
    tokenizer = use_chat_template(load_tokenizer(cfg.model), cfg.fmt.chat_template)
    model = ScalarHeadModel.from_backbone(cfg.model, device, dtype)
    max_len = context_length(model.backbone)
    check_fits(rankings, tokenizer, max_len, cfg.truncate_prompts, cfg.data)

    # Held-out split by prompt, so no prompt's responses are in both.
    rng = random.Random(cfg.run.seed)
    train, val = split_by_prompt(rankings, cfg.val_fraction, rng)
    train_items = train if cfg.grouped else as_independent_pairs(train)

    comparisons = sum(len(r.pairs()) for r in train)
    # One epoch sees every comparison once; grouped and shuffled training take the same number of epochs.
    # Shuffled pairs use as many pairs per batch as a grouped batch holds, so both take the same optimizer steps.
    batch_size = cfg.batch_size if cfg.grouped else max(1, round(cfg.batch_size * comparisons / max(1, len(train))))
    steps = max(1, math.ceil(cfg.epochs * len(train_items) / batch_size))
    if cfg.lora.r:
        model.backbone = apply_lora(model.backbone, cfg.lora, causal_lm=False)
    if cfg.mem.gradient_checkpointing:
        checkpoint_activations(model)
    if cfg.run.fsdp:
        dist.fsdp_shard(model)
    train_model = dist.wrap(model, cfg.run.fsdp)  # training forwards (gradients averaged over ranks)
    params = trainable_parameters(model)
    optimizer, scheduler = adamw_cosine(params, cfg.lr, steps, cfg.warmup_ratio)
    # the data position: indices still to visit in the current pass
    st = run.resume({"model": model}, optimizer, scheduler, {"shuffle": rng}) or {"order": []}
    with run.output() as tmp:
        model.train()
        for step in run.progress(steps, desc="reward model"):
            rows = next_indices(st["order"], len(train_items), batch_size, rng)
            micro = dist.micro_batches([train_items[i] for i in rows], cfg.mem.micro_batch_size)
            (n,) = dist.sum_floats(float(sum(len(r.groups) > 1 for b, counts in micro if counts for r in b)))
            optimizer.zero_grad(set_to_none=True)
            parts, c, t = [], 0, 0
            for i, (batch, counts) in enumerate(micro):  # gradient accumulation (DDP reduces on the last one)
                with dist.accumulating(train_model, sync=i == len(micro) - 1):
                    raw = _raw_rewards(train_model, tokenizer, batch, max_len, cfg.truncate_prompts, device, cfg.data)
                    groups = [r.groups for r in batch]
                    part = rm_loss(raw, groups, counts, n)
                    part.backward()
                parts.append(part.detach())
                if counts:
                    pc, pt = pairwise_accuracy(raw.detach(), groups)
                    c, t = c + pc, t + pt
            loss = torch.stack(parts).sum()
            grad_norm = float("nan")
            if run.nonfinite.ok(step, loss=loss):
                grad_norm = clip_grad_norm_(params, cfg.max_grad_norm)
                if run.nonfinite.ok(step, grad_norm=grad_norm):
                    optimizer.step()
            scheduler.step()
            c, t = dist.sum_floats(c, t)
            rec = {"step": step, "train/loss": dist.all_reduce_mean(loss).item(),
                   "train/accuracy": c / max(1, t), "train/grad_norm": float(grad_norm),
                   "train/lr": scheduler.get_last_lr()[0]}
            if val and cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
                rec.update({f"eval/{k}": v for k, v in evaluate_rankings(model, tokenizer, val, cfg, device).items()})
                model.train()
            run.log(rec)
            run.maybe_save(step, step == steps, st)
            run.show(loss=rec["train/loss"])
        model.eval()
        held_out = evaluate_rankings(model, tokenizer, val, cfg, device) if val else {}
        if held_out:
            run.log({"step": steps, **{f"eval/{k}": v for k, v in held_out.items()}})
        own = [r for r in rankings if r.extra.get("policy") == cfg.gain_policy] if cfg.gain_policy else []
        gain, bias = normalise(model, tokenizer, own or rankings, demos, cfg.normalize_gain)
        demo_mean = float(score_texts_all_ranks(model, tokenizer, [p for p, _ in demos],
                                                [r for _, r in demos]).mean()) if demos else None
        full = dist.full_state_dict(model)  # FSDP: gathered by every rank
        if tmp is not None:
            model.save_pretrained(tmp, full)
            tokenizer.save_pretrained(str(tmp))
        return run.finish({"steps": steps, "train_prompts": len(train), "train_comparisons": comparisons,
                           "train_items": len(train_items), "grouped": cfg.grouped, "held_out_prompts": len(val),
                           "held_out_distinct_prompts": len({prompt_key(r.prompt) for r in val}),
                           "held_out": held_out, "norm_gain": gain, "norm_bias": bias, "demo_score_mean": demo_mean})


def normalise(model: ScalarHeadModel, tokenizer, rankings: list[Ranking], demos, with_gain: bool) -> tuple:
    """Gain so the ranked (policy) samples have std 1 [LHP], then bias so the demonstrations score mean 0 [IG];
    stored with the model and applied by score(). Returns (gain, bias)."""
    model.norm_gain, model.norm_bias = 1.0, 0.0
    gain, bias = 1.0, 0.0
    if with_gain:
        texts = [(r.prompt, resp) for r in rankings for resp in r.responses]
        s = score_texts_all_ranks(model, tokenizer, [p for p, _ in texts], [x for _, x in texts])
        gain = 1.0 / max(float(s.std()), 1e-6)
    if demos:
        model.norm_gain = gain
        s = score_texts_all_ranks(model, tokenizer, [p for p, _ in demos], [r for _, r in demos])
        bias = -float(s.mean())
    model.norm_gain, model.norm_bias = gain, bias
    return gain, bias
