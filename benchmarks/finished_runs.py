"""What the benchmarks that measure finished pipeline runs share (claim3.py, algorithms.py, rm_grouping.py,
task_skills.py): the tiny pipeline their --smoke mode runs in CI, and one output name per run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke_run(out: str, threads: int) -> None:
    """A configs/smoke.yaml pipeline in `out`: every stage in seconds, numbers that mean nothing."""
    subprocess.run([sys.executable, "-m", "instructrl.cli", "pipeline", "--config", str(ROOT / "configs" / "smoke.yaml"),
                    "--out", out, "--threads", str(threads)], check=True, capture_output=True)


def run_or_smoke(parser, a, tmp: str) -> Path:
    """--run, or with --smoke a tiny pipeline made in `tmp` (a scratch directory); neither is a usage error."""
    if a.smoke:
        a.run = f"{tmp}/run"
        smoke_run(a.run, a.threads)
    elif not a.run:
        parser.error("--run is required (or --smoke)")
    return Path(a.run)


def run_names(runs: list[Path]) -> list[str]:
    """Each run's directory name, with its parent's where two share one (native/seed-0, default-t1/seed-0)."""
    return [r.name if len({x.name for x in runs}) == len(runs) else f"{r.parent.name}-{r.name}" for r in runs]
