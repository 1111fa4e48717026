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


def split_share(items: list, share: float) -> tuple[list, list]:
    """(rest, chosen): `share` of the items chosen, spread evenly through the list (item i is chosen when
    floor((i+1)·share) > floor(i·share)), so both parts keep the list's mix."""
    chosen = [math.floor((i + 1) * share) > math.floor(i * share) for i in range(len(items))]
    return [x for x, c in zip(items, chosen) if not c], [x for x, c in zip(items, chosen) if c]


def simulate_rankings(policy, tokenizer, prompts: list[str], judge, *, k: int = 4, temperature: float = 0.2,
                      n_labelers: int = 1, labeler_bias_std: float = 0.0, sample_temperature: float = 1.0,
                      max_new_tokens: int = 32, oversample: int = 2, batch_size: int = 64, seed: int = 0,
                      progress=None) -> list[dict]:
    """Sample K distinct responses per prompt from `policy`, rank them with simulated labelers.

    Each prompt draws oversample·K samples and keeps the first K distinct non-empty texts; a prompt with fewer
    than 2 distinct texts is dropped (duplicates cannot be ranked against each other). Records are in the
    rankings format, with the gold scores and labeler id as extra fields that Step 2 ignores.
    """
    from ..sampling import generate

    labelers = [SimulatedLabeler(temperature, labeler_bias_std if i > 0 else 0.0, seed + 101 * i)
                for i in range(n_labelers)]
    flat = [p for p in prompts for _ in range(oversample * k)]
    texts = generate(policy, tokenizer, flat, max_new_tokens=max_new_tokens, temperature=sample_temperature,
                     batch_size=batch_size, seed=seed, progress=progress)
    records = []
    for i, prompt in enumerate(prompts):
        distinct: list[str] = []
        for t in texts[i * oversample * k:(i + 1) * oversample * k]:
            if t.strip() and t not in distinct:
                distinct.append(t)
        responses = distinct[:k]
        if len(responses) < 2:
            continue
        gold = judge.score_batch([prompt] * len(responses), responses)
        labeler = i % n_labelers
        records.append({"prompt": prompt, "responses": responses, "ranking": labelers[labeler].rank(gold),
                        "gold_scores": gold, "labeler": f"sim-{labeler}"})
    return records
