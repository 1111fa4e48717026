"""Step 1: supervised fine-tuning on demonstrations (prompt → response).

Cross-entropy on the response tokens only (with a chat template: every assistant turn, its end of turn included;
without: the response and the EOS appended; see chat.encode_demo), dropout off, cosine schedule, AdamW, validation
loss with early stopping [IG §3.5; N+ D3, D7]. Works on any local Hugging Face causal-LM directory, with full
fine-tuning or LoRA adapters (saved merged), in one process or data-parallel under torchrun (each rank takes its
share of every global batch; the loss is normalised by the global token count, so N ranks × B/N equal 1 × B).
"""
from __future__ import annotations

import json
import math
import random
import warnings

import torch
from torch.nn.utils import clip_grad_norm_

from . import distributed as dist
from .chat import encode_demo, use_chat_template
from .data import DataError, collate_right, read_demos
from .models import (apply_lora, checkpoint_activations, context_length, load_causal_lm, load_tokenizer, save_causal_lm, token_logprobs,
                     trainable_parameters, trainable_state)
from .optim import adamw_cosine
from .options import DemoDataOptions, LoraOptions, MemoryOptions, RunOptions, config, group, option
from .run import Run


@config
class SFTConfig:
    model: str = option("", "any local Hugging Face causal-LM directory", wired=True, required=True)
    data: str = option("", "demonstrations {prompt, completion} or {messages}: JSONL, or a .json/.parquet/.arrow "
                           "file or directory read with `datasets`", wired=True, required=True)
    out: str = option("", "output directory", wired=True, required=True)
    epochs: int = option(2, "passes over the training demonstrations", ge=0)
    batch_size: int = option(16, "demonstrations per optimizer step (global: under torchrun each process takes 1/N)", ge=1)
    lr: float = option(1e-4, "peak learning rate (AdamW, cosine decay)", gt=0)
    warmup_ratio: float = option(0.05, "share of the steps spent warming the learning rate up", ge=0, lt=1)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    val_fraction: float = option(0.1, "share of the demonstrations held out for the validation loss", ge=0, lt=1)
    patience: int = option(2, "evaluations without improvement before stopping early", ge=1)
    eval_every: int = option(20, "optimizer steps between validation passes", ge=1)
    max_grad_norm: float = option(1.0, "gradient-norm clip", gt=0)
    truncate_prompts: bool = option(False, "cut over-long prompts from the left instead of refusing them")
    run: RunOptions = group(RunOptions)
    lora: LoraOptions = group(LoraOptions, "lora_")
    mem: MemoryOptions = group(MemoryOptions)
    fmt: DemoDataOptions = group(DemoDataOptions)


def sft_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the mean NLL over the response tokens of the global batch: its sum / `n`, the
    token count of all micro-batches of all ranks, × the number of ranks because DDP averages gradients. In one
    process without accumulation: the plain masked mean."""
    return -(logprobs * loss_mask).sum() / n.clamp(min=1) * dist.world_size()


def sft_loss(model, ids, mask, loss_mask, n) -> torch.Tensor:
    return sft_nll(token_logprobs(model, ids, mask), loss_mask.to(ids.device), n)


@torch.no_grad()
def evaluate_loss(model, examples, pad_id, batch_size, device) -> float:
    """Mean NLL per response token; under torchrun each rank scores its share and the sums are reduced."""
    total, n = 0.0, 0.0
    examples, reduce = dist.eval_share(examples, model)
    for i in range(0, len(examples), batch_size):
        ids, mask, lm = collate_right(examples[i:i + batch_size], pad_id)
        ids, mask, lm = ids.to(device), mask.to(device), lm.to(device)
        lp = token_logprobs(model, ids, mask)
        total += -(lp * lm).sum().item()
        n += lm.sum().item()
    if reduce:
        total, n = dist.sum_floats(total, n)
    return total / max(1.0, n)


def keep_best(best: dict | None, model) -> dict:
    """A copy of the weights training changes (under LoRA: the adapters), made once and then overwritten in place;
    tied weights stay one tensor (FSDP shards are copied one by one)."""
    state = trainable_state(model)
    if best is None or best.keys() != state.keys():
        if dist.is_sharded(model):
            return {k: t.detach().clone() for k, t in state.items()}
        copies: dict[tuple, torch.Tensor] = {}
        return {k: copies.setdefault((t.data_ptr(), t.shape, t.stride()), t.detach().clone()) for k, t in state.items()}
    with torch.no_grad():
        for k, t in state.items():
            best[k].copy_(t)
    return best


def sft(cfg: SFTConfig) -> dict:
    run = Run("sft", cfg, cfg.run, cfg.out)
    device, dtype = run.device, run.dtype
    lines: list[int] = []
    demos = read_demos(cfg.data, lines, split=cfg.fmt.split, columns=cfg.fmt.columns())
    tokenizer = use_chat_template(load_tokenizer(cfg.model), cfg.fmt.chat_template)
    model = load_causal_lm(cfg.model, device, dtype)
    max_len = context_length(model)
    examples = []  # (ids, loss mask per token): without a template the same mask as encode_example's prompt length
    truncated = 0
    for i, demo in enumerate(demos):
        try:
            try:
                examples.append(encode_demo(tokenizer, demo, max_len, False))
            except ValueError:
                if not cfg.truncate_prompts:
                    raise
                examples.append(encode_demo(tokenizer, demo, max_len, True))  # still a ValueError if it cannot fit
                truncated += 1
        except ValueError as e:
            raise DataError(cfg.data, lines[i], str(e), "prompt") from None
    if truncated:
        warnings.warn(f"{cfg.data}: {truncated} demonstration(s) longer than the context of {max_len} tokens; their "
                      "prompts were left-truncated (--truncate-prompts)")
    rng = random.Random(cfg.run.seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    n_val = max(1, int(len(idx) * cfg.val_fraction)) if len(idx) > 1 else 0
    val = [examples[i] for i in idx[:n_val]]
    train = [examples[i] for i in idx[n_val:]] or val

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.lora.r:
        model = apply_lora(model, cfg.lora)
    if cfg.mem.gradient_checkpointing:
        checkpoint_activations(model)
    if cfg.run.fsdp:
        dist.fsdp_shard(model)
    train_model = dist.wrap(model, cfg.run.fsdp)  # training forwards (gradients averaged over ranks)
    optimizer, scheduler = adamw_cosine(trainable_parameters(model), cfg.lr, total, cfg.warmup_ratio, cfg.weight_decay)
    pad = tokenizer.pad_token_id
    # The run's state: the current epoch's order and early stopping (+ the best weights, trainable part only:
    # under LoRA the adapters).
    best: dict | None = {}
    st = run.resume({"model": model, "best": best}, optimizer, scheduler, {"shuffle": rng}) \
        or {"order": [], "best": float("inf"), "bad_evals": 0, "stopped_early": False, "has_best": False}
    best = best if st["has_best"] else None
    if best and dist.is_sharded(model):  # read back whole: as the model holds it, in shards
        best = dist.shard_state_like(model, best)
    with run.output() as tmp:
        if not run.previous:
            run.log({"step": 0, "eval/loss": evaluate_loss(model, val, pad, cfg.batch_size, device) if val
                     else float("nan")})
        val_loss0 = json.loads(run.metrics.lines[0])["eval/loss"]
        model.train()
        step = run.start
        for step in run.progress(total):
            epoch, b = divmod(step - 1, steps_per_epoch)
            if b == 0:
                st["order"] = list(range(len(train)))
                rng.shuffle(st["order"])
            rows = st["order"][b * cfg.batch_size:(b + 1) * cfg.batch_size]
            micro = []  # this rank's micro-batches; a share that does not count has weight 0
            for batch, counts in dist.micro_batches([train[i] for i in rows], cfg.mem.micro_batch_size):
                ids, mask, lm = (t.to(device) for t in collate_right(batch, pad))
                micro.append((ids, mask, lm if counts else lm * 0))
            n = dist.all_reduce_sum(sum(lm.sum() for *_, lm in micro))  # response tokens of the global batch
            optimizer.zero_grad(set_to_none=True)
            parts = []
            for i, (ids, mask, lm) in enumerate(micro):  # gradient accumulation (DDP reduces on the last one)
                with dist.accumulating(train_model, sync=i == len(micro) - 1):
                    part = sft_loss(train_model, ids, mask, lm, n)
                    part.backward()
                parts.append(part.detach())
            loss = torch.stack(parts).sum()
            grad_norm = float("nan")
            if run.nonfinite.ok(step, loss=loss):
                grad_norm = clip_grad_norm_(trainable_parameters(model), cfg.max_grad_norm)
                if run.nonfinite.ok(step, grad_norm=grad_norm):
                    optimizer.step()
            scheduler.step()
            rec = {"step": step, "train/epoch": epoch, "train/loss": dist.all_reduce_mean(loss.detach()).item(),
                   "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0]}
            if val and (step % cfg.eval_every == 0 or step == total):
                rec["eval/loss"] = v = evaluate_loss(model, val, pad, cfg.batch_size, device)
                if v < st["best"] - 1e-4:
                    st["best"], st["bad_evals"], st["has_best"] = v, 0, True
                    best = keep_best(best, model)
                else:
                    st["bad_evals"] += 1
                st["stopped_early"] = st["bad_evals"] >= cfg.patience
            run.log(rec)
            run.maybe_save(step, step == total or st["stopped_early"], st, {"model": model, "best": best or model})
            run.show(loss=rec["train/loss"], val=st["best"])
            if st["stopped_early"]:
                break
        if best is not None:  # keep the weights with the best validation loss
            model.load_state_dict(best, strict=False)
        model.eval()
        full = dist.full_state_dict(model)  # FSDP: gathered by every rank
        if tmp is not None:
            save_causal_lm(model, tmp, full)
            tokenizer.save_pretrained(str(tmp))
        return run.finish({"steps": step, "epochs_run": math.ceil(step / steps_per_epoch),
                           "stopped_early": st["stopped_early"], "val_loss_start": val_loss0,
                           "val_loss_best": st["best"] if val else None, "train_examples": len(train),
                           "val_examples": len(val)})
