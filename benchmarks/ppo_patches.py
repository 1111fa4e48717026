"""Prototype speedups of our PPO loop, applied by monkeypatching (src/ is not edited). Used by
`ppo_bench.py run|profile|suite --patch NAME[,NAME...]`.

Folded into src/ after measurement (issue 8), so no longer here: the fused GELU (models.fuse_activations), reusing
the sampler's log-probs as log pi_old (sampling.sample / rollout.make_rollout), logits_to_keep and an entropy
without autograd (models.token_logprobs), Gumbel-max sampling (sampling.sample).

Measured and left out (no gain or a loss at protocol P, 1 thread; see the README's performance section):
  value_drop_last run the value model on input_ids[:, :-1] (the last position's value is discarded anyway).
  fused_adam      torch.optim.Adam(fused=True): no gain with 1 thread, but -2 to -3 % of the training phase with
                  the protocol's 2 threads (`ppo_bench.py adam-ab`), so src/ now uses it (optim.adam);
                  `plain_adam` undoes it.
  sampler_ktk     the sampler asks for logits_to_keep=1 in the prefill.
  fast            all three.
Other experiments:
  gelu_sigmoid    GELU-tanh as x * sigmoid(2u) (exact identity) with a hand-written backward: this CPU's vectorised
                  tanh is slower than sigmoid.
  compile         torch.compile (inductor, CPU) of each model's full-sequence forward (no gain measured on P).
  sdpa_fp32       with bf16 autocast, run scaled_dot_product_attention in float32 (CPU's bf16 flash attention is
                  slow, its backward especially).
  attn_eager      load-time choice attn_implementation="eager" (matmul + softmax attention) for every model.
Switches that undo what src/ now does, to measure a change on its own:
  plain_adam      torch.optim.Adam without fused=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALL = ["value_drop_last", "fused_adam", "sampler_ktk"]
EXTRA = ["gelu_sigmoid", "compile", "sdpa_fp32", "attn_eager", "plain_adam"]


def expand(names: list[str]) -> list[str]:
    out = []
    for n in names:
        out += ALL if n == "fast" else [n]
    unknown = [n for n in out if n not in ALL + EXTRA]
    if unknown:
        raise SystemExit(f"unknown patch(es) {unknown}; known: {ALL + EXTRA + ['fast']}")
    return out


def _models(s):
    from ppo_bench import reward_models

    return [m for m in (s.policy, s.ref, *reward_models(s), s.value_model) if m is not None]


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
    n = 0
    for model in _models(s):
        for mod in list(model.modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, torch.nn.GELU) and child.approximate == "tanh":
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


def apply(names: list[str], s, cfg) -> None:
    import instructrl.ppo as PPO
    import instructrl.rollout as R

    names = expand(names)
    if "gelu_sigmoid" in names:
        gelu_sigmoid(s, cfg)

    if "sampler_ktk" in names:
        fwd = s.policy.forward

        def policy_forward(*args, **kw):
            if kw.get("use_cache"):
                kw.setdefault("logits_to_keep", 1)
            return fwd(*args, **kw)

        s.policy.forward = policy_forward

    if "value_drop_last" in names:
        def response_values(value_model, batch):
            P = batch.prompt_ids.shape[1]
            ids, am = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]
            return value_model(ids, am)[:, P - 1:]

        R.response_values = PPO.response_values = response_values   # what make_rollout and PPO.update call

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


def make_optimizer(names, params, cfg):
    names = expand(names)
    if "fused_adam" in names:
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, fused=True)
    if "plain_adam" in names:
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    return None
