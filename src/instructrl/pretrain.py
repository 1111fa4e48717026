"""Step 0 of the embedded default: a byte-level BPE tokenizer and a tiny GPT trained from scratch on the corpus.

Users with their own checkpoint skip this: any Hugging Face causal-LM directory enters at Step 1.
"""
from __future__ import annotations

import math

import torch
from torch.nn.utils import clip_grad_norm_
from transformers import get_cosine_schedule_with_warmup

from . import distributed as dist
from .data import read_texts
from .models import build_tiny_model, count_parameters, tiny_gpt_config, train_tokenizer
from .optim import adam
from .options import RunOptions, config, group, option
from .run import Run


@config
class PretrainConfig:
    corpus: str = option("", "pretraining text {text} JSONL", wired=True, required=True)
    val_corpus: str | None = option(None, "held-out text (default: the corpus's last 5%)", wired=True)
    out: str = option("", "output directory", wired=True, required=True)
    vocab_size: int = option(2000, "byte-level BPE vocabulary size", ge=1)
    n_layer: int = option(4, "transformer blocks", ge=1)
    n_embd: int = option(192, "width", ge=1)
    n_head: int = option(4, "attention heads", ge=1)
    n_positions: int = option(128, "context length", ge=2)
    block_size: int = option(64, "tokens per training sequence", ge=2)
    batch_size: int = option(32, "sequences per step", ge=1)
    steps: int = option(600, "optimizer steps", ge=1)
    lr: float = option(2e-3, "peak learning rate (AdamW, cosine decay)", gt=0)
    warmup: int = option(30, "warm-up steps", ge=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", ge=0)
    eval_every: int = option(100, "steps between held-out evaluations", ge=1)
    max_grad_norm: float = option(1.0, "gradient-norm clip", gt=0)
    run: RunOptions = group(RunOptions)

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head}")
        if self.block_size > self.n_positions:
            raise ValueError(f"--block-size {self.block_size} must be at most --n-positions {self.n_positions}")


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
    if cfg.run.dtype != "float32" or cfg.run.fsdp:
        raise ValueError("pretrain trains the tiny model in float32 in one process: drop --dtype and --fsdp")
    run = Run("pretrain", cfg, cfg.run, cfg.out)
    texts = read_texts(cfg.corpus)
    val_texts = read_texts(cfg.val_corpus) if cfg.val_corpus else None
    if val_texts is None:  # hold out the last 5% of the corpus
        cut = max(1, len(texts) // 20)
        texts, val_texts = texts[:-cut], texts[-cut:]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    mcfg = tiny_gpt_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.n_layer, cfg.n_embd,
                           cfg.n_head, cfg.n_positions)
    model = build_tiny_model(mcfg, cfg.run.seed).to(run.device)
    train_blocks = pack(texts, tokenizer, cfg.block_size).to(run.device)
    val_blocks = pack(val_texts, tokenizer, cfg.block_size).to(run.device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = adam([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                     decoupled_weight_decay=True, lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup, cfg.steps)
    g = torch.Generator().manual_seed(cfg.run.seed)
    st = {"order": torch.randperm(len(train_blocks), generator=g).tolist(), "pos": 0}
    st = run.resume({"model": model}, optimizer, scheduler, {"data": g}) or st
    with run.output() as tmp:
        model.train()
        for step in run.progress(cfg.steps):
            if st["pos"] + cfg.batch_size > len(st["order"]):
                st["order"], st["pos"] = torch.randperm(len(train_blocks), generator=g).tolist(), 0
            batch = train_blocks[st["order"][st["pos"]: st["pos"] + cfg.batch_size]]
            st["pos"] += cfg.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(model, batch)
            if run.nonfinite.ok(step, loss=loss):
                loss.backward()
                grad_norm = clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if run.nonfinite.ok(step, grad_norm=grad_norm):
                    optimizer.step()
            scheduler.step()
            rec = {"step": step, "train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec["eval/loss"] = eval_loss(model, val_blocks)
            run.log(rec)
            run.maybe_save(step, step == cfg.steps, st)
            run.show(loss=rec["train/loss"])
        val = eval_loss(model, val_blocks)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        return run.finish({"val_loss": val, "val_perplexity": math.exp(val), "parameters": count_parameters(model),
                           "vocab_size": len(tokenizer),
                           "train_tokens": int(cfg.steps * cfg.batch_size * cfg.block_size)})
