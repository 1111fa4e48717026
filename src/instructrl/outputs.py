"""Never lose a user's work: what a run may write over, one writer per output, and resume only of the same run.

- `check_output`: OUT may be absent, an empty directory, or a finished instructrl output of the same step (and
  that only with --overwrite). A file, a directory with anything else in it, or a directory that holds one of the
  run's inputs is refused: nothing the user made is ever replaced.
- `OutputLock`: an exclusive lock (`.OUT.lock` beside OUT, removed after) for as long as a run writes; a second
  run on the same OUT stops, before it writes anything, with a message.
- `fingerprint`: the run's options and inputs (the content of every file, directories included), stored beside
  its checkpoints; `--resume` refuses checkpoints of a different run and names what differs.
- `check_file_output`: the same rules for a command that writes one file (eval, label simulate/export).
- `clean_temporaries`: what a killed writer left beside OUT, removed by the next one (under OUT's lock).
- `first_nonfinite`: the run shell's last guard: no weights with a NaN or inf become an output.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

# Options that steer a run without changing what it learns: they may differ between a run and its resumption.
RUN_CONTROL = {"resume", "save_every", "keep_checkpoints", "progress", "log_with", "overwrite", "max_nonfinite", "out"}


def inputs_of(cfg, learned_only: bool = False) -> list[str]:
    """The paths a step's config reads (its wired options but --out; each one of a repeatable option);
    `learned_only`: only those that shape what it learns (not e.g. RL's --eval-prompts)."""
    from .options import flat_fields

    values = [f.get(cfg) for f in flat_fields(type(cfg))
              if f.wired and f.path[0] != "run" and f.name != "out" and (f.learns or not learned_only)]
    values = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return [v for v in values if isinstance(v, str) and v]


def check_place(out: Path, inputs: list[str], flag: str) -> None:
    """OUT's parents are directories we may write in, and OUT is not an input nor inside one."""
    if not str(out):
        raise ValueError(f"{flag} is required")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {out}: {parent} is a file, not a directory")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: cannot write in {existing} (permission denied)")
    resolved = out.resolve()
    for src in inputs:
        if "://" in src:  # a reward server, not a path
            continue
        p = Path(src.split(":", 1)[1] if src.startswith("gold:") else src).resolve()
        if p == resolved or resolved in p.parents:
            raise ValueError(f"{flag} {out} contains the input {src}; write the output elsewhere")
        if p.is_dir() and p in resolved.parents:
            raise ValueError(f"{flag} {out} is inside the input {src}; write the output elsewhere")


def check_file_output(out: str | os.PathLike, inputs: list[str], flag: str = "--out") -> None:
    """A command that writes one file: it must not exist yet (nothing the user has is replaced) and must not be,
    or be inside, one of the inputs. Checked before any work; the file is then written with `atomic_write_text(...,
    overwrite=False)`, which also refuses a file that appeared meanwhile."""
    out = Path(out)
    check_place(out, inputs, flag)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a directory; give the path of a file that does not exist yet")
    if out.exists() or out.is_symlink():
        raise ValueError(f"{flag} {out} exists; refusing to replace it: choose a new path")


def _summary_stage(d: Path) -> str | None:
    try:
        return json.loads((d / "summary.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(out: str | os.PathLike, stage: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse, with a one-line ValueError, any OUT whose replacement could destroy something the user made."""
    out = Path(out)
    check_place(out, inputs, "--out")
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
    """A file's sha256; a directory's files, each with its size and sha256 (every byte read, in 1 MiB chunks)."""
    p = Path(path)
    if p.is_file():
        return _sha256(p)
    if p.is_dir():
        return sorted([str(q.relative_to(p)), q.stat().st_size, _sha256(q)] for q in p.rglob("*") if q.is_file())
    return None


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(options: dict, inputs: list[str]) -> dict:
    """What a checkpoint may be resumed with: the options that shape learning, and the inputs' contents."""
    return {"options": {k: v for k, v in options.items() if k not in RUN_CONTROL},
            "inputs": {src: content_id(src) for src in inputs}}


def clean_temporaries(out: str | os.PathLike) -> None:
    """Remove what a killed writer of OUT left: its temp files and directories beside OUT (`.OUT.<random>.tmp`)
    and in its checkpoint directory (`.step-<random>.tmp`). A previous OUT moved aside (`.OUT.old`) by a run killed
    between its two renames is put back when OUT is missing. Call it only while holding OUT's lock: then no other
    process is writing them."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    temp = re.compile(rf"\.{re.escape(out.name)}\.([A-Za-z0-9_]{{8}}|[0-9a-f]{{16}})\.tmp")
    ckpt = out.with_name(out.name + "-checkpoints")
    stale = [p for p in out.parent.iterdir() if temp.fullmatch(p.name)]
    if ckpt.is_dir():
        stale += [p for p in ckpt.iterdir() if re.fullmatch(r"\.step-[A-Za-z0-9_]{8}\.tmp", p.name)]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    old = out.with_name(f".{out.name}.old")
    if old.is_dir():
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)


def first_nonfinite(d: str | os.PathLike) -> str | None:
    """`FILE: TENSOR` of the first tensor with a NaN or inf among the safetensors files under `d` (read one tensor at
    a time), or None."""
    import torch
    from safetensors import safe_open

    for f in sorted(Path(d).rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"{f.relative_to(d)}: {key}"
    return None


def differences(saved: dict, now: dict, name=lambda k: "--" + k.replace("_", "-")) -> list[str]:
    """What differs between two fingerprints, each option named by `name` (default: its CLI flag)."""
    out = [f"{name(k)} {saved['options'].get(k)!r} → {now['options'].get(k)!r}"
           for k in sorted(set(saved["options"]) | set(now["options"]))
           if saved["options"].get(k) != now["options"].get(k)]
    out += [f"input {k} changed" for k in sorted(set(saved["inputs"]) | set(now["inputs"]))
            if saved["inputs"].get(k) != now["inputs"].get(k)]
    return out
