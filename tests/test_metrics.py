"""Metric sinks: TensorBoard receives exactly what metrics.jsonl holds — same scalars, same steps — also after a
crash and --resume (no step twice); trackio gets the same records, and nothing replayed."""
import json
import sys
import types

import pytest

from instructrl.metrics import MetricSinks, parse_sinks


def jsonl_scalars(path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((rec["step"], float(v)))
    return out


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same(jsonl: dict, tb: dict):
    assert set(jsonl) == set(tb)
    for tag in jsonl:
        assert [s for s, _ in tb[tag]] == [s for s, _ in jsonl[tag]], tag  # same steps, none twice
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in jsonl[tag]], rel=1e-6), tag


def test_tensorboard_matches_jsonl_after_a_crash_and_resume(world_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from instructrl import run as run_module
    from instructrl.pretrain import PretrainConfig, pretrain

    cfg = dict(corpus=str(world_dir / "corpus.jsonl"), vocab_size=400, n_layer=1, n_embd=32, n_head=2, steps=9,
               batch_size=8, eval_every=4, save_every=3, log_with="tensorboard", progress=False)
    out = tmp_path / "lm"

    class Crash(Exception):
        pass

    log = run_module.Run.log

    def crash_after_step_7(self, record):
        log(self, record)
        if record["step"] == 7:
            raise Crash  # after step 7 was logged everywhere; the last checkpoint holds step 6
    monkeypatch.setattr(run_module.Run, "log", crash_after_step_7)
    with pytest.raises(Crash):
        pretrain(PretrainConfig(out=str(out), **cfg))
    monkeypatch.setattr(run_module.Run, "log", log)
    assert not out.exists()
    pretrain(PretrainConfig(out=str(out), resume=True, **cfg))

    jsonl = jsonl_scalars(out / "metrics.jsonl")
    assert [s for s, _ in jsonl["train/loss"]] == list(range(1, 10))
    assert_same(jsonl, tensorboard_scalars(tmp_path / "lm-logs" / "tensorboard"))
    # an uninterrupted run logs the same numbers
    pretrain(PretrainConfig(out=str(tmp_path / "ref"), **cfg))
    assert jsonl_scalars(tmp_path / "ref" / "metrics.jsonl") == jsonl


def test_trackio_sink_gets_every_new_record_once(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda values, step: calls.append(("log", step, values)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    previous = [json.dumps({"step": 1, "train/loss": 2.0})]   # replayed from a checkpoint: not sent again
    sinks = MetricSinks(tmp_path / "m.jsonl", previous, sinks="trackio", run_name="r", config={"lr": 1.0}, start=1)
    sinks.log({"step": 2, "train/loss": 1.5, "note": "text", "eval/loss": float("nan")})
    sinks.close()
    assert calls[0] == ("init", {"project": "instructrl", "name": "r", "config": {"lr": 1.0}, "resume": "allow"})
    assert calls[1:] == [("log", 2, {"train/loss": 1.5}), ("finish",)]
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]


def test_sinks_only_on_rank_zero_and_unknown_sinks_refused(tmp_path):
    assert MetricSinks(None, sinks="tensorboard").tb is None  # ranks other than 0 have no output directory
    with pytest.raises(ValueError, match="unknown sink 'wandb'"):
        parse_sinks("tensorboard,wandb")
