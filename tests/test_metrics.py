"""Metric sinks: TensorBoard receives exactly what metrics.jsonl holds — same scalars, same steps — also after a
crash and --resume (no step twice); trackio gets the same records, and nothing replayed; W&B's offline run files
and MLflow's file store hold what metrics.jsonl holds, also across a resume."""
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
    with pytest.raises(ValueError, match="unknown sink 'neptune'"):
        parse_sinks("tensorboard,neptune")


# --- W&B (offline run files) and MLflow (local file store) ------------------------------------------------------
def wandb_records(wandb_dir):
    """(step, key, value) of every history item of every offline run under WANDB_DIR, read from its run-*.wandb
    transaction log: W&B's framing (a 7-byte ':W&B' header, then LevelDB log records in 32 KiB blocks: crc32,
    length, type; FULL=1 … LAST=4) around protobuf `Record`s."""
    import struct

    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()  # the W&B service writes the last records of a finished run when it shuts down
    nested: dict[tuple[int, str], dict] = {}
    for path in sorted(wandb_dir.rglob("run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "history":
                    for item in record.history.item:
                        if len(item.nested_key) > 1:  # a table may come as one dict or as nested keys, one per field
                            nested.setdefault((record.history.step.num, item.nested_key[0]), {})[
                                item.nested_key[-1]] = json.loads(item.value_json)
                            continue
                        key = item.key or "/".join(item.nested_key)
                        if not key.startswith("_"):
                            yield record.history.step.num, key, json.loads(item.value_json)
    for (step, key), value in sorted(nested.items()):
        yield step, key, value


def wandb_history(wandb_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every offline run under WANDB_DIR (`wandb_records`)."""
    out: dict[str, list] = {}
    for step, key, value in wandb_records(wandb_dir):
        out.setdefault(key, []).append((step, float(value)))
    return out


def offline_trackers(monkeypatch, tmp) -> None:
    """W&B offline into TMP/wandb, MLflow's file store in TMP/mlruns."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    (tmp / "wandb").mkdir()


def mlflow_history(uri) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("instructrl").experiment_id])
    # a file store holds `objective/score` as `objective.score` (no instructrl metric name has a '.')
    return {k.replace(".", "/"): sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


@pytest.mark.parametrize("sink", ["wandb", "mlflow"])
def test_wandb_and_mlflow_hold_what_metrics_jsonl_holds_and_change_no_weight(sink, tiny_sft_dir, tiny_rm_dir,
                                                                             world_dir, tmp_path, monkeypatch):
    """A tiny PPO run logs every metrics.jsonl scalar, at its step, to the offline store; the weights are those of a
    run without the sink."""
    pytest.importorskip(sink)
    from instructrl.ppo import PPOConfig, train_ppo
    from test_resume import same_weights

    offline_trackers(monkeypatch, tmp_path)
    kw = dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
              episodes=32, batch_size=16, minibatch_size=8, max_new_tokens=8, progress=False, device="cpu")
    train_ppo(PPOConfig(out=str(tmp_path / "with"), log_with=sink, **kw))
    train_ppo(PPOConfig(out=str(tmp_path / "without"), **kw))
    assert same_weights(tmp_path / "with", tmp_path / "without")
    jsonl = jsonl_scalars(tmp_path / "with" / "metrics.jsonl")
    jsonl = {k: [(s, v) for s, v in pts if v == v] for k, pts in jsonl.items()}  # NaN is not sent
    held = wandb_history(tmp_path / "wandb") if sink == "wandb" else mlflow_history(f"file:{tmp_path / 'mlruns'}")
    assert [s for s, _ in jsonl["objective/score"]] == [1, 2]
    assert_same({k: v for k, v in jsonl.items() if v}, held)


@pytest.mark.parametrize("sink", ["wandb", "mlflow"])
def test_a_resumed_run_continues_the_same_wandb_or_mlflow_run_without_repeating_a_step(sink, tmp_path, monkeypatch):
    pytest.importorskip(sink)
    offline_trackers(monkeypatch, tmp_path)
    logs = tmp_path / "out-logs"
    first = MetricSinks(tmp_path / "a.jsonl", sinks=sink, log_dir=logs, run_name="r")
    for step in (1, 2, 3):  # the crashed run logged step 3 after its checkpoint at step 2
        first.log({"step": step, "train/loss": 1.0 / step})
    first.close()
    rid = json.loads((logs / f"{sink}_run.json").read_text())
    previous = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2)]
    second = MetricSinks(tmp_path / "b.jsonl", previous, sinks=sink, log_dir=logs, run_name="r", start=2)
    for step in (3, 4):
        second.log({"step": step, "train/loss": 1.0 / step})
    second.close()
    assert json.loads((logs / f"{sink}_run.json").read_text()) == {"id": rid["id"], "step": 4}
    held = wandb_history(tmp_path / "wandb") if sink == "wandb" else mlflow_history(f"file:{tmp_path / 'mlruns'}")
    assert held == {"train/loss": [(s, pytest.approx(1.0 / s)) for s in (1, 2, 3, 4)]}
