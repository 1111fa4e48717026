"""benchmarks/gpu_check.py in its --tiny --device cpu mode, so the GPU check cannot rot: SFT → RM → PPO with LoRA,
activation checkpointing and gradient accumulation on a tiny Qwen2-style model, and its report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout[p.stdout.index("{"):])
    assert report["lora_r"] == 16 and report["ppo_iterations"] == 2 and report["parameters"] > 0
    assert report["ppo_seconds_per_iteration"] > 0 and report["generation_tokens_per_s"] > 0
    assert report["peak_cuda_memory_gib"] is None and report["mfu"] is None  # no CUDA device, no known peak
    ppo = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
