"""Small shared helpers: atomic file output, seeding, metrics logging, devices, memory."""
from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # messages stay one greppable line


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write text to a temp file beside `path`, fsync it, then rename it over `path`.

    overwrite=False links it to `path` instead, which fails with FileExistsError if `path` exists, even if another
    process creates it meanwhile. The file gets the mode the umask gives any new file (mkstemp would force 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_tree(path: Path) -> None:
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = True):
    """Yield a temp directory beside `out`; on success it replaces `out` whole, on error it is removed.

    A reader therefore sees either the previous complete directory or the new complete one, never a half.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists")
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adam(params, decoupled_weight_decay: bool = False, **kw) -> torch.optim.Optimizer:
    """Adam (AdamW with decoupled_weight_decay), fused into one kernel per step where torch has that kernel for
    these tensors (CPU and CUDA): the unfused loop runs ~8 small ops per parameter tensor (2-3 % of PPO's training
    phase at benchmark protocol P, README). `params`: tensors or param-group dicts, as for torch.optim."""
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fusable = bool(tensors) and len({p.device for p in tensors}) == 1 \
        and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and type(p.data) is torch.Tensor for p in tensors)
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    if fusable:
        try:
            return cls(params, fused=True, **kw)
        except RuntimeError:  # torch < 2.4 has no fused kernel for CPU tensors
            pass
    return cls(params, **kw)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per step, flushed as it is written.

    The lines are also kept in memory so a checkpoint can carry them (a resumed run rewrites them first).
    """

    def __init__(self, path: str | os.PathLike | None, previous: list[str] | None = None):
        self.f = open(path, "a", encoding="utf-8") if path is not None else None
        self.lines: list[str] = []
        for line in previous or []:
            self._write(line)

    def _write(self, line: str) -> None:
        self.lines.append(line)
        if self.f is not None:
            self.f.write(line + "\n")
            self.f.flush()

    def log(self, record: dict) -> None:
        self._write(json.dumps(record))

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and waited-for children) in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Checkpoints live beside the output directory, which only appears, complete, at the end of a run."""
    out = Path(out)
    return out.with_name(out.name + "-checkpoints")
