"""Small shared helpers: atomic file output, seeding, devices, memory, the paths beside an output."""
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

from rich.console import Console

from .options import AUTOCAST

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


def umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new uniquely named directory in `parent`, with the mode the umask gives any new directory (mkdtemp forces
    0700, which other users of a shared filesystem, e.g. the other nodes' accounts, cannot read)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
    tmp.chmod(0o777 & ~umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = True):
    """Yield a temp directory beside `out`; on success it replaces `out` whole, on error it is removed.

    A reader therefore sees either the previous complete directory or the new complete one, never a half.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
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


def set_seed(seed: int) -> None:
    import numpy as np  # torch and numpy are imported where used: the label commands write files without them
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and waited-for children) in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def native_bf16(device) -> bool:
    """bfloat16 matrix products in hardware: a CUDA GPU that has them, or a CPU with AVX-512 BF16 (or AMX) under
    PyTorch's AVX-512 dispatch. A float path of `avx2` or `default` (ATEN_CPU_CAPABILITY) counts as a CPU without
    them, as it stands for one (machine.py)."""
    import torch

    from .machine import cpu_flags

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and bool({"avx512_bf16", "amx_bf16"} & cpu_flags()))


def resolve_autocast(name: str, device, dtype_name: str = "float32") -> str:
    """--autocast as it runs: "bf16" (forward passes in bfloat16 autocast, float32 weights and optimizer) or "off".
    "auto" is bf16 where the hardware has native bf16 products (`native_bf16`) and the weights are float32."""
    if name not in AUTOCAST:
        raise ValueError(f"--autocast {name!r}: choose one of {', '.join(AUTOCAST)}")
    if name == "bf16" and dtype_name != "float32":
        raise ValueError(f"--autocast bf16 runs float32 weights in bfloat16 autocast; with --dtype {dtype_name} the "
                         f"weights are already {dtype_name}: drop one of the two")
    if name == "auto":
        return "bf16" if dtype_name == "float32" and native_bf16(device) else "off"
    return name


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Checkpoints live beside the output directory, which only appears, complete, at the end of a run."""
    out = Path(out)
    return out.with_name(out.name + "-checkpoints")


def log_dir(out: str | os.PathLike) -> Path:
    """Metric sinks that are written live (TensorBoard) go beside the output directory too."""
    out = Path(out)
    return out.with_name(out.name + "-logs")
