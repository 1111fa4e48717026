"""One batch of experience, shared by PPO and vanilla policy gradient: sample → score → shaped per-token rewards.

Also the parts of the RL loop both algorithms share: their config, loading the four models (with LoRA: the
reference is the policy with its adapters off), the prompt and pretraining-text streams, and saving the result.
Under torchrun every rank samples its own share of each batch (its own seed) and the logged statistics are
computed over all ranks' rollouts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed as dist
from .data import DataError, read_prompts, read_texts
from .losses import kl_k1, kl_k3, shaped_rewards
from .models import (AdapterDisabled, ScalarHeadModel, apply_lora, base_model, bos_prefix, context_length, freeze, load_causal_lm,
                     load_tokenizer, lora_options, save_causal_lm, token_logprobs)
from .sampling import PromptTooLong, SampleBatch, decode_responses, encode_prompts, sample
from .utils import resolve_device, resolve_dtype


@dataclass
class RLConfig:
    """Options shared by `instructrl ppo` and `instructrl pg` (defaults tuned on the embedded world)."""

    policy: str = ""                  # the SFT model: initial policy and, unless `ref` is given, the frozen reference
    reward: str = ""                  # the reward model directory (Step 2)
    prompts: str = ""
    out: str = ""
    ref: str | None = None
    value: str | None = None          # value model init (default: the reward model [IG, N+ D22])
    judge: str | None = None          # embedded-world directory: log gold reward beside proxy reward
    episodes: int = 3072              # total sampled responses
    batch_size: int = 64              # rollouts per iteration
    max_new_tokens: int = 32
    temperature: float = 0.7
    lr: float = 3e-5
    beta: float = 0.05                # KL coefficient β (initial β with the adaptive controller)
    kl_estimator: str = "k1"          # k1 | k3
    kl_target: float | None = None    # set to use the adaptive KL controller [LHP]
    kl_horizon: int = 10000
    missing_eos_penalty: float = -1.0  # score of a response that does not end within max_new_tokens [N+ D23]
    ptx_coef: float = 0.0             # γ of PPO-ptx; 0 = plain PPO / PG
    ptx_data: str | None = None       # pretraining text {"text"} for PPO-ptx
    ptx_batch_size: int = 16
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-5
    truncate_prompts: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    save_every: int = 0               # iterations between checkpoints in OUT-checkpoints/ (0 = none)
    resume: bool = False              # continue from the newest checkpoint in OUT-checkpoints/
    keep_checkpoints: int = 2
    max_nonfinite: int = 3            # consecutive non-finite rewards/losses before the run stops
    progress: bool = True
    lora_r: int = 0                   # LoRA rank for policy and value (0: full fine-tuning); reference = adapters off
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None
    fsdp: bool = False                # shard all four models over the ranks (basic support: no checkpoints, no LoRA)


@dataclass
class Rollout:
    batch: SampleBatch
    logprobs: torch.Tensor        # [B, R] log π_old(y_t | s_t), temperature-scaled
    ref_logprobs: torch.Tensor    # [B, R] log π_ref(y_t | s_t), same temperature
    values: torch.Tensor | None   # [B, R] V(s_t) from the value model (PPO only)
    scores: torch.Tensor          # [B] reward-model score (missing-EOS penalty applied)
    kl: torch.Tensor              # [B, R] per-token KL estimate used in the reward
    rewards: torch.Tensor         # [B, R] shaped per-token rewards
    prompts: list[str]
    texts: list[str]
    gold: list[float] | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.response_mask.float()


def response_logprobs(model, batch: SampleBatch, temperature: float, with_entropy: bool = False):
    """Log-probs of the response tokens only: [B, R] (and entropy); the unembedding runs on those R positions."""
    return token_logprobs(model, batch.input_ids, batch.attention_mask, temperature, with_entropy,
                          last=batch.response_ids.shape[1])


def response_values(value_model: ScalarHeadModel, batch: SampleBatch) -> torch.Tensor:
    """V(s_t) for each response token t: the head's output at the position before token t. [B, R]"""
    P = batch.prompt_ids.shape[1]
    return value_model(batch.input_ids, batch.attention_mask)[:, P - 1:-1]


def make_rollout(policy, ref, reward_model, value_model, tokenizer, prompts: list[str], prompt_ids: list[list[int]],
                 cfg: RLConfig, beta: float, generator: torch.Generator, judge=None, lockstep: bool = False) -> Rollout:
    """Sample responses, then one batched forward pass per model under inference mode."""
    with dist.inference(lockstep):
        return _rollout(policy, ref, reward_model, value_model, tokenizer, prompts, prompt_ids, cfg, beta, generator,
                        judge, lockstep)


def _rollout(policy, ref, reward_model, value_model, tokenizer, prompts, prompt_ids, cfg, beta, generator, judge,
             lockstep) -> Rollout:
    batch = sample(policy, prompt_ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator,
                   lockstep=lockstep)
    mask = batch.response_mask.float()
    # log π_old: in float32 the sampler's own log-probs of the tokens it drew (same weights, dropout off, same
    # temperature) equal a full forward pass to ~1e-6 (tests/test_rl.py), so that pass is skipped. In bf16/fp16 the
    # KV-cache and full-sequence numerics differ by ~1e-2: recompute, so the first PPO ratio stays 1.
    if getattr(base_model(policy), "dtype", None) == torch.float32:
        logprobs = batch.logprobs * mask
    else:
        logprobs = response_logprobs(policy, batch, cfg.temperature) * mask
    ref_logprobs = response_logprobs(ref, batch, cfg.temperature) * mask
    values = response_values(value_model, batch) * mask if value_model is not None else None
    scores = reward_model.score(batch.input_ids, batch.attention_mask, batch.last_index)
    scores = torch.where(batch.ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    kl = (kl_k1 if cfg.kl_estimator == "k1" else kl_k3)(logprobs, ref_logprobs) * mask
    rewards = shaped_rewards(scores, kl, mask, beta)
    texts = decode_responses(tokenizer, batch)
    gold = judge.score_batch(prompts, texts) if judge is not None else None
    return Rollout(batch, logprobs, ref_logprobs, values, scores, kl, rewards, prompts, texts, gold)


def trim(batch: SampleBatch, rows: torch.Tensor) -> tuple[SampleBatch, slice]:
    """Select rows and drop columns that are padding in all of them (left of prompts, right of responses).

    Returns the smaller batch and the slice of response columns kept.
    """
    pm, rm = batch.prompt_mask[rows], batch.response_mask[rows]
    p0 = int((pm.sum(0) > 0).float().argmax()) if pm.any() else 0
    r1 = max(1, int(rm.sum(1).max()))
    sub = SampleBatch(batch.prompt_ids[rows, p0:], pm[:, p0:], batch.response_ids[rows, :r1], rm[:, :r1],
                      batch.ended[rows])
    return sub, slice(0, r1)


class PromptStream:
    """Prompts in a seeded random order, reshuffled each pass."""

    def __init__(self, prompts: list[str], ids: list[list[int]], seed: int):
        self.prompts, self.ids, self.rng = prompts, ids, random.Random(seed)
        self.order: list[int] = []  # saved in checkpoints with self.rng

    def next(self, n: int) -> tuple[list[str], list[list[int]]]:
        while len(self.order) < n:
            fresh = list(range(len(self.prompts)))
            self.rng.shuffle(fresh)
            self.order += fresh
        take, self.order = self.order[:n], self.order[n:]
        return [self.prompts[i] for i in take], [self.ids[i] for i in take]


class TextStream:
    """Pretraining text for PPO-ptx: random batches of EOS-terminated documents, right-padded."""

    def __init__(self, texts: list[str], tokenizer, max_len: int, seed: int):
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos = bos_prefix(tokenizer)  # documents start as the tokenizer starts any text (Llama: <s>)
        self.docs = [(bos + e)[: max_len - 1] + [tokenizer.eos_token_id] for e in enc if e]
        self.pad = tokenizer.pad_token_id
        self.g = torch.Generator().manual_seed(seed)  # saved in checkpoints

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.docs), (n,), generator=self.g).tolist()
        docs = [self.docs[i] for i in idx]
        width = max(len(d) for d in docs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, :len(d)] = torch.tensor(d)
            mask[i, :len(d)] = 1
        return ids, mask


@dataclass
class RLSetup:
    """Everything an RL run loads before its first iteration."""

    cfg: RLConfig
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module
    ref: torch.nn.Module
    reward_model: ScalarHeadModel
    value_model: ScalarHeadModel | None
    prompts: PromptStream
    ptx: TextStream | None
    judge: object | None
    generator: torch.Generator = field(default=None)
    train_policy: torch.nn.Module | None = None  # what training forwards go through: DDP wrappers, or the models
    train_value: torch.nn.Module | None = None
    lockstep: bool = False                       # FSDP: every rank decodes the same number of steps

    def __post_init__(self):
        self.train_policy = self.policy if self.train_policy is None else self.train_policy
        self.train_value = self.value_model if self.train_value is None else self.train_value

    def generators(self) -> dict:
        """Every random stream of the run, for checkpoints."""
        g = {"sampling": self.generator, "prompts": self.prompts.rng}
        if self.ptx is not None:
            g["ptx"] = self.ptx.g
        return g


def load_rl_models(cfg: RLConfig, device, dtype, with_value: bool):
    """Policy, reference, reward and value model, all in `dtype` (heads in float32). With LoRA the policy and the
    value backbone get adapters and the reference is the policy with its adapters off (unless --ref names another
    model): the SFT weights are held once. With FSDP all four are sharded over the ranks."""
    policy = load_causal_lm(cfg.policy, device, dtype)
    if cfg.lora_r:
        policy = apply_lora(policy, lora_options(cfg))
    if cfg.lora_r and not cfg.ref:
        ref = AdapterDisabled(policy)
    else:
        ref = freeze(load_causal_lm(cfg.ref or cfg.policy, device, dtype))
    reward_model = freeze(ScalarHeadModel.from_pretrained(cfg.reward, device, dtype))
    value_model = ScalarHeadModel.from_pretrained(cfg.value or cfg.reward, device, dtype) if with_value else None
    if cfg.lora_r and value_model is not None:
        value_model.backbone = apply_lora(value_model.backbone, lora_options(cfg), causal_lm=False)
    if cfg.fsdp:
        for m in (policy, ref, reward_model, value_model):
            if m is not None:
                dist.fsdp_shard(m)
    return policy, ref, reward_model, value_model


def per_rank(n: int, what: str) -> int:
    """A global count split evenly over the ranks."""
    if n % dist.world_size():
        raise ValueError(f"{what} ({n}) must be a multiple of the number of processes ({dist.world_size()})")
    return n // dist.world_size()


def setup_rl(cfg: RLConfig, with_value: bool) -> RLSetup:
    from .world.judge import GoldJudge

    dist.check_fsdp(cfg)
    device, dtype = dist.init(resolve_device(cfg.device)), resolve_dtype(cfg.dtype)
    if not cfg.temperature > 0:
        raise ValueError(f"temperature must be > 0 for RL (log-probs are taken at the sampling temperature), "
                         f"not {cfg.temperature}")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', not {cfg.kl_estimator!r}")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ValueError("--ptx-coef > 0 needs --ptx-data (pretraining text in the {\"text\": ...} format)")
    lines: list[int] = []
    prompts = read_prompts(cfg.prompts, lines)
    ptx_texts = read_texts(cfg.ptx_data) if cfg.ptx_coef > 0 else None
    per_rank(cfg.batch_size, "batch_size")
    tokenizer = load_tokenizer(cfg.policy)
    policy, ref, reward_model, value_model = load_rl_models(cfg, device, dtype, with_value)
    max_prompt = context_length(policy) - cfg.max_new_tokens
    try:
        ids = encode_prompts(tokenizer, prompts, max_prompt, cfg.truncate_prompts)
    except PromptTooLong as e:
        raise DataError(cfg.prompts, lines[e.index], str(e), "prompt") from None
    seed = dist.rank_seed(cfg.seed)  # each rank its own samples, prompt order and ptx text (rank 0: cfg.seed)
    ptx = TextStream(ptx_texts, tokenizer, context_length(policy), seed + 7) if ptx_texts else None
    judge = GoldJudge.from_world(cfg.judge) if cfg.judge and (Path(cfg.judge) / "judge.json").is_file() else None
    gen = torch.Generator(device=device).manual_seed(seed)
    return RLSetup(cfg, device, tokenizer, policy, ref, reward_model, value_model, PromptStream(prompts, ids, seed),
                   ptx, judge, gen, train_policy=dist.wrap(policy, cfg.fsdp),
                   train_value=dist.wrap(value_model, cfg.fsdp) if value_model is not None else None,
                   lockstep=cfg.fsdp and dist.active())


def rollout_metrics(r: Rollout) -> dict:
    """Per-iteration statistics of a batch of experience, over every rank's rollouts."""
    mask = r.mask
    scores, seq_kl, lengths, ended = dist.gather_rows(r.scores, ((r.logprobs - r.ref_logprobs) * mask).sum(1),
                                                      mask.sum(1), r.batch.ended)
    out = {"reward": float(scores.mean()), "reward_std": float(scores.std()), "kl": float(seq_kl.mean()),
           "response_length": float(lengths.mean()), "eos_rate": float(ended.float().mean())}
    if r.gold is not None:
        gold = [g for part in dist.gather_objects(r.gold) for g in part]
        out["gold_reward"] = sum(gold) / len(gold)
    return out


def ptx_step_loss(policy, ptx: TextStream, n: int, coef: float, device) -> torch.Tensor:
    """γ · (−mean log-likelihood) of a batch of pretraining text [IG Eq. 2]."""
    from .losses import ptx_loss

    ids, mask = ptx.next(n)
    ids, mask = ids.to(device), mask.to(device)
    lp = token_logprobs(policy, ids, mask)
    return ptx_loss(lp, mask[:, 1:].float(), coef)


def save_policy(policy, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """A loadable HF directory: LoRA adapters merged (and kept in OUT/lora_adapter), FSDP shards gathered."""
    save_causal_lm(policy, out, state_dict)
    tokenizer.save_pretrained(str(out))
