"""Step 0 of the embedded default: a byte-level BPE tokenizer and a tiny GPT trained from scratch on the corpus.

Users with their own checkpoint skip this: any Hugging Face causal-LM directory enters at Step 1.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import distributed as dist
from .checkpoint import Checkpointer, NonFiniteGuard
from .data import read_texts
from .models import build_tiny_model, count_parameters, tiny_gpt_config, train_tokenizer
from .utils import MetricsLog, adam, atomic_dir, checkpoint_dir, peak_rss_mb, set_seed, write_json


@dataclass
class PretrainConfig:
    corpus: str = ""
    val_corpus: str | None = None
    out: str = ""
    vocab_size: int = 2000
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 128
    block_size: int = 64
    batch_size: int = 32
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    save_every: int = 0          # steps between checkpoints in OUT-checkpoints/ (0 = none)
    resume: bool = False
    keep_checkpoints: int = 2
    max_nonfinite: int = 3
    progress: bool = True


def pack(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Documents joined with EOS and cut into blocks of block_size + 1 tokens (inputs and shifted targets)."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = (len(ids) - 1) // block_size
    t = torch.tensor(ids[: n * block_size + 1])
    return torch.stack([t[i * block_size: (i + 1) * block_size + 1] for i in range(n)])


def lm_loss(model, blocks: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=blocks[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size]
        total += lm_loss(model, b).item() * len(b)
        n += len(b)
    model.train()
    return total / max(1, n)


def pretrain(cfg: PretrainConfig) -> dict:
    if dist.launched():  # every rank would train the whole model and race on OUT
        raise ValueError("pretrain runs in a single process (the embedded default takes minutes); "
                         "launch it without torchrun")
    t0 = time.time()
    set_seed(cfg.seed)
    texts = read_texts(cfg.corpus)
    val_texts = read_texts(cfg.val_corpus) if cfg.val_corpus else None
    if val_texts is None:  # hold out the last 5% of the corpus
        cut = max(1, len(texts) // 20)
        texts, val_texts = texts[:-cut], texts[-cut:]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    mcfg = tiny_gpt_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.n_layer, cfg.n_embd,
                           cfg.n_head, cfg.n_positions)
    model = build_tiny_model(mcfg, cfg.seed)
    train_blocks, val_blocks = pack(texts, tokenizer, cfg.block_size), pack(val_texts, tokenizer, cfg.block_size)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = adam([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
               decoupled_weight_decay=True, lr=cfg.lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    guard = NonFiniteGuard("pretrain", cfg.max_nonfinite)
    ckpt = Checkpointer(checkpoint_dir(cfg.out), cfg.keep_checkpoints)
    st: dict = {"step": 0, "order": torch.randperm(len(train_blocks), generator=g).tolist(), "pos": 0}
    previous: list[str] = []
    if cfg.resume and (restored := ckpt.load_latest({"model": model}, opt, sched, {"data": g})):
        _, st, previous = restored
    with atomic_dir(cfg.out) as tmp:
        log = MetricsLog(tmp / "metrics.jsonl", previous)
        model.train()
        bar = tqdm(range(st["step"], cfg.steps), desc="pretrain", disable=not cfg.progress, dynamic_ncols=True)
        for step in bar:
            if st["pos"] + cfg.batch_size > len(st["order"]):
                st["order"], st["pos"] = torch.randperm(len(train_blocks), generator=g).tolist(), 0
            batch = train_blocks[st["order"][st["pos"]: st["pos"] + cfg.batch_size]]
            st["pos"] += cfg.batch_size
            loss = lm_loss(model, batch)
            guard.step(step + 1, opt, loss, model, 1.0)
            sched.step()
            rec = {"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0]}
            if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
                rec["val_loss"] = eval_loss(model, val_blocks)
            log.log(rec)
            st["step"] = step + 1
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                ckpt.save(step + 1, {"model": model}, opt, sched, {"data": g}, state=st, metrics=log.lines)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)
        log.close()
        val = eval_loss(model, val_blocks)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        summary = {"stage": "pretrain", "val_loss": val, "val_perplexity": math.exp(val),
                   "parameters": count_parameters(model), "vocab_size": len(tokenizer),
                   "train_tokens": int(cfg.steps * cfg.batch_size * cfg.block_size),
                   "seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb(), "config": asdict(cfg)}
        write_json(tmp / "summary.json", summary)
    return summary
