"""Step 3 with RLOO and the clipped surrogate [RLOO, PPO]: k samples per prompt, each one's baseline the mean
return of the other k − 1, several epochs of clipped updates, no value model.

  2. advantages: A_t = G_t − b with the KL in the reward (reward-to-go G_t) and b the leave-one-out mean of the
     sequence returns G_0 — exactly `pg --baseline loo`'s
  3. update (`update.py`): epochs × minibatches of the clipped surrogate, token mean (+ β·KL in the loss with
     --kl-in loss, + γ · ptx loss)

`pg --baseline loo` is the special case of one epoch, one minibatch (the ratio is then 1 and the clipped
surrogate's gradient is the policy gradient's; tests/test_algorithms.py checks they train alike).
"""
from __future__ import annotations

from .grpo import ClippedGroupAlgorithm, check_groups
from .options import config, option
from .pg import pg_advantages
from .rl import RLConfig, register
from .rollout import Rollout


@config
class RLOOConfig(RLConfig):
    samples_per_prompt: int = option(4, "k samples per prompt (divides batch_size) [RLOO]", ge=2)
    epochs: int = option(2, "passes over each batch of rollouts", ge=1)
    minibatch_size: int = option(32, "rollouts per optimizer step (global; divides batch_size)", ge=1)
    clip: float = option(0.2, "policy clip range ε", gt=0)
    gamma: float = option(1.0, "discount of the reward-to-go", ge=0, le=1)

    def check(self) -> None:
        super().check()
        check_groups(self, "samples_per_prompt")


@register
class RLOO(ClippedGroupAlgorithm):
    """Step 3 with RLOO: leave-one-out baseline over k samples per prompt, clipped updates over several epochs."""

    name, config = "rloo", RLOOConfig

    def advantages(self, r: Rollout, beta: float) -> dict:
        return {"advantages": pg_advantages(self.rewards(r, beta), r.mask, self.cfg.gamma, self.samples_per_prompt)}


def train_rloo(cfg: RLOOConfig) -> dict:
    """Step 3 with clipped RLOO (the Python API of `instructrl rloo`)."""
    from .rl import train_rl

    return train_rl(cfg, RLOO)
