"""Step 1: supervised fine-tuning on demonstrations (prompt → response).

Cross-entropy on the response tokens only, EOS appended, dropout off, cosine schedule, AdamW, validation loss
with early stopping [IG §3.5; N+ D3, D7]. Works on any local Hugging Face causal-LM directory.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .data import DataError, collate_right, encode_example, read_demos
from .models import context_length, load_causal_lm, load_tokenizer, nll_loss, token_logprobs
from .utils import MetricsLog, atomic_dir, peak_rss_mb, resolve_device, resolve_dtype, set_seed, write_json


@dataclass
class SFTConfig:
    model: str = ""
    data: str = ""
    out: str = ""
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    patience: int = 2            # evaluations without improvement before stopping
    eval_every: int = 20         # optimizer steps between validation passes
    max_grad_norm: float = 1.0
    truncate_prompts: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True


def sft_loss(model, ids, mask, loss_mask) -> torch.Tensor:
    return nll_loss(token_logprobs(model, ids, mask), loss_mask.to(ids.device))


@torch.no_grad()
def evaluate_loss(model, examples, pad_id, batch_size, device) -> float:
    total, n = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        ids, mask, lm = collate_right(examples[i:i + batch_size], pad_id)
        ids, mask, lm = ids.to(device), mask.to(device), lm.to(device)
        lp = token_logprobs(model, ids, mask)
        total += -(lp * lm).sum().item()
        n += lm.sum().item()
    return total / max(1.0, n)


def sft(cfg: SFTConfig) -> dict:
    t0 = time.time()
    set_seed(cfg.seed)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    demos = read_demos(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device, dtype)
    max_len = context_length(model)
    examples = []
    for i, (p, r) in enumerate(demos):
        try:
            examples.append(encode_example(tokenizer, p, r, max_len, cfg.truncate_prompts))
        except ValueError as e:
            raise DataError(cfg.data, i + 1, str(e), "prompt") from None
    rng = random.Random(cfg.seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    n_val = max(1, int(len(idx) * cfg.val_fraction)) if len(idx) > 1 else 0
    val = [examples[i] for i in idx[:n_val]]
    train = [examples[i] for i in idx[n_val:]] or val

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    pad = tokenizer.pad_token_id
    best, best_state, bad_evals, step, stopped_early = float("inf"), None, 0, 0, False
    history = []
    with atomic_dir(cfg.out) as tmp:
        log = MetricsLog(tmp / "metrics.jsonl")
        val_loss0 = evaluate_loss(model, val, pad, cfg.batch_size, device) if val else float("nan")
        log.log({"step": 0, "val_loss": val_loss0})
        model.train()
        bar = tqdm(total=total, desc="sft", disable=not cfg.progress, dynamic_ncols=True)
        for epoch in range(cfg.epochs):
            rng.shuffle(train)
            for b in range(0, len(train), cfg.batch_size):
                ids, mask, lm = (t.to(device) for t in collate_right(train[b:b + cfg.batch_size], pad))
                loss = sft_loss(model, ids, mask, lm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": float(gn),
                       "lr": sched.get_last_lr()[0]}
                if val and (step % cfg.eval_every == 0 or step == total):
                    rec["val_loss"] = v = evaluate_loss(model, val, pad, cfg.batch_size, device)
                    history.append(v)
                    if v < best - 1e-4:
                        best, bad_evals = v, 0
                        best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                    else:
                        bad_evals += 1
                log.log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{best:.3f}")
                if bad_evals >= cfg.patience:
                    stopped_early = True
                    break
            if stopped_early:
                break
        bar.close()
        log.close()
        if best_state is not None:  # keep the checkpoint with the best validation loss
            model.load_state_dict(best_state)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        summary = {"stage": "sft", "steps": step, "epochs_run": epoch + 1, "stopped_early": stopped_early,
                   "val_loss_start": val_loss0, "val_loss_best": best if val else None, "train_examples": len(train),
                   "val_examples": len(val), "seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb(),
                   "config": asdict(cfg)}
        write_json(tmp / "summary.json", summary)
    return summary
