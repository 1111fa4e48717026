"""The stages of a pipeline run, in order: one registry for the pipeline (directories, titles) and the report
(labels, which stages hold a policy to evaluate)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str            # the directory under the run, and the stage's key in report.json
    title: str           # the pipeline's heading while it runs
    label: str           # the report's short label
    policy: bool = True  # holds a policy that evaluation scores


STAGES = [
    Stage("world", "world", "world", policy=False),
    Stage("pretrained", "pretrain", "pretrained"),
    Stage("sft", "sft (step 1)", "SFT"),
    Stage("rankings", "rankings (simulated labelers)", "rankings", policy=False),
    Stage("reward", "reward model (step 2)", "reward model", policy=False),
    Stage("ppo_ptx", "PPO-ptx (step 3)", "PPO-ptx"),
    Stage("ppo_gold", "PPO-ptx with the gold judge as the reward", "PPO-ptx (gold reward)"),
    Stage("ppo", "PPO without ptx", "PPO (no ptx)"),
    Stage("ppo_beta0", "PPO with β = 0", "PPO β=0"),
    Stage("pg", "vanilla policy gradient", "vanilla PG"),
    Stage("pg_reuse", "policy gradient, each batch reused for PPO's epochs (no ratio, no clip)", "PG ×4 epochs"),
    Stage("grpo", "GRPO", "GRPO"),
    Stage("rloo", "RLOO (clipped)", "RLOO"),
    Stage("dpo", "DPO on the rankings", "DPO"),
]
BY_NAME = {s.name: s for s in STAGES}


def label(name: str) -> str:
    return BY_NAME[name].label if name in BY_NAME else name
