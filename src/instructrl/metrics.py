"""Where a run's metrics go: `metrics.jsonl` always, TensorBoard, trackio, Weights & Biases and MLflow on request
(rank 0 only).

Every record carries the one x-axis key, `step`; metric names are namespaced alike in every trainer and in the
report (`train/loss`, `eval/loss`, `objective/score`, `objective/kl`, `policy/clipfrac`, `value/loss`,
`time/rollout`, …). On `--resume` the checkpoint's lines are written to the new metrics.jsonl first; the external
sinks keep what they already received and are not sent them again (TensorBoard purges the steps logged after the
checkpoint, so a crash between checkpoints leaves no duplicated steps). W&B and MLflow continue the same run (its id
and the last step sent are kept in OUT-logs/) and are sent only later steps: an exact resume computes the same values
for the steps the interrupted run had already sent, so skipping them loses nothing and duplicates nothing.

W&B honours its own environment (WANDB_MODE=offline, WANDB_PROJECT, WANDB_DIR; files go to OUT-logs/ otherwise);
MLflow its tracking URI (MLFLOW_TRACKING_URI) and MLFLOW_EXPERIMENT_NAME (default instructrl); in a file store
(`file:DIR`) metric names have '.' for '/'.

A record may carry tables (name → rows, e.g. RL's `eval/samples`: held-out prompts and their completions): they
go into the record's line of metrics.jsonl (so checkpoints and resume treat them as the scalars), to TensorBoard as
a markdown text, to trackio and W&B as a Table and to MLflow as a table artifact (`NAME.json`, one row per
completion with its step), each sent with the record's scalars or not at all.
"""
from __future__ import annotations

import importlib.util

import json
import math
import os
import time
from pathlib import Path

STEP = "step"
SINKS = ("tensorboard", "trackio", "wandb", "mlflow")


def parse_sinks(spec: str) -> list[str]:
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    for n in names:
        if n not in SINKS:
            raise ValueError(f"--log-with: unknown sink {n!r}; choose from {', '.join(SINKS)} (comma-separated)")
    return names


def check_sinks(spec: str) -> None:
    """Fail before training when a requested sink's package is missing."""
    for name in parse_sinks(spec):
        try:
            __import__(name)  # each sink's module has the sink's name
        except ImportError:
            raise ValueError(f"--log-with {name} needs the {name} package: pip install 'instructrl[{name}]'") \
                from None


def check_tables(spec: str) -> None:
    """Fail before training when a sink that is to receive tables cannot: trackio's and MLflow's need pandas."""
    for name in {"trackio", "mlflow"} & set(parse_sinks(spec)):
        if importlib.util.find_spec("pandas") is None:
            raise ValueError(f"tables in --log-with {name} need the pandas package: pip install pandas")


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
        self.tb = self.trackio = self.wandb = self.mlflow = None
        names = parse_sinks(sinks) if jsonl is not None else []  # rank 0 only (the others have no output)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: steps ≥ start logged by an interrupted run are hidden, so a resume duplicates none
            self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard"), purge_step=start + 1 if start else 0)
        if "trackio" in names:
            import trackio

            trackio.init(project="instructrl", name=run_name, config=config or {}, resume="allow")
            self.trackio = trackio
        if "wandb" in names:
            self.wandb = WandbSink(Path(log_dir), run_name, config or {}, start)
        if "mlflow" in names:
            self.mlflow = MlflowSink(Path(log_dir), run_name, config or {}, start)

    def _write(self, line: str) -> None:
        self.lines.append(line)
        if self.f is not None:
            self.f.write(line + "\n")
            self.f.flush()

    def log(self, record: dict, tables: dict[str, list[dict]] | None = None) -> None:
        """One record; `tables`: name → rows (dicts with the same keys), logged at the record's step."""
        tables = tables or {}
        self._write(json.dumps({**record, **tables}))
        values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
        step = record[STEP]
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            for k, rows in tables.items():
                self.tb.add_text(k, markdown_table(rows), step)
        if self.trackio is not None:
            self.trackio.log({**values, **{k: self._trackio_table(rows) for k, rows in tables.items()}}, step=step)
        for sink in (self.wandb, self.mlflow):
            if sink is not None:
                sink.log(values, step, tables)

    def _trackio_table(self, rows: list[dict]):
        import pandas

        return self.trackio.Table(dataframe=pandas.DataFrame(rows))

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
        for sink in (self.wandb, self.mlflow):
            if sink is not None:
                sink.close()


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard's text tab renders it); '|' and line breaks in a cell escaped."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])


class ExternalRun:
    """A W&B or MLflow run that a resume continues: its id and the last step it was sent live in
    LOG_DIR/<sink>_run.json (rewritten after each record). A fresh run (start = 0) starts a new one; a resumed run
    continues the saved one and sends only later steps, so none is sent twice."""

    sink = ""

    def __init__(self, log_dir: Path, name: str, config: dict, start: int):
        self.path = log_dir / f"{self.sink}_run.json"
        saved = json.loads(self.path.read_text()) if start and self.path.is_file() else None
        self.id = self.open(name, config, saved["id"] if saved else None)
        self.last = saved["step"] if saved else -1
        log_dir.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self.id, "step": self.last}))
        os.replace(tmp, self.path)

    def log(self, values: dict, step: int, tables: dict[str, list[dict]] | None = None) -> None:
        if step > self.last:
            self.send(values, step)
            for name, rows in (tables or {}).items():
                self.table(name, rows, step)
            self.last = step
            self._save()


class WandbSink(ExternalRun):
    sink = "wandb"

    def open(self, name: str, config: dict, rid: str | None) -> str:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "instructrl"), name=name, config=config,
                              dir=os.environ.get("WANDB_DIR", str(self.path.parent)), id=rid,
                              resume="allow" if rid else None)
        return self.run.id

    def send(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        import wandb

        cols = list(rows[0]) if rows else []
        self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink(ExternalRun):
    """Through MLflow's client: no global active run is left behind."""

    sink = "mlflow"

    def open(self, name: str, config: dict, rid: str | None) -> str:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.uri import is_local_uri

        self.client = MlflowClient()
        # the file store keeps a metric as a file at its name's path: `objective/score` and `objective/score/rm`
        # cannot both exist there, so its names use '.' for '/'
        self.file_store = is_local_uri(mlflow.get_tracking_uri())
        if rid is not None:
            self.client.update_run(rid, status="RUNNING")
            return rid
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "instructrl")
        found = self.client.get_experiment_by_name(experiment)
        eid = found.experiment_id if found else self.client.create_experiment(experiment)
        rid = self.client.create_run(eid, run_name=name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config.items()]  # write-once; at most 100 per call
        for i in range(0, len(params), 100):
            self.client.log_batch(rid, params=params[i:i + 100])
        return rid

    def send(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k.replace("/", ".") if self.file_store else k, v, now, step)
                                                for k, v in values.items()])

    def table(self, name: str, rows: list[dict], step: int) -> None:
        """One table artifact per name, NAME.json, each call's rows appended with their step (MLflow's log_table
        appends; it needs pandas, which mlflow-skinny does not install)."""
        cols = ["step", *(rows[0] if rows else [])]
        self.client.log_table(self.id, data={c: [step if c == "step" else r.get(c) for r in rows] for c in cols},
                              artifact_file=f"{name}.json")

    def close(self) -> None:
        self.client.set_terminated(self.id)
