"""Never lose a user's work: what a run may write over, one writer per output, and resume only of the same run.

- `check_output`: OUT may be absent, an empty directory, or a finished instructrl output of the same step (and
  that only with --overwrite). A file, a directory with anything else in it, or a directory that holds one of the
  run's inputs is refused: nothing the user made is ever replaced.
- `OutputLock`: an exclusive lock (`.OUT.lock` beside OUT, removed after) for as long as a run writes; a second
  run on the same OUT stops, before it writes anything, with a message.
- `fingerprint`: the run's options and inputs (file contents, directory listings), stored beside its checkpoints;
  `--resume` refuses checkpoints of a different run and names what differs.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

# Options that steer a run without changing what it learns: they may differ between a run and its resumption.
RUN_CONTROL = {"resume", "save_every", "keep_checkpoints", "progress", "log_with", "overwrite", "max_nonfinite", "out"}


def _summary_stage(d: Path) -> str | None:
    try:
        return json.loads((d / "summary.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(out: str | os.PathLike, stage: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse, with a one-line ValueError, any OUT whose replacement could destroy something the user made."""
    out = Path(out)
    if not str(out):
        raise ValueError("--out is required")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a directory")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {existing} (permission denied)")
    resolved = out.resolve()
    for src in inputs:
        p = Path(src).resolve()
        if p == resolved or resolved in p.parents:
            raise ValueError(f"--out {out} contains the input {src}; write the output elsewhere")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"--out {out} is an existing file; give a directory path that does not exist yet")
    if not any(out.iterdir()):
        return
    found = _summary_stage(out)
    if found is None:
        raise ValueError(f"--out {out} is a directory with other files in it (not an instructrl output); refusing "
                         f"to replace it: choose a new --out")
    if found != stage:
        raise ValueError(f"--out {out} holds a finished '{found}' output, not '{stage}'; choose a new --out")
    if not overwrite:
        raise ValueError(f"--out {out} holds a finished {stage} output; pass --overwrite to replace it")


class OutputLock:
    """An exclusive, non-blocking lock on OUT while a run writes it (released when the process ends, even killed)."""

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.path = out.with_name(f".{out.name}.lock")
        self.f = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise self._busy() from None
        return self

    def check_free(self) -> None:
        """Raise (as acquire would) if another process holds the lock now; creates nothing. A run checks this
        first, before it touches anything (e.g. --overwrite removing old checkpoints), then locks for real when it
        starts writing."""
        try:
            f = open(self.path)
        except FileNotFoundError:
            return
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy() from None

    def _busy(self) -> ValueError:
        return ValueError(f"another run is writing {self.path.with_name(self.path.name[1:-5])} "
                          f"(lock {self.path}); wait for it or choose another --out")

    def release(self) -> None:
        """Unlink while still holding the lock, then close: no lock file is left beside OUT. (A process that
        opened the file just before the unlink fails its non-blocking lock while we hold it.)"""
        if self.f is not None:
            self.path.unlink(missing_ok=True)
            self.f.close()
            self.f = None


def content_id(path: str) -> str | list | None:
    p = Path(path)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if p.is_dir():  # a model directory: its files and sizes (weights are large; a retrain changes their bytes)
        return sorted([str(q.relative_to(p)), q.stat().st_size, _small_hash(q)] for q in p.rglob("*") if q.is_file())
    return None


def _small_hash(p: Path) -> str:
    """sha256 of a file's first and last MiB (a weight file's change shows there without reading gigabytes)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        size = p.stat().st_size
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def fingerprint(options: dict, inputs: list[str]) -> dict:
    """What a checkpoint may be resumed with: the options that shape learning, and the inputs' contents."""
    return {"options": {k: v for k, v in options.items() if k not in RUN_CONTROL},
            "inputs": {src: content_id(src) for src in inputs}}


def differences(saved: dict, now: dict, name=lambda k: "--" + k.replace("_", "-")) -> list[str]:
    """What differs between two fingerprints, each option named by `name` (default: its CLI flag)."""
    out = [f"{name(k)} {saved['options'].get(k)!r} → {now['options'].get(k)!r}"
           for k in sorted(set(saved["options"]) | set(now["options"]))
           if saved["options"].get(k) != now["options"].get(k)]
    out += [f"input {k} changed" for k in sorted(set(saved["inputs"]) | set(now["inputs"]))
            if saved["inputs"].get(k) != now["inputs"].get(k)]
    return out
