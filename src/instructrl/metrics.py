"""Where a run's metrics go: `metrics.jsonl` always, TensorBoard and trackio on request (rank 0 only).

Every record carries the one x-axis key, `step`; metric names are namespaced alike in every trainer and in the
report (`train/loss`, `eval/loss`, `objective/score`, `objective/kl`, `policy/clipfrac`, `value/loss`,
`time/rollout`, …). On `--resume` the checkpoint's lines are written to the new metrics.jsonl first; the external
sinks keep what they already received and are not sent them again (TensorBoard purges the steps logged after the
checkpoint, so a crash between checkpoints leaves no duplicated steps).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

STEP = "step"
SINKS = ("tensorboard", "trackio")


def parse_sinks(spec: str) -> list[str]:
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    for n in names:
        if n not in SINKS:
            raise ValueError(f"--log-with: unknown sink {n!r}; choose from {', '.join(SINKS)} (comma-separated)")
    return names


def check_sinks(spec: str) -> None:
    """Fail before training when a requested sink's package is missing."""
    for name in parse_sinks(spec):
        module = {"tensorboard": "tensorboard", "trackio": "trackio"}[name]
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"--log-with {name} needs the {module} package: pip install 'instructrl[{name}]'") \
                from None


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric metrics (the step itself excluded)."""
    return {k: float(v) for k, v in record.items()
            if k != STEP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricSinks:
    """Append-only metrics.jsonl (flushed per line, kept in memory for checkpoints) plus optional sinks."""

    def __init__(self, jsonl: str | os.PathLike | None, previous: list[str] | None = None, *, sinks: str = "",
                 log_dir: str | os.PathLike | None = None, run_name: str = "run", config: dict | None = None,
                 start: int = 0):
        self.f = open(jsonl, "a", encoding="utf-8") if jsonl is not None else None
        self.lines: list[str] = []
        for line in previous or []:
            self._write(line)
        self.tb = self.trackio = None
        names = parse_sinks(sinks) if jsonl is not None else []  # rank 0 only (the others have no output)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: steps ≥ start logged by an interrupted run are hidden, so a resume duplicates none
            self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard"), purge_step=start + 1 if start else 0)
        if "trackio" in names:
            import trackio

            trackio.init(project="instructrl", name=run_name, config=config or {}, resume="allow")
            self.trackio = trackio

    def _write(self, line: str) -> None:
        self.lines.append(line)
        if self.f is not None:
            self.f.write(line + "\n")
            self.f.flush()

    def log(self, record: dict) -> None:
        self._write(json.dumps(record))
        values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, record[STEP])
        if self.trackio is not None:
            self.trackio.log(values, step=record[STEP])

    def flush(self) -> None:
        """With a checkpoint: the external sinks hold at least what the checkpoint's lines hold."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.trackio is not None:
            self.trackio.finish()
