"""Results that hold on any machine: the pipeline over seeds × float paths (`pipeline --seeds N --float-paths
native,default`), one run at a time, and every claim and world check summarised over the runs in OUT/robust.json.

A float path (`machine.py`) is set before torch loads, so each run is its own process (`instructrl pipeline
--float-path NAME` in OUT/<float path>/seed-<k>/, `:` written `-`, its config in OUT/config-seed-<k>.yaml). Runs go one after
another with threads ≤ cores: two torch processes on the same cores slow each other several-fold.

robust.json (what the report renders; keys are stable):
  {"runs": [{"seed", "float_path", "dir", "torch_capability", "threads", "seconds"}, ...],   # in run order
   "cpu": {cpu_info of the parent},
   "claims":       [{"claim": name, "values": [margin per run or null], "per_run": [bool per run],
                     "holds": k, "runs": n, "mean", "sd", "min", "max"}, ...],
   "world_checks": [{"check": name, ...the same fields...}, ...],
   "stages": {stage: {metric: {"values", "mean", "sd", "min", "max"}}}}
mean/sd/min/max are over the runs' numbers (sd with n − 1; null where no run has one); a value is null where its run
has no number (not measured, or NaN: a Spearman of constant scores). `values[i]`,
`per_run[i]` belong to `runs[i]`. One check is added to the report's own: PPO-ptx's training-batch gold by eighths
of the run, last eighth − best eighth ≥ −0.05 (no visible overshoot), from OUT/…/ppo_ptx/metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from .machine import ENV, cpu_info, float_path_env, float_path_threads, parse_float_path
from .utils import console, write_json

OVERSHOOT_TOL = 0.05


class RunFailed(Exception):
    """A child pipeline run stopped; `code` is its exit code (the CLI exits with it)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_dir_name(float_path: str, seed: int) -> str:
    return f"{float_path.replace(':', '-')}/seed-{seed}"  # default:t1 → default-t1/seed-0


def float_path_command(out: Path, config: Path | None, name: str, threads: int, compare: bool = False,
                       rerun_changed: bool = False) -> list[str]:
    """`instructrl pipeline` in a child interpreter under float path `name`."""
    cmd = [sys.executable, "-m", "instructrl.cli", "pipeline", "--out", str(out), "--threads", str(threads),
           "--float-path", name]
    return cmd + (["--config", str(config)] if config else []) + (["--compare"] if compare else []) + \
        (["--rerun-changed"] if rerun_changed else [])


def run_float_path(cmd: list[str], name: str, threads: int) -> int:
    """Run `cmd` with the float path's environment (its output goes to ours); its exit code."""
    return subprocess.run(cmd, env=float_path_env(name, threads)).returncode


def grid_threads(float_paths: list[str], threads: int | None, jobs: int) -> dict[str, int]:
    """Each float path's thread count with `jobs` runs at once: never more threads in all than cores (two torch
    processes whose threads outnumber the cores wait for each other, several-fold slower)."""
    import os

    cores = os.cpu_count() or 1
    if jobs > cores:
        raise ValueError(f"--jobs {jobs}: more runs at once than this machine's {cores} cores")
    out = {name: float_path_threads(name, threads or max(1, cores // jobs)) for name in float_paths}
    worst = max(out.values()) * jobs
    if worst > cores:
        raise ValueError(f"--jobs {jobs} × {max(out.values())} threads = {worst} threads on {cores} cores: give fewer "
                         f"--threads or float paths with :tN (e.g. default:t1)")
    return out


def in_float_path(name: str) -> bool:
    """True in a process started under float path `name` (torch's dispatch was set before it loaded)."""
    import os

    return os.environ.get(ENV) == name


def eighths(metrics_file: Path, key: str = "objective/gold") -> list[float] | None:
    """The mean of `key` over each eighth of a run's training batches (None without 8 logged values)."""
    if not metrics_file.is_file():
        return None
    xs = [r[key] for r in map(json.loads, metrics_file.read_text().splitlines()) if key in r]
    return eighths_of(xs) if len(xs) >= 8 else None


def eighths_of(xs: list[float]) -> list[float]:
    """The mean of each eighth of `xs` (fewer than 8 values: eighth i is the value at i·n/8)."""
    if len(xs) < 8:
        return [xs[i * len(xs) // 8] for i in range(8)] if xs else []
    bounds = [round(i * len(xs) / 8) for i in range(9)]
    return [sum(xs[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]


def overshoot_check(run_dir: Path) -> dict | None:
    e = eighths(run_dir / "ppo_ptx" / "metrics.jsonl")
    if e is None:
        return None
    drop = e[-1] - max(e)
    return {"check": f"PPO-ptx's training-batch gold: last eighth of the run within {OVERSHOOT_TOL} of its best "
                     f"eighth", "holds": drop >= -OVERSHOOT_TOL, "value": drop, "eighths": e}


def number(v) -> float | None:
    """A run's value, or None where it has none (not measured, or NaN: e.g. a Spearman of constant scores)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def stats(values: list) -> dict:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None, "min": None, "max": None}
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "sd": sd, "min": min(xs), "max": max(xs)}


def summarise(runs: list[dict], reports: list[dict]) -> dict:
    """robust.json's content from each run's report.json (with the overshoot check appended to world_checks)."""
    out: dict = {"runs": runs, "cpu": cpu_info()}
    for key, title in (("claims", "claim"), ("world_checks", "check")):
        rows: dict[str, dict] = {}
        for i, rep in enumerate(reports):
            for c in rep.get(key, []):
                row = rows.setdefault(c[title], {title: c[title], "values": [None] * len(reports),
                                                 "per_run": [None] * len(reports)})
                row["values"][i], row["per_run"][i] = number(c.get("value")), bool(c["holds"])
        for row in rows.values():
            row["holds"] = sum(x is True for x in row["per_run"])
            row["runs"] = sum(x is not None for x in row["per_run"])
            row.update(stats(row["values"]))
        out[key] = list(rows.values())
    out["stages"] = {}
    for rep in reports:
        for stage, metrics in rep.get("stages", {}).items():
            for m in metrics:
                out["stages"].setdefault(stage, {}).setdefault(m, None)
    for stage, metrics in out["stages"].items():
        for m in metrics:
            values = [number(rep.get("stages", {}).get(stage, {}).get(m)) for rep in reports]
            if any(v is not None for v in values):
                metrics[m] = {"values": values, **stats(values)}
        out["stages"][stage] = {m: v for m, v in metrics.items() if v is not None}
    return out


def show(summary: dict) -> None:
    n = len(summary["runs"])
    console.rule(f"[bold]{n} runs: seeds × float paths")
    for key, title in (("claims", "claim"), ("world_checks", "check")):
        for r in summary[key]:
            colour = "green" if r["holds"] == r["runs"] else "red"
            spread = (f"{r['mean']:.3f} ± {r['sd']:.3f} [{r['min']:.3f}, {r['max']:.3f}]" if r["mean"] is not None
                      else "not measured")
            console.print(f"[{colour}]holds on {r['holds']} of {r['runs']} runs[/] {spread}  {r[title]}")


def run_grid(cfg, out: str | Path, seeds: int, float_paths: list[str], threads: int | None,
             rerun_changed: bool = False, jobs: int = 1) -> dict:
    """The pipeline for seeds cfg.seed … cfg.seed + seeds − 1 under each float path, `jobs` runs at a time (each
    run's output in OUT/<float path>/seed-<k>.log when jobs > 1), in OUT/<float path>/seed-<k>/; returns and writes
    OUT/robust.json."""
    from .config import dump_config
    from .pipeline import FINGERPRINTS, preflight

    out = Path(out)
    for name in float_paths:
        parse_float_path(name)
    if len(set(float_paths)) != len(float_paths):
        raise ValueError(f"--float-paths {','.join(float_paths)}: a float path is named twice")
    if (out / FINGERPRINTS).is_file():
        raise ValueError(f"--out {out} holds a one-run pipeline; --float-paths writes OUT/<float path>/seed-<k>/: "
                         f"choose a new --out")
    n_threads = grid_threads(float_paths, threads, jobs)
    grid = [(seed, name) for name in float_paths for seed in range(cfg.seed, cfg.seed + seeds)]
    configs = {seed: dataclasses.replace(cfg, seed=seed) for seed in range(cfg.seed, cfg.seed + seeds)}
    for seed, name in grid:  # every run's plan is checked before the first one starts
        preflight(configs[seed], out / run_dir_name(name, seed))
    out.mkdir(parents=True, exist_ok=True)
    for seed, c in configs.items():
        (out / f"config-seed-{seed}.yaml").write_text(dump_config(c, settable_only=True))
    def start(seed: int, name: str):
        run_dir, t = out / run_dir_name(name, seed), n_threads[name]
        cmd = float_path_command(run_dir, out / f"config-seed-{seed}.yaml", name, t, rerun_changed=rerun_changed)
        if jobs == 1:
            console.rule(f"[bold]seed {seed}, float path {name} ({t} threads)")
            return subprocess.Popen(cmd, env=float_path_env(name, t)), None
        log = run_dir.parent / f"seed-{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"seed {seed}, float path {name} ({t} threads): started, output in {log}")
        f = open(log, "w")
        return subprocess.Popen(cmd, env=float_path_env(name, t), stdout=f, stderr=subprocess.STDOUT), f

    running, seconds, failed = {}, {}, []  # (seed, name) → (process, log file, start time)
    todo = list(grid)
    while todo or running:
        while todo and len(running) < jobs and not failed:
            key = todo.pop(0)
            running[key] = (*start(*key), time.time())
        time.sleep(0.2 if jobs > 1 else 0)
        for key, (proc, f, t0) in list(running.items()):
            if proc.poll() is None and jobs > 1:
                continue
            rc = proc.wait()
            if f is not None:
                f.close()
            seconds[key] = time.time() - t0
            del running[key]
            if rc != 0:
                failed.append((key, rc))
        if failed and not running:
            (seed, name), rc = failed[0]
            raise RunFailed(f"the pipeline run in {out / run_dir_name(name, seed)} (seed {seed}, float path {name}) "
                            f"stopped with exit code {rc} (its output is " + ("above" if jobs == 1 else
                            f"in {out / run_dir_name(name, seed)}.log") + "); the same command continues, reusing "
                            "finished stages", rc)
    runs, reports = [], []
    for seed, name in grid:
        run_dir = out / run_dir_name(name, seed)
        report = json.loads((run_dir / "report.json").read_text())
        machine = json.loads((run_dir / "machine.json").read_text())
        check = overshoot_check(run_dir)
        if check is not None:
            report["world_checks"] = report.get("world_checks", []) + [check]
        runs.append({"seed": seed, "float_path": name, "dir": str(run_dir.relative_to(out)),
                     "torch_capability": machine["torch_capability"], "threads": machine["threads"],
                     "seconds": seconds[(seed, name)], **({"gold_eighths": check["eighths"]} if check else {})})
        reports.append(report)
    summary = summarise(runs, reports)
    write_json(out / "robust.json", summary)
    show(summary)
    console.print(f"[bold green]summary over {len(runs)} runs:[/] {out / 'robust.json'}")
    return summary
