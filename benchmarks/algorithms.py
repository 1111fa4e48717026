"""Every way to learn from the same feedback, at the pipeline's defaults, on finished pipeline runs: the README's
"Defaults that work" table.

For each run (its config.yaml, world, SFT model, reward model and rankings), trains vanilla PG, GRPO, RLOO and DPO
exactly as `pipeline --compare` would (today's sections, PPO's sampled episodes, DPO on the run's rankings), then
evaluates each on the run's eval prompts as the pipeline does and prints, per method: held-out gold − SFT (paired
over prompt lines, ± its standard error), the gain in standard errors, KL to SFT and that KL over PPO-ptx's (from
the run's own report). The acceptance of the "defaults that work" issue: gain > 3 SE on every run, KL ≤ 3× PPO-ptx's.

    python benchmarks/algorithms.py --runs R0,R1,R2 --out runs/algorithms   # R*: `instructrl pipeline` run dirs
    python benchmarks/algorithms.py --runs R0 --out runs/alg-grpo-std --methods grpo --set grpo.scale_rewards=true
    python benchmarks/algorithms.py --runs R0,R1,R2 --out runs/alg-dpo-own --methods dpo --dpo-rankings sft
    python benchmarks/algorithms.py --smoke                                  # a configs/smoke.yaml pipeline (CI)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from instructrl.config import PipelineConfig, load_pipeline_config
from instructrl.dpo import dpo
from instructrl.evaluate import evaluate
from instructrl.grpo import GRPO
from finished_runs import run_names, smoke_run  # beside this script
from instructrl.machine import cpu_line
from instructrl.options import flat_fields
from instructrl.utils import atomic_write_text
from instructrl.pg import PolicyGradient
from instructrl.pipeline import plan
from instructrl.report import paired_gain
from instructrl.rl import train_rl
from instructrl.rloo import RLOO

METHODS = {"pg": PolicyGradient, "grpo": GRPO, "rloo": RLOO, "dpo": None}


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`--set grpo.scale_rewards=true` → {"grpo": {"scale_rewards": True}} (values read as YAML), checked by name."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in METHODS or name not in {f.name for f in flat_fields(type(getattr(
                PipelineConfig(), section)))}:
            raise SystemExit(f"--set {item}: expected METHOD.OPTION=VALUE, METHOD one of {', '.join(METHODS)}")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def measure(run: Path, out: Path, methods: list[str], run_sections: bool = False, sets: dict | None = None,
            dpo_rankings: str = "all") -> dict:
    """Train (or reuse, from OUT) each method on `run` and evaluate it against the run's SFT model. `sets`
    overrides options of the methods' sections (a lever); `dpo_rankings` "sft": DPO on SFT's own rankings only."""
    sets = sets or {}
    settings = {"sets": sets, "dpo_rankings": dpo_rankings}
    done = out / "result.json"  # a finished run's measurement (the methods' models stay beside it)
    if done.is_file():
        r = json.loads(done.read_text())
        if r.get("settings", {"sets": {}, "dpo_rankings": "all"}) != settings:
            raise SystemExit(f"{done}: measured with {r.get('settings')}; give another --out")
        if set(r["methods"]) >= set(methods):
            return {**r, "methods": {m: r["methods"][m] for m in methods}}
    cfg = dataclasses.replace(load_pipeline_config(run / "config.yaml"), compare=True)
    if not run_sections:  # the methods as today's defaults set them (a run's config.yaml holds those of its day)
        for m in METHODS:
            setattr(cfg, m, getattr(PipelineConfig(), m))
    for m, kw in sets.items():
        setattr(cfg, m, dataclasses.replace(getattr(cfg, m), **kw))
    p = plan(cfg, run)  # every stage's config as the pipeline sets it on this run; the outputs go to OUT instead
    if dpo_rankings == "sft":  # the rankings of SFT's own samples: DPO's pairs drawn near its reference
        own = out / "rankings_sft.jsonl"
        if not own.is_file():
            lines = [x for x in Path(p["dpo"].data).read_text().splitlines() if json.loads(x).get("policy") == "sft"]
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(own, "\n".join(lines) + "\n")
        p["dpo"] = dataclasses.replace(p["dpo"], data=str(own))
    ev = dataclasses.replace(p["eval"]["sft"], bias_samples=0, stereotype_samples=0, bias_probes=None,
                             pretrain_text=None, mc_benchmark=None, judge=None)
    base = evaluate(ev)
    ppo = json.loads((run / "report.json").read_text())["stages"]["ppo_ptx"]
    result = {"run": str(run), "settings": settings, "ppo_ptx": {"gain": ppo["gold_vs_sft"], "se": ppo["gold_vs_sft_se"],
                                                                 "kl": ppo["kl_to_reference"]}, "methods": {}}
    for m in methods:
        c = dataclasses.replace(p[m], out=str(out / m), progress=False)
        if not (out / m / "model.safetensors").is_file():
            dpo(c) if m == "dpo" else train_rl(c, METHODS[m])
        e = evaluate(dataclasses.replace(ev, model=str(out / m)))
        gain, se = paired_gain(e["gold_by_prompt"], base["gold_by_prompt"])
        result["methods"][m] = {"gain": gain, "se": se, "kl": e["kl_to_reference"],
                                "kl_over_ppo_ptx": e["kl_to_reference"] / ppo["kl_to_reference"]
                                if ppo["kl_to_reference"] else float("inf")}
    atomic_write_text(done, json.dumps(result, indent=1))  # a killed run leaves no half-written cache
    return result


def table(results: list[dict]) -> str:
    n = len(results)

    def ms(xs):
        return f"{statistics.fmean(xs):+.3f} ± {statistics.stdev(xs):.3f}" if n > 1 else f"{xs[0]:+.3f}"

    lines = [f"{n} runs; gold − SFT on the eval prompts, paired over prompt lines",
             "", "| method at the pipeline's defaults | gold − SFT, mean ± sd | per run (± paired SE) | in SE, min | "
             "KL to SFT | KL / PPO-ptx's, max | holds (> 3 SE and KL ≤ 3× PPO-ptx's) |", "|---|---|---|---|---|---|---|"]
    rows = [("ppo_ptx", [r["ppo_ptx"] for r in results])]
    rows += [(m, [r["methods"][m] for r in results]) for m in results[0]["methods"]]
    for name, vals in rows:
        ratio = [v["kl"] / r["ppo_ptx"]["kl"] for v, r in zip(vals, results)]
        z = [v["gain"] / v["se"] if v["se"] else float("inf") if v["gain"] > 0 else 0.0 for v in vals]
        ok = sum(zi > 3 and q <= 3 for zi, q in zip(z, ratio))
        per = ", ".join(f"{v['gain']:+.3f} ± {v['se']:.3f}" for v in vals)
        lines.append(f"| {name} | {ms([v['gain'] for v in vals])} | {per} | {min(z):.1f} | "
                     f"{statistics.fmean(v['kl'] for v in vals):.2f} | {max(ratio):.2f} | {ok} of {n} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", help="comma-separated pipeline run directories (config.yaml, world/, sft/, reward/, "
                                   "rankings/, report.json)")
    ap.add_argument("--out", help="where the methods are trained (OUT/<run name>/<method>/; finished ones are reused)")
    ap.add_argument("--methods", default="pg,grpo,rloo,dpo")
    ap.add_argument("--run-sections", action="store_true",
                    help="the methods' sections as each run's config.yaml has them, not today's defaults")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                    help="a lever: override an option of a method's section, e.g. grpo.scale_rewards=true (repeatable)")
    ap.add_argument("--dpo-rankings", choices=("all", "sft"), default="all",
                    help="DPO on all the run's rankings (the pipeline's) or on SFT's own samples' rankings only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="on a configs/smoke.yaml pipeline in a temp dir (CI)")
    a = ap.parse_args()
    methods = a.methods.split(",")
    if unknown := sorted(set(methods) - set(METHODS)):
        ap.error(f"--methods: {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            a.runs, a.out = f"{tmp}/run", f"{tmp}/algorithms"
            a.run_sections = True  # the smoke config's tiny batches
            smoke_run(a.runs, a.threads)
        elif not (a.runs and a.out):
            ap.error("--runs and --out are required (or --smoke)")
        runs = [Path(r) for r in a.runs.split(",")]
        names = run_names(runs)
        sets = parse_sets(a.set)
        results = [measure(r, Path(a.out) / name, methods, a.run_sections, sets, a.dpo_rankings)
                   for r, name in zip(runs, names)]
        if a.smoke:  # the levers' path too: an option set, and DPO on SFT's own rankings
            lever = measure(runs[0], Path(a.out) / "lever", ["grpo", "dpo"], True,
                            parse_sets(["grpo.scale_rewards=true", "dpo.beta=0.3"]), "sft")
            print("lever (grpo.scale_rewards=true, dpo.beta=0.3, SFT's own rankings):", json.dumps(lever["methods"]))
        print(cpu_line())
        print(table(results))
        print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
