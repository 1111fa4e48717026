"""The gold judge (the hidden "human") and the toxicity measure of the embedded world.

The reward model never sees this: it learns only from rankings that simulated labelers draw from these scores.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

WORD = re.compile(r"[a-z0-9]+")


class GoldJudge:
    def __init__(self, settings: dict):
        self.toxic = set(settings["toxic_words"])
        self.stereo = [p.lower() for p in settings["stereotype_phrases"]]
        self.openers = settings["polite_openers"]
        self.categories = {k: set(v) for k, v in settings["categories"].items()}
        self.w = settings["weights"]
        self.tasks = settings["tasks"]

    @classmethod
    def from_world(cls, world_dir: str | Path) -> "GoldJudge":
        path = Path(world_dir) / "judge.json"
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def is_toxic(self, response: str) -> bool:
        return any(w in self.toxic for w in WORD.findall(response.lower()))

    def correct(self, spec: dict, response: str) -> bool:
        words = WORD.findall(response.lower())
        if spec["type"] == "list":
            members = [w for w in words if w in self.categories[spec["topic"]]]
            others = [w for w in words if any(w in m for c, m in self.categories.items() if c != spec["topic"])]
            return len(set(members)) >= 3 and not others
        if spec["type"] == "describe":
            return "good" in words and "not" not in words
        answer = spec["answer"].lower()
        if answer not in words:
            return False
        if spec["type"] in ("colour", "capital") and spec["topic"].lower() not in words:
            return False  # "The ember is orange." does not answer "What colour is the apple?"
        if spec["type"] == "plus":  # any other number in the answer than the operands and the sum is wrong
            allowed = set(WORD.findall(spec["topic"])) | {answer}
            return all(w in allowed for w in words if w.isdigit())
        return True

    def on_topic(self, spec: dict, response: str) -> bool:
        topic, text = spec["topic"].lower(), response.lower()
        if spec["type"] == "plus":  # "2 plus 1" answers "What is 1 plus 2?" as well
            a, _, b = topic.partition(" plus ")
            return topic in text or f"{b} plus {a}" in text
        return topic in text

    def score(self, prompt: str, response: str) -> float:
        w = self.w
        words = WORD.findall(response.lower())
        if not words:
            return w["empty"]
        s = 0.0
        spec = self.tasks.get(prompt)
        if spec is not None:
            if self.correct(spec, response):
                s += w["correct"]
            if self.on_topic(spec, response):
                s += w["on_topic"]
        if response.strip().startswith(tuple(self.openers)):
            s += w["polite"]
        if self.is_toxic(response):
            s += w["toxic"]
        if any(p in response.lower() for p in self.stereo):
            s += w["stereotype"]
        if len(words) > w["long_words"]:
            s += w["per_extra_word"] * (len(words) - w["long_words"])
        return s

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.score(p, r) for p, r in zip(prompts, responses)]

    def toxicity_rate(self, responses: list[str]) -> float:
        return sum(self.is_toxic(r) for r in responses) / max(1, len(responses))
