"""Every script that makes a README number runs in CI: each benchmarks/*.py with a command line (an
`if __name__ == "__main__":`) is run with --smoke, so a change that breaks a benchmark fails here, and a new
benchmark without a smoke mode fails too. Float paths (instructrl.machine) and the seeds × float paths grid
(instructrl.robust) are tested beside them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text())
SMOKE = ROOT / "configs" / "smoke.yaml"


def env(**extra) -> dict:
    """The child's environment: this tree's src first, one thread (the machine is shared; no oversubscription)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def test_every_benchmark_is_found():
    assert {"ppo_bench.py", "compare_trl.py", "trl_ppo_bench.py", "same_weights.py", "memory_table.py",
            "lora_memory.py", "label_load.py", "gpu_check.py", "rm_grouping.py", "float_paths.py",
            "claim3.py", "algorithms.py", "task_skills.py"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], capture_output=True, text=True,
                       timeout=900, env=env(), cwd=ROOT)
    assert p.returncode == 0, f"{script} --smoke failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    if script == "memory_table.py":  # arithmetic on parameter counts: no CPU to name
        assert "total GiB" in p.stdout
    elif script == "trl_ppo_bench.py" and "TRL is not installed" in p.stdout:
        assert "smoke skipped" in p.stdout
    else:  # every measured figure has the CPU it ran on beside it
        assert "CPU: " in p.stdout and "AVX-512 " in p.stdout and "dispatch " in p.stdout, p.stdout[-2000:]
    if script == "float_paths.py":  # the perturbation is real: `default` dispatch ends at other weights than native
        result = json.loads(p.stdout.split("RESULT ", 1)[1])  # (every x86-64 CPU torch supports is above `default`)
        assert result["max_abs_diff"]["native-again"] == 0 and 0 < result["max_abs_diff"]["default"] < 1e-3


def test_parse_float_path():
    from instructrl.machine import float_path_env, parse_float_path

    assert parse_float_path("native") == ("native", None)
    assert parse_float_path("default:t1") == ("default", 1)
    for bad in ("sse", "avx2:t0", "avx2:x1", f"avx2:t{(os.cpu_count() or 1) + 1}"):
        with pytest.raises(ValueError, match="--float-path"):
            parse_float_path(bad)
    from instructrl.machine import has_avx512

    if not has_avx512():  # torch does not check: it would die on an illegal instruction
        with pytest.raises(ValueError, match="lacks AVX512"):
            parse_float_path("avx512")
    e = float_path_env("default:t1", threads=2)
    assert e["ATEN_CPU_CAPABILITY"] == "default" and e["OMP_NUM_THREADS"] == "1" and e["INSTRUCTRL_FLOAT_PATH"] == "default:t1"
    assert "ATEN_CPU_CAPABILITY" not in float_path_env("native", threads=1)


def test_float_path_sets_torch_dispatch():
    """The variable takes effect when set before torch loads (a child process), as the pipeline's re-execution does."""
    from instructrl.machine import float_path_env

    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=float_path_env("default:t1", 1), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["DEFAULT", "1"]


def test_robust_summary_counts_runs():
    """robust.json's arithmetic on two hand-made reports: values, holds k of n, mean ± sd, min, max."""
    from instructrl.robust import summarise

    def report(acc, holds):
        return {"claims": [{"claim": "c", "holds": holds, "value": acc - 0.5},
                           {"claim": "nan", "holds": False, "value": float("nan") if acc < 1 else 2.0}],
                "world_checks": [{"check": "w", "holds": acc >= 0.85, "value": acc}],
                "stages": {"sft": {"toxicity_rate": acc / 10, "note": "text"}}}

    s = summarise([{"seed": 0}, {"seed": 1}, {"seed": 2}], [report(0.9, True), report(0.8, False), report(1.0, True)])
    w = s["world_checks"][0]
    assert w["values"] == [0.9, 0.8, 1.0] and w["per_run"] == [True, False, True]
    assert (w["holds"], w["runs"], w["min"], w["max"]) == (2, 3, 0.8, 1.0)
    assert w["mean"] == pytest.approx(0.9) and w["sd"] == pytest.approx(0.1)
    assert s["claims"][0]["holds"] == 2 and s["claims"][0]["mean"] == pytest.approx(0.4)
    assert s["claims"][1]["values"] == [None, None, 2.0] and s["claims"][1]["mean"] == 2.0  # NaN: no number
    json.loads(json.dumps(s, allow_nan=False))  # strict JSON
    assert s["stages"]["sft"]["toxicity_rate"]["values"] == pytest.approx([0.09, 0.08, 0.1])
    assert "note" not in s["stages"]["sft"] and s["cpu"]["cores"] >= 1


def test_eighths_and_overshoot(tmp_path):
    from instructrl.robust import eighths, eighths_of, overshoot_check

    (tmp_path / "ppo_ptx").mkdir()
    gold = [0.0] * 4 + [1.0] * 8 + [0.5] * 4  # 16 batches: eighths 0, 0, 1, 1, 1, 1, 0.5, 0.5
    (tmp_path / "ppo_ptx" / "metrics.jsonl").write_text("".join(json.dumps({"objective/gold": g}) + "\n" for g in gold))
    assert eighths(tmp_path / "ppo_ptx" / "metrics.jsonl") == [0, 0, 1, 1, 1, 1, 0.5, 0.5]
    c = overshoot_check(tmp_path)
    assert c["value"] == -0.5 and not c["holds"]
    # fewer values than eighths (a smoke run): eighth i is value i·n/8; 12 values: slices cut at round(1.5 i)
    assert eighths_of([1.0, 3.0]) == [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0] and eighths_of([]) == []
    assert eighths_of([float(i) for i in range(12)]) == [0.5, 2.0, 3.0, 4.5, 6.5, 8.0, 9.0, 10.5]


def test_bad_float_path_is_refused_before_anything_runs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "instructrl.cli", "pipeline", "--out", str(tmp_path / "o"),
                        "--float-paths", "native,sse"], capture_output=True, text=True, env=env())
    assert p.returncode == 2 and "--float-path 'sse'" in p.stdout + p.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_seeds_by_float_paths_grid(tmp_path):
    """pipeline --seeds 2 --float-paths native,default:t1 on the smoke config: four runs, two at a time where there are
    two cores (1 thread each), each in its own process under its float path, and robust.json with every claim and
    check over the four."""
    out, jobs = tmp_path / "grid", min(2, os.cpu_count() or 1)
    p = subprocess.run([sys.executable, "-m", "instructrl.cli", "pipeline", "--config", str(SMOKE), "--out", str(out),
                        "--seeds", "2", "--float-paths", "native,default:t1", "--threads", "1", "--jobs", str(jobs)],
                       capture_output=True, text=True, env=env(), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / "robust.json").read_text())
    assert [(r["seed"], r["float_path"]) for r in s["runs"]] == [(0, "native"), (1, "native"), (0, "default:t1"),
                                                                 (1, "default:t1")]
    assert [r["torch_capability"] for r in s["runs"]][2:] == ["DEFAULT", "DEFAULT"]
    assert s["runs"][0]["torch_capability"] != "DEFAULT" and all(r["threads"] == 1 for r in s["runs"])
    assert any(c["check"].startswith("Spearman(reward model, judge)") for c in s["world_checks"])
    for row in s["claims"] + s["world_checks"]:
        assert row["runs"] == 4 and len(row["values"]) == 4 and 0 <= row["holds"] <= 4
        assert row["mean"] is None or row["min"] <= row["mean"] <= row["max"]
    for r in s["runs"]:
        assert (out / r["dir"] / "report.json").is_file()
    assert "of 4 runs" in p.stdout + p.stderr  # the console (stderr) shows "holds on k of 4 runs" per check
    if jobs == 2:  # each run's own output went to its log
        assert (out / "native" / "seed-0.log").is_file() and "report" in (out / "native" / "seed-0.log").read_text()


def test_grid_never_oversubscribes_the_cores():
    from instructrl.robust import grid_threads

    cores = os.cpu_count() or 1
    assert grid_threads(["native"], None, 1) == {"native": cores}
    assert grid_threads(["native", "default:t1"], None, cores) == {"native": 1, "default:t1": 1}
    with pytest.raises(ValueError, match="--jobs"):
        grid_threads(["native"], None, cores + 1)
    if cores >= 2:
        with pytest.raises(ValueError, match=f"--jobs 2 × {cores} threads"):
            grid_threads(["native"], cores, 2)
