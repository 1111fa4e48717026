"""Do float paths change what is learned? The same short pretraining under each float path (torch's dispatch level,
thread count: `instructrl.machine`), each in a fresh process, and the largest weight difference from a native run.
A second native run must match the first bit for bit (else the run is not deterministic and nothing is measured).

    python benchmarks/float_paths.py                        # every level this CPU has, and native with 2 threads
    python benchmarks/float_paths.py --paths native,default --steps 20
    python benchmarks/float_paths.py --smoke                # native and default, tiny (CI)

Prints one line per float path and a RESULT json line {"max_abs_diff": {path: float}, "cpu": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from instructrl.machine import child_cpu_info, cpu_line, float_path_env, supported_levels  # noqa: E402

CHILD = """
import sys
from instructrl.pretrain import PretrainConfig, pretrain
world, out, steps, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pretrain(PretrainConfig(corpus=world + "/corpus.jsonl", out=out, vocab_size=400, n_layer=2, n_embd=width, n_head=2,
                        steps=steps, batch_size=16, progress=False))
"""
WORLD = """
import sys
from instructrl.world import WorldConfig, generate_world
generate_world(sys.argv[1], WorldConfig(seed=0, n_corpus=600, n_corpus_val=50, n_demos=20, n_prompts_train=20,
                                        n_prompts_eval=10))
"""


def child_env(path: str) -> dict:
    env = float_path_env(path, 1)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return env


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 1
    default_paths = [lv for lv in supported_levels() if lv != "native"] + (["native:t2"] if cores >= 2 else [])
    ap.add_argument("--paths", default=",".join(default_paths), help="float paths compared with native (1 thread)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="native and default, 5 steps, width 32 (CI)")
    a = ap.parse_args()
    if a.smoke:
        a.paths, a.steps, a.width = "default", 5, 32
    print(cpu_line(child_cpu_info(1)), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        subprocess.run([sys.executable, "-c", WORLD, str(d / "world")], env=child_env("native"), check=True)
        diffs = {}
        for path in ["native", "native-again", *a.paths.split(",")]:
            name = "native" if path == "native-again" else path
            subprocess.run([sys.executable, "-c", CHILD, str(d / "world"), str(d / path), str(a.steps), str(a.width)],
                           env=child_env(name), check=True, capture_output=True)
            if path != "native":
                diffs[path] = max_abs_diff(d / "native", d / path)
                print(f"{path:<14} max |w − w_native| after {a.steps} pretraining steps: {diffs[path]:.3g}", flush=True)
    print("RESULT " + json.dumps({"steps": a.steps, "width": a.width, "max_abs_diff": diffs,
                                  "cpu": child_cpu_info(1)}))
    if diffs["native-again"] != 0:
        print("a second native run differs: training is not deterministic here, so nothing above is measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
