"""Prototype speedups of our PPO loop, applied by monkeypatching (src/ is not edited). Used by
`ppo_bench.py run|profile|suite --patch NAME[,NAME...]`. Each patch says which src change it stands for.

  gelu_fused      GPT-2's "gelu_new" is transformers' NewGELUActivation: a Python expression of 6 elementwise
                  ops (pow, mul, add, mul, tanh, add, mul) whose backward autograd records op by op. Replace it by
                  torch.nn.GELU(approximate="tanh"), the same formula in one fused kernel (forward and backward).
                  src: models.py, when a model is loaded (load_causal_lm, ScalarHeadModel.from_pretrained; e.g. in
                  disable_dropout or a new `fast_activations(model)`), swap NewGELUActivation/GELUActivation modules
                  for nn.GELU(approximate="tanh"/"none"); and tiny_gpt_config(activation_function="gelu_pytorch_tanh").
  reuse_sample_logprobs
                  make_rollout recomputes log pi_old with a full policy forward pass; the sampler already had the
                  logits of every sampled token. Capture them (forward hook on the policy during `sample`) and use
                  log_softmax(logits / T) at the sampled ids. src: sampling.sample returns SampleBatch.logprobs
                  (log_softmax of the tempered logits gathered at `nxt`, per step), make_rollout uses them instead of
                  response_logprobs(policy, ...). Caveat: KV-cache and full-sequence numerics differ (~1e-6 in fp32),
                  so the first PPO ratio is ~1 rather than exactly 1 (TRL does this too).
  logits_to_keep  response_logprobs: run the LM on input_ids[:, :-1] (the last token's logits are never used) with
                  `logits_to_keep=R`, so the lm_head (V x d = 2000 x 256) and the float32 log-softmax run on the R
                  response positions only, not on all P+R. src: models.token_logprobs gains `logits_to_keep` / a
                  `response_logprobs` that passes it (transformers' CausalLM forward supports it).
  value_drop_last response_values: the value at the last position is discarded ([:, P-1:-1]); run the value model
                  on input_ids[:, :-1]. src: rollout.response_values.
  entropy_nograd  the entropy (a statistic only) is computed from detached logits with one exp pass, reusing
                  logsumexp: no autograd graph over [mb, R, V] softmax. src: models.token_logprobs.
  fused_adam      torch.optim.Adam(fused=True) (TRL uses fused AdamW). src: ppo.train_ppo / pg.train_pg.
  sampler_ktk     the sampler asks for logits_to_keep=1 (the prefill computes the lm_head over the 16 prompt
                  positions only to use the last). src: sampling.sample passes logits_to_keep=1.
  fast            all of the above.

Not in `fast` (separate experiments):
  gelu_sigmoid    like gelu_fused, but GELU-tanh computed as x * sigmoid(2u) (0.5 (1 + tanh u) = sigmoid(2u), exact
                  identity), with a hand-written backward: this CPU's vectorised tanh is ~6x slower than sigmoid.
  compile         torch.compile (inductor, CPU) of each model's full-sequence forward (scoring and training; the
                  KV-cache sampling calls stay eager).
  fast_multinomial
                  torch.multinomial(probs, 1) spends most of its time in exponential_ (~2.4 ms for 64 x 2000 here);
                  the same exponential race, argmax(p / E) with E = -log U, U ~ rand, costs a third. Same distribution,
                  different random stream. src: sampling.sample draws `nxt` this way.
  sdpa_fp32       with bf16 autocast, CPU's flash-attention kernel in bf16 is ~10x slower than in fp32 (backward
                  especially); run scaled_dot_product_attention in float32 (autocast off inside, q/k/v upcast).
                  src: wherever bf16 autocast is added, patch transformers' sdpa call the same way or load models
                  with attn_implementation="eager".
  attn_eager      load-time choice attn_implementation="eager" (matmul + softmax attention) for every model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALL = ["gelu_fused", "reuse_sample_logprobs", "logits_to_keep", "value_drop_last", "entropy_nograd", "fused_adam",
       "sampler_ktk"]
EXTRA = ["gelu_sigmoid", "compile", "fast_multinomial", "sdpa_fp32", "attn_eager"]


def expand(names: list[str]) -> list[str]:
    out = []
    for n in names:
        out += ALL if n == "fast" else [n]
    unknown = [n for n in out if n not in ALL + EXTRA]
    if unknown:
        raise SystemExit(f"unknown patch(es) {unknown}; known: {ALL + EXTRA + ['fast']}")
    if "gelu_sigmoid" in out:
        out = [n for n in out if n != "gelu_fused"]
    return out


def _models(s):
    return [m for m in (s.policy, s.ref, s.reward_model, s.value_model) if m is not None]


def gelu_fused(s, cfg):
    from transformers.activations import GELUActivation, NewGELUActivation

    n = 0
    for model in _models(s):
        for mod in list(model.modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, NewGELUActivation):
                    setattr(mod, cname, torch.nn.GELU(approximate="tanh"))
                    n += 1
                elif type(child) is GELUActivation:
                    setattr(mod, cname, torch.nn.GELU())
                    n += 1
    assert n, "no GELU module found"


class _GeluTanhSigmoid(torch.autograd.Function):
    """gelu_tanh(x) = 0.5 x (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)."""

    C = 2.0 * (2.0 / 3.141592653589793) ** 0.5

    @staticmethod
    def forward(ctx, x):
        s = (x * x).mul_(0.044715).add_(1.0).mul_(x).mul_(_GeluTanhSigmoid.C).sigmoid_()
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        du = (x * x).mul_(3 * 0.044715).add_(1.0).mul_(_GeluTanhSigmoid.C)       # d(2u)/dx
        # d/dx [x s(2u)] = s + x s (1 - s) d(2u)/dx
        return g * (du.mul_(x).mul_(1.0 - s).add_(1.0).mul_(s))


class GeluTanhSigmoid(torch.nn.Module):
    def forward(self, x):
        return _GeluTanhSigmoid.apply(x)


def gelu_sigmoid(s, cfg):
    from transformers.activations import NewGELUActivation

    n = 0
    for model in _models(s):
        for mod in list(model.modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, NewGELUActivation):
                    setattr(mod, cname, GeluTanhSigmoid())
                    n += 1
    assert n


def compile_models(s, cfg):
    for m in _models(s):
        fwd = m.forward
        compiled = torch.compile(fwd)

        def routed(*args, _f=fwd, _c=compiled, **kw):
            return _f(*args, **kw) if kw.get("use_cache") else _c(*args, **kw)

        m.forward = routed


def _lp_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                    entropy_nograd: bool):
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    lp = torch.gather(logits, -1, targets[..., None]).squeeze(-1) - logz
    if not with_entropy:
        return lp
    if entropy_nograd:
        with torch.no_grad():
            lg, lz = logits.detach(), logz.detach()
            entropy = lz - (torch.exp(lg - lz[..., None]) * lg).sum(-1)
    else:
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - (probs * logits).sum(-1)
    return lp, entropy


def apply(names: list[str], s, cfg) -> None:
    import instructrl.ppo as PPO
    import instructrl.rollout as R
    from instructrl.models import position_ids_from_mask

    names = expand(names)
    if "gelu_fused" in names:
        gelu_fused(s, cfg)
    if "gelu_sigmoid" in names:
        gelu_sigmoid(s, cfg)

    if "sampler_ktk" in names:
        fwd = s.policy.forward

        def policy_forward(*args, **kw):
            if kw.get("use_cache"):
                kw.setdefault("logits_to_keep", 1)
            return fwd(*args, **kw)

        s.policy.forward = policy_forward

    ktk, ent = "logits_to_keep" in names, "entropy_nograd" in names
    if ktk or ent:
        orig_rlp = R.response_logprobs

        def response_logprobs(model, batch, temperature, with_entropy=False):
            if not ktk:
                if not with_entropy or not ent:
                    return orig_rlp(model, batch, temperature, with_entropy)
                ids, am = batch.input_ids, batch.attention_mask
                P = batch.prompt_ids.shape[1]
                out = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=False)
                return _lp_from_logits(out.logits[:, P - 1:-1], ids[:, P:], temperature, True, True)
            ids, am = batch.input_ids, batch.attention_mask
            P, Rn = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
            x, m = ids[:, :-1], am[:, :-1]
            out = model(input_ids=x, attention_mask=m, position_ids=position_ids_from_mask(m), use_cache=False,
                        logits_to_keep=Rn)
            return _lp_from_logits(out.logits, ids[:, P:], temperature, with_entropy, ent)

        R.response_logprobs = PPO.response_logprobs = response_logprobs

    if "value_drop_last" in names:
        def response_values(value_model, batch):
            P = batch.prompt_ids.shape[1]
            ids, am = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]
            return value_model(ids, am)[:, P - 1:]

        R.response_values = PPO.response_values = response_values

    if "reuse_sample_logprobs" in names:
        orig_sample, rlp = R.sample, R.response_logprobs
        cache: dict = {}

        def sample(model, prompt_ids, **kw):
            steps = []
            h = model.register_forward_hook(lambda mod, args, out: steps.append(out.logits[:, -1].float()))
            try:
                batch = orig_sample(model, prompt_ids, **kw)
            finally:
                h.remove()
            T = kw.get("temperature", 1.0)
            logits = torch.stack(steps[: batch.response_ids.shape[1]], 1)
            lp = torch.log_softmax(logits / T, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
            cache.clear()
            cache[id(batch)] = (batch, lp)
            return batch

        def response_logprobs(model, batch, temperature, with_entropy=False):
            hit = cache.get(id(batch))
            if model is s.policy and not with_entropy and hit is not None and hit[0] is batch:
                return hit[1]
            return rlp(model, batch, temperature, with_entropy)

        R.sample, R.response_logprobs = sample, response_logprobs

    if "compile" in names:
        compile_models(s, cfg)

    if "sdpa_fp32" in names:
        import transformers.integrations.sdpa_attention as SA

        class _F:
            def __getattr__(self, name):
                return getattr(F, name)

            @staticmethod
            def scaled_dot_product_attention(q, k, v, attn_mask=None, **kw):
                if q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
                with torch.autocast("cpu", enabled=False):
                    m = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, **kw)
                return out.to(q.dtype)

        class _Torch:
            def __getattr__(self, name):
                return getattr(torch, name)

            class nn:
                functional = _F()

        SA.torch = _Torch()

    if "attn_eager" in names:
        for m in _models(s):
            cfg_ = m.config
            cfg_._attn_implementation = "eager"
            for sub in m.modules():
                if hasattr(sub, "config") and sub.config is not cfg_ and hasattr(sub.config, "_attn_implementation"):
                    sub.config._attn_implementation = "eager"

    if "fast_multinomial" in names:
        import instructrl.sampling as S

        class _Torch:
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def multinomial(probs, num_samples, generator=None):
                assert num_samples == 1
                e = torch.rand(probs.shape, generator=generator, dtype=probs.dtype).log_().neg_()
                return (probs / e).argmax(-1, keepdim=True)

        S.torch = _Torch()


def make_optimizer(names, params, cfg):
    names = expand(names)
    if "fused_adam" in names:
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, fused=True)
    return None
