"""A short version of benchmarks/label_load.py: concurrent labelers and one sending oversized bodies, a kill -9
mid-load, nothing acknowledged lost."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "label_load.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("label_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_acknowledged_ranking_survives_kill_9(tmp_path):
    report = load_benchmark().run(labelers=4, duration=5, kills=1, tasks=2000, workdir=str(tmp_path), flood_mb=5)
    assert report["acknowledged"] > 20, report
    assert report["transport_errors"] > 0, "the kill happened while labelers were submitting"
    for key in ("lost", "duplicated", "acked_twice", "mismatched", "over_cap"):
        assert report[key] == 0, (key, report)
    assert report["integrity_check"] == "ok"
    assert report["exported"] == report["acknowledged"] + report["unacknowledged"]
    assert report["flood_answers"].get("413", 0) > 0, report["flood_answers"]
    assert report["ok"]
