"""Which of the embedded world's tasks a model can do: per task type, the share of correct answers (the hidden
judge's `correct`) and the mean gold, on the questions the demonstrations cover, the other training questions and
the held-out eval questions, and whether the model reads the question at all (how many distinct replies one
sampling noise gives across the type's questions, averaged over several noises: a model that ignores the operands
of a sum answers every sum alike).

    python benchmarks/task_skills.py --run runs/default                       # its pretrained and SFT models
    python benchmarks/task_skills.py --run runs/default --models sft,ppo_ptx
    python benchmarks/task_skills.py --smoke                                   # a configs/smoke.yaml pipeline (CI)
"""
import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch

from instructrl.data import read_prompts
from instructrl.machine import cpu_line
from instructrl.models import load_causal_lm, load_tokenizer
from instructrl.sampling import generate
from instructrl.world import GoldJudge

from finished_runs import run_or_smoke  # beside this script


def skills(world: Path, model_dir: Path, samples: int, temperature: float, seed: int, draws: int) -> dict:
    """{type: {split: {"questions", "correct", "gold"}}, "distinct_replies": {type: [mean distinct, questions]}}."""
    judge = GoldJudge.from_world(world)
    split_of = {p: "eval" for p in read_prompts(world / "prompts_eval.jsonl")}
    split_of.update({p: "demo" for p in read_prompts(world / "demos.jsonl")})
    questions = list(judge.tasks)
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    replies = generate(model, tok, [q for q in questions for _ in range(samples)], max_new_tokens=32,
                       temperature=temperature, seed=seed)
    # one reply per question under one noise (a batch of one, one seed), for `draws` seeds: a model that reads the
    # question answers different questions differently; one that does not gives them one reply. A draw can land on
    # a reply that ignores any question (a rude one), so the count is averaged over the draws.
    firsts = {d: {q: generate(model, tok, [q], max_new_tokens=32, temperature=temperature, seed=seed + d)[0]
                  for q in questions} for d in range(draws)}
    sums: dict = collections.defaultdict(lambda: [0, 0, 0.0])
    distinct: dict = collections.defaultdict(lambda: [set() for _ in range(draws)])
    count: dict = collections.Counter()
    for i, q in enumerate(questions):
        spec = judge.tasks[q]
        kind, split = spec["type"], split_of.get(q, "train")
        for r in replies[i * samples:(i + 1) * samples]:
            s = sums[kind, split]
            s[0], s[1], s[2] = s[0] + judge.correct(spec, r), s[1] + 1, s[2] + judge.score(q, r)
        for d in range(draws):
            distinct[kind][d].add(firsts[d][q].strip())
        count[kind] += 1
    out: dict = {}
    for (kind, split), (c, n, g) in sorted(sums.items()):
        out.setdefault(kind, {})[split] = {"questions": n // samples, "correct": round(c / n, 3),
                                           "gold": round(g / n, 3)}
    out["distinct_replies"] = {k: [round(sum(map(len, distinct[k])) / draws, 1), count[k]] for k in sorted(count)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a pipeline run directory (world/ and the models)")
    p.add_argument("--models", default="pretrained,sft", help="comma-separated stage directories of --run")
    p.add_argument("--samples", type=int, default=8, help="samples per question")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--draws", type=int, default=8, help="noises under which every question gets one reply")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="on a configs/smoke.yaml pipeline in a temp dir (CI)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            a.samples, a.draws = 2, 2
        run = run_or_smoke(p, a, tmp)
        print(cpu_line())
        for name in a.models.split(","):
            r = skills(run / "world", run / name, a.samples, a.temperature, a.seed, a.draws)
            print(f"\n{name}: share correct (mean gold) by task type, on demonstration / other training / eval "
                  f"questions; distinct replies over the type's questions under one noise (mean of {a.draws})")
            for kind, splits in r.items():
                if kind == "distinct_replies":
                    continue
                cells = [f"{sp} {v['correct']:.2f} ({v['gold']:+.2f}) on {v['questions']}" for sp, v in splits.items()]
                d, n = r["distinct_replies"][kind]
                print(f"  {kind:<9} {'; '.join(cells)}; {d} distinct replies over {n} questions")
            print("RESULT " + json.dumps({"model": name, **r}))


if __name__ == "__main__":
    main()
