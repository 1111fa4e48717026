"""Step 1: supervised fine-tuning on demonstrations (prompt → response).

Cross-entropy on the response tokens only, EOS appended, dropout off, cosine schedule, AdamW, validation loss
with early stopping [IG §3.5; N+ D3, D7]. Works on any local Hugging Face causal-LM directory, with full
fine-tuning or LoRA adapters (saved merged), in one process or data-parallel under torchrun (each rank takes its
share of every global batch; the loss is normalised by the global token count, so N ranks × B/N equal 1 × B).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import distributed as dist
from .checkpoint import Checkpointer, NonFiniteGuard
from .data import DataError, collate_right, encode_example, read_demos
from .models import (apply_lora, context_length, load_causal_lm, load_tokenizer, lora_options, save_causal_lm,
                     token_logprobs, trainable_parameters, trainable_state)
from .utils import (MetricsLog, adam, checkpoint_dir, peak_rss_mb, resolve_device, resolve_dtype, set_seed,
                    write_json)


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
    save_every: int = 0          # optimizer steps between checkpoints in OUT-checkpoints/ (0 = none)
    resume: bool = False
    keep_checkpoints: int = 2
    max_nonfinite: int = 3
    progress: bool = True
    lora_r: int = 0              # LoRA rank (0: full fine-tuning); the output is saved merged
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None  # comma-separated, "all-linear", or None: peft's default per architecture
    fsdp: bool = False           # shard the model over the ranks (basic support: no checkpoints, no LoRA)


def sft_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the response tokens of the global batch: this rank's sum / the token count of all ranks,
    × the number of ranks because DDP averages gradients. In one process: the plain masked mean."""
    n = dist.all_reduce_sum(loss_mask.sum())
    return -(logprobs * loss_mask).sum() / n.clamp(min=1) * dist.world_size()


def sft_loss(model, ids, mask, loss_mask) -> torch.Tensor:
    return sft_nll(token_logprobs(model, ids, mask), loss_mask.to(ids.device))


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
    t0 = time.time()
    set_seed(cfg.seed)
    dist.check_fsdp(cfg)
    device, dtype = dist.init(resolve_device(cfg.device)), resolve_dtype(cfg.dtype)
    lines: list[int] = []
    demos = read_demos(cfg.data, lines)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device, dtype)
    max_len = context_length(model)
    examples = []
    for i, (p, r) in enumerate(demos):
        try:
            examples.append(encode_example(tokenizer, p, r, max_len, cfg.truncate_prompts))
        except ValueError as e:
            raise DataError(cfg.data, lines[i], str(e), "prompt") from None
    rng = random.Random(cfg.seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    n_val = max(1, int(len(idx) * cfg.val_fraction)) if len(idx) > 1 else 0
    val = [examples[i] for i in idx[:n_val]]
    train = [examples[i] for i in idx[n_val:]] or val

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.lora_r:
        model = apply_lora(model, lora_options(cfg))
    if cfg.fsdp:
        dist.fsdp_shard(model)
    train_model = dist.wrap(model, cfg.fsdp)  # training forwards (gradients averaged over ranks)
    opt = adam(trainable_parameters(model), decoupled_weight_decay=True, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    pad = tokenizer.pad_token_id
    guard = NonFiniteGuard("sft", cfg.max_nonfinite)
    ckpt = Checkpointer(checkpoint_dir(cfg.out), cfg.keep_checkpoints)
    # The run's whole state: counters, the current epoch's order, early-stopping state (+ best weights, trainable
    # part only: under LoRA the adapters).
    st = {"step": 0, "order": [], "best": float("inf"), "bad_evals": 0, "stopped_early": False, "has_best": False}
    best: dict | None = None
    previous: list[str] = []
    if cfg.resume:
        best = {}
        restored = ckpt.load_latest({"model": model, "best": best}, opt, sched, {"shuffle": rng})
        if restored:
            _, st, previous = restored
        if not st["has_best"]:
            best = None
    with dist.output_dir(cfg.out) as tmp:
        log = MetricsLog(tmp / "metrics.jsonl" if tmp else None, previous)
        if not previous:
            val_loss0 = evaluate_loss(model, val, pad, cfg.batch_size, device) if val else float("nan")
            log.log({"step": 0, "val_loss": val_loss0})
        val_loss0 = json.loads(log.lines[0])["val_loss"]
        model.train()
        bar = tqdm(total=total, initial=st["step"], desc="sft", disable=not (cfg.progress and dist.is_main()),
                   dynamic_ncols=True)
        while st["step"] < total and not st["stopped_early"]:
            epoch, b = divmod(st["step"], steps_per_epoch)
            if b == 0:
                st["order"] = list(range(len(train)))
                rng.shuffle(st["order"])
            rows = st["order"][b * cfg.batch_size:(b + 1) * cfg.batch_size]
            batch, counts = dist.local_batch([train[i] for i in rows])
            ids, mask, lm = (t.to(device) for t in collate_right(batch, pad))
            loss = sft_loss(train_model, ids, mask, lm if counts else lm * 0)
            st["step"] += 1
            step = st["step"]
            _, gn = guard.step(step, opt, loss, model, cfg.max_grad_norm)
            sched.step()
            rec = {"step": step, "epoch": epoch, "loss": dist.all_reduce_mean(loss.detach()).item(),
                   "grad_norm": float(gn), "lr": sched.get_last_lr()[0]}
            if val and (step % cfg.eval_every == 0 or step == total):
                rec["val_loss"] = v = evaluate_loss(model, val, pad, cfg.batch_size, device)
                if v < st["best"] - 1e-4:
                    st["best"], st["bad_evals"], st["has_best"] = v, 0, True
                    best = keep_best(best, model)
                else:
                    st["bad_evals"] += 1
                st["stopped_early"] = st["bad_evals"] >= cfg.patience
            log.log(rec)
            if cfg.save_every and step % cfg.save_every == 0 and step < total and not st["stopped_early"]:
                ckpt.save(step, {"model": model, "best": best or model}, opt, sched, {"shuffle": rng},
                          state=st, metrics=log.lines)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{st['best']:.3f}", refresh=False)
        bar.close()
        log.close()
        if best is not None:  # keep the weights with the best validation loss
            model.load_state_dict(best, strict=False)
        model.eval()
        full = dist.full_state_dict(model)  # FSDP: gathered by every rank
        if tmp is not None:
            save_causal_lm(model, tmp, full)
            tokenizer.save_pretrained(str(tmp))
        summary = {"stage": "sft", "steps": st["step"], "epochs_run": math.ceil(st["step"] / steps_per_epoch),
                   "stopped_early": st["stopped_early"], "val_loss_start": val_loss0,
                   "val_loss_best": st["best"] if val else None, "train_examples": len(train),
                   "val_examples": len(val), "world_size": dist.world_size(), "seconds": time.time() - t0,
                   "peak_rss_mb": peak_rss_mb(), "config": asdict(cfg)}
        if tmp is not None:
            write_json(tmp / "summary.json", summary)
    return summary
