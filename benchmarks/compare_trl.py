"""Ours vs TRL 1.12 PPOTrainer on protocol P / P-long, alternating A B A B ... in fresh subprocesses.

    .venv/bin/python benchmarks/ppo_bench.py setup
    .venv/bin/python benchmarks/compare_trl.py --protocol P --rounds 3
    .venv/bin/python benchmarks/compare_trl.py --protocol P-long --rounds 3
    .venv/bin/python benchmarks/compare_trl.py --protocol P --rounds 3 --arms ours,ours+fast,trl
    .venv/bin/python benchmarks/compare_trl.py --protocol P --arms ours:bf16,trl:bf16      # bf16 variants

Arms: `ours` (ppo_bench.py run), `ours@DIR` (the same with PPO_BENCH_SRC=DIR: a frozen copy of an older src/), `ours+P1+P2` (ppo_bench.py run --patch P1,P2, see ppo_patches.py),
`trl` (trl_ppo_bench.py in the TRL venv, --trl-python). A `:bf16` suffix runs ours with bf16 autocast (float32
weights) and TRL with bf16=True; `:bf16dtype` runs ours with the models loaded in bfloat16 (`--dtype bfloat16`);
`trl:bf16env` also sets ACCELERATE_MIXED_PRECISION=bf16 (without it TRL's PPOTrainer stays in float32 on CPU).
Each run: 1 warm-up iteration + --iters measured, the run's value is the median; an arm's value is the median
over rounds. Both wall time and process CPU time are reported: on this shared 2-core machine, with --threads 1
CPU time is the robust measure (it does not count time spent waiting for a core); with 2 threads it counts
OpenMP spin-waits, so read wall time there (and set OMP_WAIT_POLICY=PASSIVE when the machine is loaded). Prints seconds/iteration, iterations/s, per-phase times, peak RSS, load averages and the speedup
of every arm over the last (by default TRL).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_bench import _machine, cpu_line  # noqa: E402

child_cpu_info = _machine().child_cpu_info


def cmd_for(arm: str, a) -> list[str]:
    arm = arm.partition("@")[0]
    name, _, variant = arm.partition(":")
    common = ["--dir", a.dir, "--response", str(a.response), "--batch", str(a.batch), "--iters", str(a.iters),
              "--warmup", str(a.warmup), "--threads", str(a.threads)]
    if name == "trl":
        return [a.trl_python, str(HERE / "trl_ppo_bench.py"), *common, *{"": [], "bf16": ["--bf16"], "bf16env": ["--bf16-env"]}[variant]]
    if name.startswith("ours"):
        patch = name[5:].replace("+", ",") if name.startswith("ours+") else ""
        extra = {"": [], "bf16": ["--autocast"], "bf16dtype": ["--dtype", "bfloat16"]}[variant]
        return [sys.executable, str(HERE / "ppo_bench.py"), "run", *common, *extra,
                *(["--patch", patch] if patch else [])]
    raise SystemExit(f"unknown arm {arm}")


def run(cmd: list[str], src: str = "") -> dict:
    env = {**os.environ, **({"PPO_BENCH_SRC": src} if src else {})}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("PPO_BENCH_DIR", "/tmp/instructrl_ppo_bench"))
    ap.add_argument("--protocol", default="P", choices=["P", "P-long"])
    ap.add_argument("--response", type=int, default=None, help="overrides the protocol's response length")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--arms", default="ours,trl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "/tmp/trlvenv/bin/python"))
    ap.add_argument("--json", default=None, help="append every run's RESULT here (jsonl)")
    ap.add_argument("--smoke", action="store_true", help="one round of one iteration on a tiny setup (seconds; CI); "
                                                         "without TRL at --trl-python its arm is left out, saying so")
    a = ap.parse_args()
    if a.smoke:
        return smoke(a)
    compare(a)


def trl_available(python: str) -> bool:
    return Path(python).is_file() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def smoke(a) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, str(HERE / "ppo_bench.py"), "setup", "--tiny", "--dir", d], check=True,
                       capture_output=True)
        arms = "ours,trl"
        if not trl_available(a.trl_python):
            print(f"compare_trl --smoke: TRL is not installed at --trl-python {a.trl_python}: the trl arm is left out")
            arms = "ours"
        a = argparse.Namespace(**{**vars(a), "dir": d, "batch": 4, "response": 4, "iters": 1, "warmup": 0,
                                  "rounds": 1, "threads": 1, "arms": arms, "protocol": "P"})
        compare(a)


def compare(a) -> None:
    a.response = a.response or {"P": 32, "P-long": 96}[a.protocol]
    arms = a.arms.split(",")
    print(cpu_line(child_cpu_info(a.threads)))   # the CPU as a measured arm sees it (this process imports no torch)
    res: dict[str, list[dict]] = {arm: [] for arm in arms}
    print(f"protocol {a.protocol}: B={a.batch} P=16 R={a.response}, threads {a.threads}, {a.rounds} rounds x "
          f"({a.warmup} warm-up + {a.iters} iterations), arms {arms}, start loadavg "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for rnd in range(a.rounds):
        order = arms if rnd % 2 == 0 else arms[::-1]        # A B, B A, A B ... (balances drift in the load)
        for arm in order:
            t0 = time.time()
            r = run(cmd_for(arm, a), arm.partition("@")[2])
            r["arm"], r["round"] = arm, rnd
            res[arm].append(r)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"protocol": a.protocol, **r}) + "\n")
            m = r["median"]
            print(f"  round {rnd} {arm:<28} wall {m['total']:6.2f} s/iter (gen {m['generation']:.2f} score "
                  f"{m['scoring']:.2f} train {m['training']:.2f}) cpu {m['cpu_total']:6.2f} (gen "
                  f"{m['cpu_generation']:.2f} score {m['cpu_scoring']:.2f} train {m['cpu_training']:.2f}) "
                  f"all wall {r['all_total']} cpu {r['all_cpu']} rss {r['peak_rss_mb']:.0f} MB "
                  f"load {r['loadavg_start']}->{r['loadavg_end']} ({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for kind, pre in (("wall", ""), ("cpu", "cpu_")):
        print(f"\n[{kind} time] {'arm':<28} {'s/iter':>7} {'it/s':>7} {'gen':>6} {'score':>6} {'train':>6} "
              f"{'rss MB':>7}  runs (s/iter)")
        for arm in arms:
            rs = res[arm]
            med = {k: statistics.median(r["median"][pre + k] for r in rs)
                   for k in ("total", "generation", "scoring", "training")}
            summary[kind, arm] = med["total"]
            print(f"[{kind} time] {arm:<28} {med['total']:7.2f} {1 / med['total']:7.3f} {med['generation']:6.2f} "
                  f"{med['scoring']:6.2f} {med['training']:6.2f} {max(r['peak_rss_mb'] for r in rs):7.0f}  "
                  f"{[round(r['median'][pre + 'total'], 2) for r in rs]}")
        base = arms[-1]
        for arm in arms[:-1]:
            pairs = [b["median"][pre + "total"] / o["median"][pre + "total"] for o, b in zip(res[arm], res[base])]
            print(f"[{kind} time] speedup {arm} over {base}: {summary[kind, base] / summary[kind, arm]:.2f}x "
                  f"(median of medians); per round {[round(x, 2) for x in pairs]}")


if __name__ == "__main__":
    main()
