"""--eval-prompts/--eval-every on the RL commands: held-out scores and a completions table at step 0, every N
iterations and at the end, in metrics.jsonl, TensorBoard, W&B's offline run files and MLflow's file store; the
numbers are `instructrl eval`'s on the same policy; the weights equal a run without it; a resumed run neither repeats
nor loses an evaluation; bad input stops at once with exit 2."""
import dataclasses
import json
import sys
import types

import pytest

from instructrl.metrics import MetricSinks
from test_metrics import (assert_same, jsonl_scalars, mlflow_history, offline_trackers, tensorboard_scalars,
                          wandb_records)
from test_resume import same_weights

def _installed(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


SINKS = [s for s in ("tensorboard", "wandb", "mlflow") if _installed(s)]
EVAL_STEPS = [0, 2, 4]  # 4 iterations, --eval-every 2: before training, after iteration 2, after the last


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def untimed(path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records(path)]


@pytest.fixture(scope="module")
def runs(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path_factory):
    """A tiny PPO run with --eval-every 2 logging to every installed sink, and the same run without either."""
    from instructrl.ppo import PPOConfig, train_ppo

    tmp = tmp_path_factory.mktemp("evalrl")
    mp = pytest.MonkeyPatch()
    offline_trackers(mp, tmp)
    kw = dict(policy=str(tiny_sft_dir), reward=[str(tiny_rm_dir)], prompts=str(world_dir / "prompts_train.jsonl"),
              judge=str(world_dir), episodes=64, batch_size=16, minibatch_size=8, max_new_tokens=8, progress=False,
              device="cpu", ptx_coef=0.5, ptx_data=str(world_dir / "corpus.jsonl"), kl_target=1.0)
    with_eval = PPOConfig(out=str(tmp / "with"), eval_prompts=str(world_dir / "prompts_eval.jsonl"), eval_every=2,
                          log_with=",".join(SINKS), **kw)
    try:
        summary = train_ppo(with_eval)
        train_ppo(PPOConfig(out=str(tmp / "without"), **kw))
    finally:
        mp.undo()
    return types.SimpleNamespace(tmp=tmp, cfg=with_eval, kw=kw, summary=summary, world=world_dir,
                                 sft=tiny_sft_dir, rm=tiny_rm_dir)


def test_same_weights_with_and_without_evaluation(runs):
    assert same_weights(runs.tmp / "with", runs.tmp / "without")
    assert same_weights(runs.tmp / "with" / "value_model", runs.tmp / "without" / "value_model")
    # the training records are the same too
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rs if r["step"]]
    assert strip(untimed(runs.tmp / "with" / "metrics.jsonl")) == strip(untimed(runs.tmp / "without" / "metrics.jsonl"))


def test_metrics_jsonl_holds_the_evaluations_and_their_tables(runs):
    recs = records(runs.tmp / "with" / "metrics.jsonl")
    evals = [r for r in recs if "eval/score" in r]
    assert [r["step"] for r in evals] == EVAL_STEPS
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]  # step 0 is the evaluation alone
    from instructrl.data import read_prompts

    first = read_prompts(runs.world / "prompts_eval.jsonl")[:4]
    for r in evals:
        assert {"eval/kl", "eval/gold", "eval/length", "eval/eos_rate", "time/eval"} <= set(r)
        assert [k for k in r if k.startswith("eval/score/")] == ["eval/score/rm"]  # one per reward source
        table = r["eval/samples"]
        assert [row["prompt"] for row in table] == first
        assert set(table[0]) == {"prompt", "completion", "score", "kl", "gold"}
    assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # before training the policy is the reference
    assert runs.summary["final"]["eval/score"] == evals[-1]["eval/score"]


def test_the_numbers_are_instructrl_evals_on_the_same_policy(runs):
    """Step 0 scores the SFT model and the last evaluation the saved policy: `evaluate` on them, with the same seed,
    temperature and batches, draws the same samples and gives the same numbers."""
    from instructrl.evaluate import EvalConfig, evaluate

    evals = [r for r in records(runs.tmp / "with" / "metrics.jsonl") if "eval/score" in r]
    for model, rec in ((runs.sft, evals[0]), (runs.tmp / "with", evals[-1])):
        e = evaluate(EvalConfig(model=str(model), prompts=str(runs.world / "prompts_eval.jsonl"),
                                reference=str(runs.sft), reward=[str(runs.rm)], world=str(runs.world),
                                max_new_tokens=8, temperature=runs.cfg.temperature, batch_size=16, seed=0,
                                n_examples=4, device="cpu"))
        assert rec["eval/score/rm"] == pytest.approx(e["rm_reward"], rel=1e-5, abs=1e-6)
        assert rec["eval/gold"] == pytest.approx(e["gold_reward"], rel=1e-6)
        assert rec["eval/kl"] == pytest.approx(e["kl_to_reference"], rel=1e-4, abs=1e-4)
        assert rec["eval/length"] == pytest.approx(e["response_length"])
        ours = {}  # the table's first completion of each prompt; evaluate's examples skip repeated prompts
        for row in rec["eval/samples"]:
            ours.setdefault(row["prompt"], row["completion"])
        assert {x["prompt"]: x["response"] for x in e["examples"] if x["prompt"] in ours} == ours


def test_tensorboard_shows_the_scores_and_the_table(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = runs.tmp / "with-logs" / "tensorboard"
    jsonl = jsonl_scalars(runs.tmp / "with" / "metrics.jsonl")
    tb = tensorboard_scalars(logs)
    assert_same(jsonl, tb)
    assert [s for s, _ in tb["eval/score"]] == EVAL_STEPS
    acc = EventAccumulator(str(logs), size_guidance={"tensors": 0})
    acc.Reload()
    [tag] = acc.Tags()["tensors"]
    assert tag.startswith("eval/samples")
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
    assert [s for s, _ in texts] == EVAL_STEPS
    rec = records(runs.tmp / "with" / "metrics.jsonl")[0]
    header, rule, *rows = texts[0][1].splitlines()
    assert header == "| prompt | completion | score | kl | gold |" and len(rows) == 4
    assert rows[0].startswith(f"| {rec['eval/samples'][0]['prompt']} | ".replace("\n", "<br>"))


@pytest.mark.skipif("wandb" not in SINKS, reason="wandb not installed")
def test_wandb_offline_run_holds_the_scores_and_the_tables(runs):
    jsonl = jsonl_scalars(runs.tmp / "with" / "metrics.jsonl")
    held, tables = {}, []
    for step, key, value in wandb_records(runs.tmp / "wandb"):
        if isinstance(value, dict):
            tables.append((step, key, value))
        else:
            held.setdefault(key, []).append((step, float(value)))
    assert_same({k: [(s, v) for s, v in pts if v == v] for k, pts in jsonl.items()}, held)
    assert [(s, k, v["_type"]) for s, k, v in tables] == [(s, "eval/samples", "table-file") for s in EVAL_STEPS]
    recs = {r["step"]: r for r in records(runs.tmp / "with" / "metrics.jsonl")}
    [run_dir] = (runs.tmp / "wandb" / "wandb").glob("offline-run-*")
    for step, _, v in tables:
        saved = json.loads((run_dir / "files" / v["path"]).read_text())
        assert saved["columns"] == ["prompt", "completion", "score", "kl", "gold"]
        assert [row[:2] for row in saved["data"]] == [[x["prompt"], x["completion"]]
                                                      for x in recs[step]["eval/samples"]]


@pytest.mark.skipif("mlflow" not in SINKS, reason="mlflow not installed")
def test_mlflow_store_holds_the_scores_and_the_table(runs):
    jsonl = jsonl_scalars(runs.tmp / "with" / "metrics.jsonl")
    held = mlflow_history(f"file:{runs.tmp / 'mlruns'}")
    assert_same({k: [(s, v) for s, v in pts if v == v] for k, pts in jsonl.items()}, held)
    [table] = (runs.tmp / "mlruns").rglob("artifacts/eval/samples.json")
    saved = json.loads(table.read_text())
    assert saved["columns"] == ["step", "prompt", "completion", "score", "kl", "gold"]
    recs = {r["step"]: r for r in records(runs.tmp / "with" / "metrics.jsonl")}
    assert [row[:3] for row in saved["data"]] == [[s, x["prompt"], x["completion"]] for s in EVAL_STEPS
                                                  for x in recs[s]["eval/samples"]]


def test_a_resumed_run_neither_repeats_nor_loses_an_evaluation(runs, monkeypatch):
    """Crash after iteration 3 (checkpoint at 2), resume: the same metrics.jsonl, evaluations and tables included,
    and the same weights as the uninterrupted run."""
    from instructrl import run as run_module
    from instructrl.ppo import train_ppo

    class Crash(Exception):
        pass

    log = run_module.Run.log

    def crash_after_step_3(self, record, tables=None):
        log(self, record, tables)
        if record["step"] == 3:
            raise Crash
    cfg = dataclasses.replace(runs.cfg, out=str(runs.tmp / "resumed"))
    cfg.run = dataclasses.replace(cfg.run, save_every=2, log_with="")
    monkeypatch.setattr(run_module.Run, "log", crash_after_step_3)
    with pytest.raises(Crash):
        train_ppo(cfg)
    monkeypatch.setattr(run_module.Run, "log", log)
    cfg.run.resume = True
    train_ppo(cfg)
    assert untimed(runs.tmp / "resumed" / "metrics.jsonl") == untimed(runs.tmp / "with" / "metrics.jsonl")
    assert same_weights(runs.tmp / "resumed", runs.tmp / "with")


def test_trackio_gets_the_table_with_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: None, finish=lambda: None,
                                 log=lambda values, step: calls.append((step, values)),
                                 Table=lambda dataframe: ("table", dataframe.to_dict("records")))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    sinks = MetricSinks(tmp_path / "m.jsonl", sinks="trackio")
    rows = [{"prompt": "p", "completion": "c", "score": 1.0}]
    sinks.log({"step": 2, "eval/score": 1.0}, {"eval/samples": rows})
    sinks.close()
    assert calls == [(2, {"eval/score": 1.0, "eval/samples": ("table", rows)})]
    assert records(tmp_path / "m.jsonl") == [{"step": 2, "eval/score": 1.0, "eval/samples": rows}]


@pytest.mark.parametrize("args, says", [
    (["--eval-every", "-1", "--eval-prompts", "{eval}"], "--eval-every must be >= 0, not -1"),
    (["--eval-every", "2"], "--eval-every N and --eval-prompts FILE go together"),
    (["--eval-prompts", "{eval}"], "--eval-every N and --eval-prompts FILE go together"),
    (["--eval-every", "2", "--eval-prompts", "{missing}"], "{missing}"),
], ids=["negative", "no-prompts", "no-every", "missing-file"])
@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_bad_eval_options_exit_2_in_one_line(command, args, says, cli_main, capsys, tmp_path, tiny_sft_dir,
                                             tiny_rm_dir, world_dir):
    paths = {"eval": str(world_dir / "prompts_eval.jsonl"), "missing": str(tmp_path / "nope.jsonl")}
    code = cli_main(command, "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts",
                    world_dir / "prompts_train.jsonl", "--out", tmp_path / "out", "--episodes", 16,
                    "--batch-size", 16, "--minibatch-size", 8, "--device", "cpu", "--no-progress",
                    *[a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err  # one message (rich may wrap it)
    assert says.format(**paths) in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_the_pipeline_passes_its_eval_prompts_to_the_rl_stages_that_evaluate(tmp_path):
    from instructrl.config import PipelineConfig
    from instructrl.pipeline import RL_STAGES, plan, stage_fingerprint

    default = plan(PipelineConfig(compare=True), tmp_path)
    assert all(default[n].eval_prompts is None and default[n].eval_every == 0 for n in RL_STAGES if n in default)
    cfg = PipelineConfig(compare=True)
    cfg.ppo.eval_every, cfg.grpo.eval_every = 5, 3
    p = plan(cfg, tmp_path)
    evals = str(tmp_path / "world" / "prompts_eval.jsonl")
    assert {n: (p[n].eval_prompts, p[n].eval_every) for n in ("ppo_ptx", "ppo", "pg", "grpo", "rloo")} == {
        "ppo_ptx": (evals, 5), "ppo": (evals, 5), "pg": (None, 0), "grpo": (evals, 3), "rloo": (None, 0)}
    # what a stage learns does not change: a finished stage is reused with or without the evaluations
    assert stage_fingerprint(p["ppo_ptx"], contents=False) == stage_fingerprint(default["ppo_ptx"], contents=False)
