"""Model cards: README.md in every trained output, in the Hugging Face model-card form (YAML front matter, then
Markdown). One section per step that wrote into the directory; the front matter names the base model and the data
where they are Hub ids (the Hub accepts only ids there; local paths are listed in the body)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

from .hub import looks_like_id

CARD_FILE = "README.md"
INTRO = "# instructrl model\n\nWritten by instructrl, an RLHF toolkit (SFT → reward model → PPO).\n"
MODEL_INPUTS = ("model", "policy", "ref", "reward", "value", "judge")  # base model first: `model`, else `policy`
DATA_INPUTS = ("data", "prompts", "demos", "corpus", "val_corpus", "ptx_data")
ENVIRONMENT = {"stage", "config", "world_size", "seconds", "peak_rss_mb"}  # summary keys that are not results

IG = "Ouyang et al. 2022, Training language models to follow instructions with human feedback, arXiv:2203.02155"
CITATIONS = {
    "pretrain": ["Radford et al. 2019, Language Models are Unsupervised Multitask Learners (GPT-2)"],
    "sft": [IG],
    "reward": [IG, "Stiennon et al. 2020, Learning to summarize from human feedback, arXiv:2009.01325"],
    "ppo": ["Schulman et al. 2017, Proximal Policy Optimization Algorithms, arXiv:1707.06347", IG,
            "Ziegler et al. 2019, Fine-Tuning Language Models from Human Preferences, arXiv:1909.08593"],
    "pg": ["Williams 1992, Simple statistical gradient-following algorithms for connectionist reinforcement "
           "learning, Machine Learning 8:229–256", IG],
    "grpo": ["Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models "
             "(GRPO), arXiv:2402.03300"],
    "rloo": ["Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human "
             "Feedback in LLMs, arXiv:2402.14740",
             "Kool et al. 2019, Buy 4 REINFORCE Samples, Get a Baseline for Free!, ICLR DeepRLStructPred workshop"],
    "dpo": ["Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model, "
            "arXiv:2305.18290"],
}
TAGS = {"reward": "reward-model", "pg": "reinforce"}


def write_model_card(path: str | os.PathLike, step: str, details: dict, meta: dict | None = None,
                     extra: str = "") -> None:
    """PATH/README.md: a section per step (its details as a list, then `extra`); writing a step again replaces its
    section; `meta` is merged into the front matter (lists joined, without repeats)."""
    card = Path(path) / CARD_FILE
    text = card.read_text() if card.is_file() else ""
    front, body = {"library_name": "transformers", "tags": ["instructrl", "rlhf"]}, INTRO
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        head, body = text[4:].split("\n---\n", 1)
        front = yaml.safe_load(head) or front
    for k, v in (meta or {}).items():
        front[k] = list(dict.fromkeys([*front.get(k, []), *v])) if isinstance(v, list) else v
    intro, *sections = body.split("\n## ")
    sections = [s for s in sections if s.split("\n", 1)[0] != step]
    lines = "\n".join(f"- **{k}**: {v}" for k, v in details.items())
    sections = [s.rstrip("\n") + "\n" for s in sections] + [f"{step}\n\n{lines}\n{extra}"]
    body = "\n## ".join([intro.rstrip("\n") + "\n", *sections])
    card.write_text(f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n{body}")


def training_card(path: str | os.PathLike, summary: dict) -> None:
    """The card of a finished training step (from its summary: stage, options, results): the base model and data,
    how it was run, the final metrics, and the method's references."""
    stage, cfg = summary["stage"], summary.get("config", {})
    models = {k: cfg[k] for k in MODEL_INPUTS if isinstance(cfg.get(k), str) and cfg[k]}
    data = {k: cfg[k] for k in DATA_INPUTS if isinstance(cfg.get(k), str) and cfg[k]}
    base = models.get("model") or models.get("policy")
    meta = {"tags": ["instructrl", "rlhf", TAGS.get(stage, stage)]}
    if stage != "reward":  # the policies and the pretrained model are causal LMs
        meta["pipeline_tag"] = "text-generation"
    if base and looks_like_id(base) and not Path(base).exists():
        meta["base_model"] = base
    hub_data = [v for v in data.values() if looks_like_id(v) and not Path(v).exists()]
    if hub_data:
        meta["datasets"] = hub_data
    flat = {}  # nested results (RL's `final`, DPO's `held_out`) flattened: `final` bare, others prefixed
    for k, v in summary.items():
        for kk, vv in (v.items() if isinstance(v, dict) and k not in ENVIRONMENT else [(k, v)]):
            flat[kk if k in ("final", kk) else f"{k}/{kk}"] = vv
    results = {k: v for k, v in flat.items()
               if k not in ENVIRONMENT and isinstance(v, (int, float)) and not isinstance(v, bool)}
    details = {"base model": f"`{base}`" if base else "none (trained from scratch)",
               **{k: f"`{v}`" for k, v in models.items() if v != base},
               **{"data" if k == "data" else f"data ({k})": f"`{v}`" for k, v in data.items()},
               "final metrics": ", ".join(f"{k} = {v:.6g}" for k, v in results.items()) or "none",
               "references": "; ".join(CITATIONS.get(stage, [])) or "none recorded"}
    argv0 = Path(sys.argv[0]).name
    if argv0 in ("instructrl", "cli.py"):  # run from the command line (not from Python)
        details["command"] = f"`instructrl {shlex.join(sys.argv[1:])}`"
    options = yaml.safe_dump(cfg, sort_keys=True, allow_unicode=True)
    write_model_card(path, stage, details, meta, f"\nAll options:\n\n```yaml\n{options}```\n")
