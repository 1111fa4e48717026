"""The optimizer and its guard: fused Adam where torch has the kernel, and the one policy for non-finite steps.

Every trainer writes its step in plain sight (backward, clip, `optimizer.step()`); `NonFinite.ok` is asked before
backward (the loss; for RL, the rewards first) and before the step (the gradient norm). A NaN or inf anywhere skips
the step on every rank alike (DDP's all-reduce in backward never waits for a rank that skipped); `limit`
non-finite checks without an update in between stop the run, the last checkpoint intact, and a run in which every
update was skipped fails too (the run shell asks `check_learned` before it writes OUT).
"""
from __future__ import annotations

import warnings

import torch

from . import distributed as dist


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss, reward or gradient."""


class NonFinite:
    """Counts the non-finite checks since the last applied update of one run.

    The gradient norm is every trainer's last check before `optimizer.step()`: a finite one is an applied update,
    and only that resets the count. A finite reward or loss does not (with one loss check per iteration a finite
    reward would otherwise reset a count of NaN losses forever, and the run would never stop)."""

    def __init__(self, stage: str, limit: int = 3):
        self.stage, self.limit, self.bad, self.skipped, self.updates = stage, limit, 0, 0, 0

    def ok(self, step: int, **quantities: torch.Tensor | float) -> bool:
        """True when every quantity is finite on every rank; else warn, count the skip, and stop at `limit`."""
        for name, value in quantities.items():
            if not bool(torch.isfinite(dist.sync_finite(torch.as_tensor(value).detach())).all()):
                self.bad += 1
                self.skipped += 1
                warnings.warn(f"{self.stage}: step {step}: non-finite {name}; step skipped "
                              f"({self.bad}/{self.limit} since the last update)")
                if self.bad >= self.limit:
                    raise NonFiniteError(f"{self.stage} stopped at step {step}: non-finite {name}, {self.bad} "
                                         f"checks without an update")
                return False
        if "grad_norm" in quantities:
            self.bad = 0
            self.updates += 1
        return True

    def check_learned(self) -> None:
        """A run in which every update was skipped learned nothing: that is a failure, not a result."""
        if self.skipped and not self.updates:
            raise NonFiniteError(f"{self.stage}: every update was skipped ({self.skipped} non-finite checks); "
                                 f"nothing was learned")


def adam(params, decoupled_weight_decay: bool = False, **kw) -> torch.optim.Optimizer:
    """Adam (AdamW with decoupled_weight_decay), fused into one kernel per step where torch has that kernel for
    these tensors (CPU and CUDA): the unfused loop runs ~8 small ops per parameter tensor (2-3 % of PPO's training
    phase at benchmark protocol P, README). `params`: tensors or param-group dicts, as for torch.optim."""
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fusable = bool(tensors) and len({p.device for p in tensors}) == 1 \
        and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and type(p.data) is torch.Tensor for p in tensors)
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    if fusable:
        try:
            return cls(params, fused=True, **kw)
        except RuntimeError:  # torch < 2.4 has no fused kernel for CPU tensors
            pass
    return cls(params, **kw)


def adamw_cosine(params, lr: float, steps: int, warmup_ratio: float, weight_decay: float = 0.0):
    """AdamW with a linear warm-up over warmup_ratio · steps, then cosine decay to 0 (SFT, RM, DPO).
    Returns (optimizer, scheduler)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = adam(params, decoupled_weight_decay=True, lr=lr, weight_decay=weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * steps), steps)


def rl_schedule(optimizer, kind: str, warmup: int, iterations: int):
    """The learning rate of an RL run, stepped once per iteration [TRL PPOConfig]: `warmup` iterations of linear
    warm-up from 0, then constant | linear | cosine (decay to 0 at the last iteration), transformers' schedules.
    None for a constant lr without warm-up: no scheduler at all, as before the option existed."""
    if kind == "constant" and not warmup:
        return None
    from transformers import get_scheduler

    return get_scheduler("constant_with_warmup" if kind == "constant" else kind, optimizer,
                         num_warmup_steps=warmup, num_training_steps=iterations)
