"""Step 2 measurements: K-way grouped loss vs the same comparisons as shuffled independent pairs.

Trains both reward models on the same rankings for the same number of epochs and optimizer steps, then prints
held-out pairwise accuracy (vs the labels and vs the gold judge), and Spearman(RM, gold) on fresh SFT samples.

    python benchmarks/rm_grouping.py --run runs/default [--epochs 1]
    python benchmarks/rm_grouping.py --smoke        # on a pipeline of configs/smoke.yaml in a temp dir (CI)
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from instructrl.evaluate import world_eval_config, evaluate
from instructrl.machine import cpu_line
from instructrl.reward import RewardConfig, train_reward_model
from instructrl.utils import peak_rss_mb

from finished_runs import run_or_smoke  # beside this script


def measure(run: Path, epochs: float) -> list[dict]:
    rows = []
    for grouped in (True, False):
        out = run / f"rm_grouped_{grouped}_e{epochs:g}"
        t0 = time.time()
        s = train_reward_model(RewardConfig(model=str(run / "sft"), data=str(run / "rankings" / "rankings.jsonl"),
                                            demos=str(run / "world" / "demos.jsonl"), out=str(out), grouped=grouped,
                                            epochs=epochs, progress=False))
        e = evaluate(world_eval_config(run / "world", str(run / "sft"), reward=str(out), samples_per_prompt=2))
        rows.append({"grouped": grouped, "epochs": epochs, "steps": s["steps"], **s["held_out"],
                     "spearman_fresh_sft_samples": e["rm_gold_spearman"], "demo_score_mean": s["demo_score_mean"],
                     "train_seconds": round(time.time() - t0, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", help="a pipeline run directory (world/, sft/, rankings/)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="on a configs/smoke.yaml pipeline in a temp dir (CI)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(run_or_smoke(p, a, tmp), a.epochs)
    print(cpu_line())
    print(json.dumps(rows, indent=2))
    print(f"peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
