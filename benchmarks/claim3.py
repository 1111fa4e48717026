"""Claim 3 as the article states it, measured: vanilla policy gradient may take only one gradient step per batch of
samples (several steps on the same batch "often lead to destructively large policy updates"); PPO constrains each
update so that several steps per batch are safe, which makes it more sample-efficient.

On finished pipeline runs (their SFT model, reward model and world), at equal sampled episodes, one learning rate:
  pg1  vanilla policy gradient: one gradient step per batch of fresh samples (the pipeline's `pg` section)
  pg4  the same loss, reusing each batch for PPO's schedule (4 epochs x minibatches of 16): no ratio, no clip
  ppo  PPO with that schedule (its clipped ratio and value model), without ptx, so the arms differ in the update only
Then (a) is the unclipped reuse destructive (KL to SFT, held-out gold, their spread over runs)? (b) does PPO's clip
make the reuse safe? (c) sample efficiency: the sampled episodes each method needs before its training-batch gold
(mean of 4 iterations) first exceeds its first batch's (SFT's own samples) by 0.1, and the learning curves. The
verdicts are the report's claims 3a-3c (`report.claims`), so a run's report and this script judge alike.

    python benchmarks/claim3.py --runs R0,R1,R2 --out runs/claim3            # R*: `instructrl pipeline` run dirs
    python benchmarks/claim3.py --runs R0,R1,R2 --out runs/claim3-lr --lr 1e-4   # the second reading
    python benchmarks/claim3.py --smoke                                      # a configs/smoke.yaml pipeline (CI)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch

from instructrl.config import load_pipeline_config
from instructrl.evaluate import evaluate
from finished_runs import run_names, smoke_run  # beside this script
from instructrl.machine import cpu_line
from instructrl.utils import atomic_write_text
from instructrl.pg import PolicyGradient
from instructrl.pipeline import plan
from instructrl.ppo import PPO
from instructrl.report import GAIN_3C, claims, episodes_to_gain, paired_gain
from instructrl.rl import train_rl
from instructrl.robust import eighths_of

ARMS = ("pg1", "pg4", "ppo")


def arm_configs(run: Path, out: Path, lr: float | None, episodes: int | None) -> dict:
    """The three arms' RL configs on `run`'s SFT model and reward model, and the eval config of its SFT stage."""
    cfg = dataclasses.replace(load_pipeline_config(run / "config.yaml"), compare=True)
    p = plan(cfg, run)
    lr = lr or p["pg"].lr
    common = {"lr": lr, "progress": False, **({"episodes": episodes} if episodes else {})}
    pg1 = dataclasses.replace(p["pg"], out=str(out / "pg1"), **common)
    pg4 = dataclasses.replace(pg1, out=str(out / "pg4"), epochs=p["ppo"].ppo_epochs,
                              minibatch_size=p["ppo"].minibatch_size)
    ppo = dataclasses.replace(p["ppo"], out=str(out / "ppo"), **common)
    ev = dataclasses.replace(p["eval"]["sft"], bias_samples=0, stereotype_samples=0, bias_probes=None,
                             pretrain_text=None, mc_benchmark=None, judge=None)
    return {"pg1": (pg1, PolicyGradient), "pg4": (pg4, PolicyGradient), "ppo": (ppo, PPO), "eval": ev}


def curve(out: Path) -> list[dict]:
    """Training-batch gold and KL per iteration, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "objective/gold" in r]


def measure(run: Path, out: Path, lr: float | None, episodes: int | None) -> dict:
    cfgs = arm_configs(run, out, lr, episodes)
    done = out / "result.json"  # a finished run's measurement (the arms' models stay beside it)
    if done.is_file():
        r = json.loads(done.read_text())
        if (r["lr"], r["episodes"]) != (cfgs["pg1"][0].lr, cfgs["pg1"][0].episodes):
            raise SystemExit(f"{done}: measured at lr {r['lr']:g}, {r['episodes']} episodes; give another --out")
        return r
    sft = evaluate(cfgs["eval"])
    result = {"run": str(run), "lr": cfgs["pg1"][0].lr, "episodes": cfgs["pg1"][0].episodes,
              "sft_gold": sft["gold_reward"], "arms": {}}
    for arm in ARMS:
        cfg, algorithm = cfgs[arm]
        if not (Path(cfg.out) / "metrics.jsonl").is_file() or not (Path(cfg.out) / "model.safetensors").is_file():
            train_rl(cfg, algorithm)
        e = evaluate(dataclasses.replace(cfgs["eval"], model=cfg.out))
        c = curve(Path(cfg.out))
        gold = [r["objective/gold"] for r in c]
        gain_sft, se = paired_gain(e["gold_by_prompt"], sft["gold_by_prompt"])  # paired per eval prompt line
        result["arms"][arm] = {
            "gold_gain": gain_sft, "gold_gain_se": se, "gold_reward_se": e["gold_reward_se"],
            "kl": e["kl_to_reference"], "train_kl_last": statistics.fmean(r["objective/kl"] for r in c[-4:]),
            "episodes_to_gain": episodes_to_gain(c, GAIN_3C),
            "gold_eighths": eighths_of(gold), "kl_eighths": eighths_of([r["objective/kl"] for r in c])}
    atomic_write_text(done, json.dumps(result, indent=1))  # a killed run leaves no half-written cache
    return result


def report_stages(r: dict, ppo: str = "ppo") -> dict:
    """One run's arms as the report's stages: pg1 is vanilla PG, pg4 its batch-reusing `pg_reuse`, `ppo` PPO."""
    def stage(arm):
        a = r["arms"][arm]
        return {"gold_reward": r["sft_gold"] + a["gold_gain"], "kl_to_reference": a["kl"], "episodes": r["episodes"],
                "episodes_to_gain": a["episodes_to_gain"], "gold_reward_se": a.get("gold_reward_se")}

    return {"pg": stage("pg1"), "pg_reuse": stage("pg4"), "ppo": stage(ppo)}


def summary(results: list[dict]) -> str:
    def col(arm, key):
        return [r["arms"][arm][key] for r in results]

    def ms(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "–"
        return f"{statistics.fmean(xs):+.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:+.3f}"

    n = len(results)
    lines = [f"lr {results[0]['lr']:g}, {results[0]['episodes']} sampled episodes per arm, {n} runs",
             "", "| arm | gold − SFT (held-out) | per run (± paired SE) | KL to SFT | episodes to +%g training gold |"
             " training gold by eighth (mean of runs) |" % GAIN_3C, "|---|---|---|---|---|---|"]
    for arm in ARMS:
        runs = ", ".join(f"{r['arms'][arm]['gold_gain']:+.3f} ± {r['arms'][arm]['gold_gain_se']:.3f}" for r in results)
        eps = ", ".join(str(x) if x is not None else "never" for x in col(arm, "episodes_to_gain"))
        curve8 = " ".join(f"{statistics.fmean(v):.3f}" for v in zip(*col(arm, "gold_eighths")))
        lines.append(f"| {arm} | {ms(col(arm, 'gold_gain'))} | {runs} | {ms(col(arm, 'kl'))} | {eps} | {curve8} |")

    # the verdicts are the report's claims 3a-3c (report.claims), on each run's three arms
    verdicts = [{c["claim"][:2]: c for c in claims(report_stages(r))} for r in results]
    lines.append("")
    for key in ("3a", "3b", "3c"):
        k = sum(v[key]["holds"] for v in verdicts)
        lines.append(f"{verdicts[0][key]['claim']}: holds on {k} of {n} runs")
    first = sum({c["claim"][:2]: c for c in claims(report_stages(r, ppo="pg4"))}["3c"]["holds"] for r in results)
    lines.append(f"(pg4 in PPO's place: it reaches the gain before vanilla PG on {first} of {n} runs)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", help="comma-separated pipeline run directories (each: config.yaml, world/, sft/, reward/)")
    ap.add_argument("--out", help="where the arms are trained (OUT/<run name>/<arm>/; finished arms are reused)")
    ap.add_argument("--lr", type=float, help="one learning rate for every arm (default: the pipeline's pg lr)")
    ap.add_argument("--episodes", type=int, help="sampled episodes per arm (default: the pipeline's PPO episodes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="on a configs/smoke.yaml pipeline in a temp dir (CI)")
    a = ap.parse_args()
    if a.json:  # the output policy of every command: a new file, never one of the user's replaced
        from instructrl.outputs import check_file_output

        check_file_output(a.json, [], "--json")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            a.runs, a.out = f"{tmp}/run", f"{tmp}/claim3"
            smoke_run(a.runs, a.threads)
        elif not (a.runs and a.out):
            ap.error("--runs and --out are required (or --smoke)")
        runs = [Path(r) for r in a.runs.split(",")]
        names = run_names(runs)
        results = [measure(r, Path(a.out) / name, a.lr, a.episodes) for r, name in zip(runs, names)]
        print(cpu_line())
        print(summary(results))
        print("RESULT " + json.dumps(results))
        if a.json:
            atomic_write_text(a.json, json.dumps(results, indent=1), overwrite=False)


if __name__ == "__main__":
    main()
