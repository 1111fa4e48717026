"""The CPU a number was measured on, and float paths: ways to make one CPU round floats the way another does.

Another CPU sends training down another path because its kernels sum in another order (AVX-512 against AVX2
vectors, another thread split of a reduction). Two levers reproduce that on one machine:
  - PyTorch's kernel dispatch level, `ATEN_CPU_CAPABILITY=default|avx2|avx512` (read once, when torch loads);
  - the thread count (a reduction split over other thread counts sums in another order).
Checked on an AMD EPYC without AVX-512 (dispatch AVX2): a 20-step pretraining of a 2-layer GPT (README "Float
paths") changed the weights by up to 2.0e-6 with `default` and 1.7e-6 with 2 threads instead of 1; `avx2` left
them bit-identical there (it is that CPU's native level; on an AVX-512 CPU it is the lever).

This module imports no torch at load time: a float path must be set before torch is imported.
"""
from __future__ import annotations

import os
import platform
import re

ENV = "INSTRUCTRL_FLOAT_PATH"  # set in a process that runs under a float path (so it does not re-execute itself)
LEVELS = ("native", "default", "avx2", "avx512")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_avx512() -> bool:
    return "avx512f" in cpu_flags()


# what torch's dispatch level needs (aten/src/ATen/native/DispatchStub.cpp via cpuinfo): a level the CPU lacks is
# not refused by torch, it dies on an illegal instruction (checked: avx512 on an AMD EPYC without AVX-512, SIGILL)
NEEDS = {"default": set(), "native": set(), "avx2": {"avx2", "fma"},
         "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}}


def supported_levels() -> list[str]:
    flags = cpu_flags()
    return [level for level in LEVELS if NEEDS[level] <= flags]


def cpu_info() -> dict:
    """The CPU, its vector extensions and torch's dispatch level and thread count in this process."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "avx512": has_avx512(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "float_path": os.environ.get(ENV, "native")}


def cpu_line(info: dict | None = None) -> str:
    """One line for beside a benchmark's figures."""
    i = info or cpu_info()
    return (f"CPU: {i['cpu']} ({i['cores']} cores, AVX-512 {'yes' if i['avx512'] else 'no'}); torch {i['torch']} "
            f"dispatch {i['torch_capability']}, {i['threads']} threads, float path {i['float_path']}")


def parse_float_path(name: str) -> tuple[str, int | None]:
    """`LEVEL` or `LEVEL:tN` (N torch threads) → (level, threads or None); ValueError naming the option."""
    m = re.fullmatch(r"([a-z0-9]+)(?::t(\d+))?", name)
    if not m or m.group(1) not in LEVELS:
        raise ValueError(f"--float-path {name!r}: expected LEVEL or LEVEL:tN with LEVEL one of {', '.join(LEVELS)} "
                         f"and N a thread count, e.g. default:t1")
    if m.group(1) not in supported_levels():
        raise ValueError(f"--float-path {name!r}: this CPU ({cpu_model()}) lacks {m.group(1).upper()} (torch would "
                         f"stop on an illegal instruction); its levels: {', '.join(supported_levels())}")
    threads = int(m.group(2)) if m.group(2) else None
    if threads is not None and not 1 <= threads <= (os.cpu_count() or 1):
        raise ValueError(f"--float-path {name!r}: {threads} threads on {os.cpu_count()} cores (never more threads "
                         f"than cores: oversubscribed threads wait for each other)")
    return m.group(1), threads


def float_path_env(name: str, threads: int) -> dict[str, str]:
    """The environment of a child process that runs under float path `name` with `threads` torch threads."""
    level, t = parse_float_path(name)
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if level != "native":
        env["ATEN_CPU_CAPABILITY"] = level
    t = t or threads
    env.update({ENV: name, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)})
    return env


def float_path_threads(name: str, threads: int | None) -> int:
    """The thread count a float path runs with: its own :tN, else `threads`, else every core."""
    return parse_float_path(name)[1] or threads or os.cpu_count() or 1


def child_cpu_info(threads: int, python: str | None = None) -> dict:
    """cpu_info as a child process with `threads` threads sees it (for scripts that import no torch themselves)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import json; from instructrl.machine import cpu_info; print(json.dumps(cpu_info()))"
    return json.loads(subprocess.run([python or sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)
