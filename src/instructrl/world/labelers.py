"""Simulated labelers: rank K responses from the gold judge's scores with Plackett–Luce noise."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class SimulatedLabeler:
    """Ranks by sampling without replacement with P(next = i) ∝ exp(score_i / temperature).

    temperature → 0 is the gold order; larger values disagree more often. `bias` shifts this labeler's view
    of each response by a per-response offset (a labeler who systematically disagrees with the judge).
    """

    temperature: float = 0.2
    bias_std: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def rank(self, scores: list[float]) -> list[int]:
        view = [s + self.rng.gauss(0.0, self.bias_std) if self.bias_std > 0 else s for s in scores]
        remaining = list(range(len(scores)))
        order = []
        while remaining:
            if self.temperature <= 0:
                pick = max(remaining, key=lambda i: view[i])
            else:
                top = max(view[i] for i in remaining)
                weights = [math.exp((view[i] - top) / self.temperature) for i in remaining]
                pick = self.rng.choices(remaining, weights=weights)[0]
            order.append(pick)
            remaining.remove(pick)
        return order
