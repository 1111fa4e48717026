"""Sampling responses with a KV cache, and the token layout every later step shares.

Layout of one batch: prompts left-padded to P, responses right-padded to R, concatenated to [B, P + R].
Sampling uses temperature T with top_k = 0 and top_p = 1 (anything else biases the KL estimate [pitfall 1]).
Sampling stops at `chat.stop_token_id` (EOS, or the chat template's end of turn): "EOS" below means that token.
Tokens after the first EOS are PAD and masked out.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import distributed as dist
from .chat import end_of_turn_ids, render_prompt_ids, stop_token_id
from .data import Prompt
from .models import cache_argument, context_length, position_ids_from_mask, position_kwargs, token_logprobs


class PromptTooLong(ValueError):
    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index  # which prompt (0-based), to name its line


def encode_prompts(tokenizer, prompts: list[Prompt], max_len: int, truncate: bool = False) -> list[list[int]]:
    """Token ids per prompt (text or messages, see chat.render_prompt_ids). Longer than max_len: left-truncate if
    asked (keep the end), else raise."""
    out, truncated = [], 0
    for i, p in enumerate(prompts):
        ids = render_prompt_ids(tokenizer, p)
        if len(ids) > max_len:
            if not truncate:
                raise PromptTooLong(f"prompt has {len(ids)} tokens, more than the {max_len} that fit before the "
                                    f"response (use --truncate-prompts to keep its last {max_len} tokens)", i)
            ids = ids[-max_len:]
            truncated += 1
        out.append(ids)
    if truncated:
        warnings.warn(f"{truncated} prompt(s) longer than {max_len} tokens were left-truncated")
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class SampleBatch:
    prompt_ids: torch.Tensor      # [B, P] left-padded
    prompt_mask: torch.Tensor     # [B, P]
    response_ids: torch.Tensor    # [B, R] PAD after the first EOS
    response_mask: torch.Tensor   # [B, R] 1 on real response tokens, EOS included
    ended: torch.Tensor           # [B] bool: the response produced EOS within the limit
    logprobs: torch.Tensor | None = None  # [B, R] float32 log π(y_t | s_t) at the sampling temperature (T 0: at 1)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)

    @property
    def last_index(self) -> torch.Tensor:
        """Index in input_ids of each row's last real token (the EOS when there is one) [pitfall 3]."""
        return self.prompt_ids.shape[1] + self.response_mask.sum(1).clamp(min=1) - 1


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


def response_values(value_model, batch: SampleBatch) -> torch.Tensor:
    """V(s_t) for each response token t: the (`models.ScalarHeadModel`) head's output at the position before token t. [B, R]"""
    P = batch.prompt_ids.shape[1]
    return value_model(batch.input_ids, batch.attention_mask)[:, P - 1:-1]


def sample(model, prompt_ids: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
           temperature: float = 1.0, generator: torch.Generator | None = None, lockstep: bool = False,
           drop_finished: bool = True) -> SampleBatch:
    """Autoregressive sampling with a KV cache: one forward call per new token, no other per-token Python work.

    temperature 0 means greedy decoding. `lockstep`: every process decodes until all processes are done, for
    sharded (FSDP) models whose every forward call is a collective. `drop_finished`: rows that produced EOS leave
    the batch the model runs (their KV cache rows are dropped), so a batch of short and long responses costs what
    its tokens cost, not its longest response times its rows; the random draws are those of the whole batch
    either way, so the samples are the same (tests/test_rl.py).
    """
    with dist.inference(lockstep):
        return _sample(model, prompt_ids, eos_id, pad_id, max_new_tokens, temperature, generator, lockstep,
                       drop_finished)


def _sample(model, prompt_ids, eos_id, pad_id, max_new_tokens, temperature, generator, lockstep,
            drop_finished) -> SampleBatch:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_id, device)
    if ids.shape[1] + max_new_tokens > context_length(model):
        raise PromptTooLong(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's context of {context_length(model)} tokens")
    B = ids.shape[0]
    out_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    out_logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = position_ids_from_mask(mask)
    with_pos = bool(position_kwargs(model, mask))
    cache_arg = cache_argument(model)
    attn = mask
    step_ids, past = ids, None
    rows: slice | torch.Tensor = slice(None)  # the rows the model still runs: all (a view) until some are dropped
    for t in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=attn, use_cache=True, **{cache_arg: past},
                    **({"position_ids": pos} if with_pos else {}))
        past = getattr(out, cache_arg)
        logits = out.logits[:, -1].float()
        logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
        if temperature > 0:  # Gumbel-max: argmax(log p + G) is a draw from p, at a third of multinomial's cost here
            # noise for the whole batch, finished rows included: the same draws whichever rows still run
            noise = torch.rand((B, logp.shape[1]), generator=generator, device=device).log_().neg_().log_().neg_()
            nxt = (logp + noise[rows]).argmax(-1)
        else:
            nxt = logp.argmax(-1)
        live = ~done[rows]
        out_ids[rows, t] = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        out_logprobs[rows, t] = torch.where(live, logp.gather(1, nxt[:, None]).squeeze(1), 0.0)
        out_mask[rows, t] = live.long()
        done[rows] = done[rows] | (nxt == eos_id)
        if dist.all_true(bool(done.all())) if lockstep else bool(done.all()):
            break
        step_ids = out_ids[rows, t:t + 1]
        attn = torch.cat([attn, torch.ones((len(step_ids), 1), dtype=attn.dtype, device=device)], 1)
        pos = pos[:, -1:] + 1
        # drop finished rows once a quarter of the running ones have (each drop copies the cache); a sharded model
        # in lockstep keeps its rows, as every process must call forward until all are done
        if drop_finished and not lockstep and hasattr(past, "batch_select_indices"):
            finished = done[rows]
            if int(finished.sum()) >= max(1, len(step_ids) // 4):
                keep = (~finished).nonzero().squeeze(1)
                past.batch_select_indices(keep)
                running = torch.arange(B, device=device)[rows]
                rows, step_ids, attn, pos = running[keep], step_ids[keep], attn[keep], pos[keep]
    width = max(1, int(out_mask.sum(1).max()))
    return SampleBatch(ids, mask, out_ids[:, :width], out_mask[:, :width], done, out_logprobs[:, :width])


def decode_responses(tokenizer, batch: SampleBatch) -> list[str]:
    """Response text without PAD and the end of turn (EOS without a chat template)."""
    texts = []
    eot = end_of_turn_ids(tokenizer)
    for row, m in zip(batch.response_ids.tolist(), batch.response_mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep]
        if toks and toks[-1] == eot[-1]:
            toks = toks[:-len(eot)] if toks[-len(eot):] == eot else toks[:-1]
        texts.append(tokenizer.decode(toks, skip_special_tokens=False))
    return texts


def generate(model, tokenizer, prompts: list[Prompt], *, max_new_tokens: int = 32, temperature: float = 1.0,
             batch_size: int = 64, seed: int = 0, truncate_prompts: bool = False, progress=None) -> list[str]:
    """Sample one response per prompt and return the texts (EOS stripped)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    max_prompt = context_length(model) - max_new_tokens
    ids = encode_prompts(tokenizer, prompts, max_prompt, truncate_prompts)
    texts: list[str] = []
    for i in range(0, len(ids), batch_size):
        batch = sample(model, ids[i:i + batch_size], eos_id=stop_token_id(tokenizer), pad_id=tokenizer.pad_token_id,
                       max_new_tokens=max_new_tokens, temperature=temperature, generator=g)
        texts.extend(decode_responses(tokenizer, batch))
        if progress is not None:
            progress(len(batch.ended))
    return texts


def response_logprobs(model, batch: SampleBatch, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False):
    """Log-probs of the response tokens only: [B, R] (and entropy); the unembedding runs on those R positions."""
    return token_logprobs(model, batch.input_ids, batch.attention_mask, temperature, with_entropy,
                          last=batch.response_ids.shape[1], entropy_grad=entropy_grad)
