"""Do two versions of instructrl learn the same weights? Runs every trainer through the CLI with each version's
source tree and compares the saved tensors bit for bit (a refactor must not change what is learned).

    python benchmarks/same_weights.py --old /tmp/before/src --new src --work /tmp/same-weights

`--old` is usually an earlier commit's `src`, e.g. `mkdir -p /tmp/before && git archive <commit> src | tar -x -C
/tmp/before`. Each version runs its own chain (world → pretrain → SFT → rankings → RM → PPO, PPO-ptx, PG mean,
PG leave-one-out, PPO with LoRA; the world comes from the old version for both); a stage's inputs are that version's own outputs, so the first stage that differs
is the one that changed. Only flags that both versions accept are used. Exit code 1 when anything differs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file


THREADS = 2


def steps(w: Path, smoke: bool = False) -> list[tuple[str, list[str], list[str]]]:
    """(name, CLI arguments, weight files to compare) in pipeline order; paths under the version's work dir w.
    `smoke`: the world and pretraining, tiny (three CLI calls)."""
    world, lm, sft, rm = w / "world", w / "pretrained", w / "sft", w / "rm"
    if smoke:
        return [("world", ["world", "--out", str(world), "--seed", "0", "--n-demos", "40", "--n-corpus", "300",
                           "--n-corpus-val", "40", "--n-prompts-train", "20", "--n-prompts-eval", "8"], []),
                ("pretrain", ["pretrain", "--corpus", str(world / "corpus.jsonl"), "--out", str(lm), "--steps", "5",
                              "--vocab-size", "300", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                              "--batch-size", "8"], ["pretrained/model.safetensors"])]
    rl = ["--policy", str(sft), "--reward", str(rm), "--prompts", str(world / "prompts_train.jsonl"),
          "--judge", str(world), "--episodes", "64", "--batch-size", "16", "--max-new-tokens", "16", "--seed", "3"]
    ptx = ["--ptx-coef", "0.1", "--ptx-data", str(world / "corpus.jsonl")]
    return [
        ("world", ["world", "--out", str(world), "--seed", "0", "--n-demos", "120"], []),
        ("pretrain", ["pretrain", "--corpus", str(world / "corpus.jsonl"), "--out", str(lm), "--steps", "40",
                      "--vocab-size", "600", "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--batch-size",
                      "16"], ["pretrained/model.safetensors"]),
        ("sft", ["sft", "--model", str(lm), "--data", str(world / "demos.jsonl"), "--out", str(sft), "--epochs", "1",
                 "--lr", "1e-3", "--device", "cpu"], ["sft/model.safetensors"]),
        ("rankings", ["label", "simulate", "--policy", str(sft), "--prompts", str(world / "prompts_train.jsonl"),
                      "--out", str(w / "rankings.jsonl"), "--world", str(world), "--k", "4", "--limit", "48",
                      "--max-new-tokens", "16"], []),
        ("rm", ["rm", "--model", str(sft), "--data", str(w / "rankings.jsonl"), "--demos",
                str(world / "demos.jsonl"), "--out", str(rm), "--device", "cpu"], ["rm/model.safetensors"]),
        ("ppo", ["ppo", *rl, "--out", str(w / "ppo"), "--minibatch-size", "8", "--ppo-epochs", "2"],
         ["ppo/model.safetensors", "ppo/value_model/model.safetensors"]),
        ("ppo-ptx", ["ppo", *rl, *ptx, "--out", str(w / "ppo_ptx"), "--minibatch-size", "8", "--ppo-epochs", "2"],
         ["ppo_ptx/model.safetensors", "ppo_ptx/value_model/model.safetensors"]),
        ("ppo-lora", ["ppo", *rl, "--out", str(w / "ppo_lora"), "--minibatch-size", "8", "--ppo-epochs", "1",
                      "--lora-r", "4"], ["ppo_lora/model.safetensors", "ppo_lora/value_model/model.safetensors"]),
        ("pg-mean", ["pg", *rl, *ptx, "--out", str(w / "pg_mean"), "--baseline", "mean"], ["pg_mean/model.safetensors"]),
        ("pg-loo", ["pg", *rl, "--out", str(w / "pg_loo"), "--baseline", "loo", "--samples-per-prompt", "4"],
         ["pg_loo/model.safetensors"]),
    ]


def tensors(path: Path) -> dict:
    """A model file's tensors under the names of the plain backbone. A scalar-head directory (reward or value model)
    written since the transformers export (`AutoModelForSequenceClassification` layout) prefixes the backbone's
    names, adds `score.weight` (the head with the normalisation folded in) and may shift GPT-2's `ln_f.bias` by the
    offset; the trained tensors themselves are in `scalar_head.safetensors` beside it, so compare those."""
    t = load_file(str(path))
    head = path.with_name("scalar_head.safetensors")
    if "score.weight" not in t or not head.is_file():
        if head.is_file():
            t.update({f"head.{k}": v for k, v in load_file(str(head)).items()})
        return t
    prefix = next(k for k in t if k.endswith("ln_f.weight") or k.endswith("norm.weight")).split(".")[0] + "."
    out = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    for k, v in load_file(str(head)).items():
        if k.startswith("backbone."):
            out[k[len("backbone."):]] = v   # the original, unshifted backbone tensor
        else:
            out[f"head.{k}"] = v
    return out


def digest(path: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v.tobytes()).hexdigest()[:16] + str(v.dtype) for k, v in tensors(path).items()}


def run(src: str, work: Path, name: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(THREADS),
           "MKL_NUM_THREADS": str(THREADS)}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "instructrl.cli", *args], env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{name} failed with {src}:\n{p.stderr[-3000:]}")
    print(f"  {name:9s} {time.time() - t0:6.1f}s  ({src})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="source tree of the reference version (its src/)")
    ap.add_argument("--new", default="src", help="source tree of the version under test")
    ap.add_argument("--work", default="/tmp/same-weights", type=Path)
    ap.add_argument("--only", default="", help="comma-separated sides to (re)run: old,new (default both)")
    ap.add_argument("--smoke", action="store_true", help="this tree against itself: world → pretrain, tiny "
                                                         "(CI): must print `same` for every file")
    a = ap.parse_args()
    if a.smoke:
        import tempfile

        here = str(Path(__file__).resolve().parents[1] / "src")
        a.old, a.new, a.work = here, here, Path(tempfile.mkdtemp(prefix="same-weights-"))
    elif not a.old:
        ap.error("--old is required (or --smoke)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from instructrl.machine import child_cpu_info, cpu_line

    print(cpu_line(child_cpu_info(THREADS)), flush=True)
    sides = {"old": a.old, "new": a.new}
    rerun = set(a.only.split(",")) if a.only else set(sides)
    for side, src in sides.items():
        if side in rerun:
            w = a.work / side
            subprocess.run(["rm", "-rf", str(w)], check=True)
            w.mkdir(parents=True)
            for name, args, _ in steps(w, a.smoke):
                if name == "world" and side == "new" and (a.work / "old" / "world").is_dir():
                    shutil.copytree(a.work / "old" / "world", w / "world")  # input, not under test: made once
                    continue
                run(a.old if name == "world" else src, w, name, args)  # the world comes from the old version
    differ = 0
    for name, _, files in steps(Path(), a.smoke):
        for f in files:
            old, new = digest(a.work / "old" / f), digest(a.work / "new" / f)
            same = [k for k in old if new.get(k) == old[k]]
            ok = old.keys() == new.keys() and len(same) == len(old)
            differ += not ok
            print(f"{'same' if ok else 'DIFFERENT':9s} {f}: {len(same)}/{len(old)} tensors bitwise equal"
                  + ("" if old.keys() == new.keys() else f"; keys differ: {sorted(old.keys() ^ new.keys())[:4]}"))
    if a.smoke:
        subprocess.run(["rm", "-rf", str(a.work)], check=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
