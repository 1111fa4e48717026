"""End to end: a scaled-down pipeline to a report, resuming after a kill between stages, config validation."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from instructrl.config import load_pipeline_config
from instructrl.data import DataError

TINY = """
seed: 0
compare: true
device: cpu
world: {n_corpus: 3000, n_corpus_val: 200, n_demos: 120, n_prompts_train: 200, n_prompts_eval: 40, max_operand: 9, n_countries: 24,
        eval_share: 0.125, task_types: [colour, capital, plus, list, describe],
        demo_types: [colour, capital, plus, list, describe]}
pretrain: {vocab_size: 600, n_layer: 2, n_embd: 64, n_head: 2, steps: 80, batch_size: 16}
sft: {epochs: 2, lr: 1.0e-3}
label: {k: 4, n_prompts: 80}
reward: {lr: 1.0e-4}
ppo: {episodes: 256, batch_size: 32, minibatch_size: 8, max_new_tokens: 16, lr: 2.0e-4, ptx_batch_size: 8}
pg: {batch_size: 32, max_new_tokens: 16, lr: 2.0e-4}
grpo: {batch_size: 32, minibatch_size: 16, max_new_tokens: 16, lr: 2.0e-4}
rloo: {batch_size: 32, minibatch_size: 16, max_new_tokens: 16, lr: 2.0e-4}
dpo: {batch_size: 8, epochs: 2}
eval: {max_new_tokens: 16, samples_per_prompt: 2}
"""


def run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "instructrl.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A scaled-down pipeline with --compare, killed after SFT and resumed; yields (run dir, resumed log)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "run"
    # Start, and kill the process once SFT has finished (between stages).
    p = run_cli("pipeline", "--config", cfg, "--out", out, "--threads", "2")
    deadline = time.time() + 300
    while not (out / "sft" / "summary.json").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    pretrained_mtime = (out / "pretrained" / "model.safetensors").stat().st_mtime_ns
    sft_mtime = (out / "sft" / "model.safetensors").stat().st_mtime_ns

    p = run_cli("pipeline", "--config", cfg, "--out", out, "--threads", "2")
    log, _ = p.communicate(timeout=1500)
    assert p.returncode == 0, log
    assert "pretrain: reused" in log and "sft (step 1): reused" in log
    assert (out / "pretrained" / "model.safetensors").stat().st_mtime_ns == pretrained_mtime
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_mtime
    assert not [x for x in out.iterdir() if x.name.startswith(".")], "temp directories left behind"
    return out


def test_pipeline_report_structure(tiny_run):
    out = tiny_run
    # simulated labelers ranked the pretrained model's samples on every fourth prompt (label.pretrained_share 0.25)
    policies = [json.loads(x)["policy"] for x in (out / "rankings" / "rankings.jsonl").read_text().splitlines()]
    assert set(policies) == {"sft", "pretrained"} and 16 <= policies.count("pretrained") <= 20 < policies.count("sft")
    # the labelled prompts mix the RL prompts and the demonstrations' (label.demo_prompts); the reward model holds a
    # fifth of their questions out
    def prompts(f):
        return {json.loads(x)["prompt"] for x in (out / f).read_text().splitlines()}
    ranked, demo = prompts("rankings/rankings.jsonl"), prompts("world/demos.jsonl")
    rl = prompts("world/prompts_train.jsonl")
    assert ranked & demo and ranked & rl and ranked <= demo | rl
    assert json.loads((out / "reward" / "summary.json").read_text())["config"]["val_fraction"] == 0.2
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"pretrained", "sft", "ppo_ptx", "ppo_gold", "ppo", "ppo_beta0", "pg", "pg_reuse", "grpo",
                           "rloo", "dpo"}
    for st in stages.values():
        for key in ("toxicity_rate", "gold_reward", "rm_reward", "kl_to_reference", "pretrain_loss", "bias_gap",
                    "episodes", "seconds"):
            assert key in st and st[key] is not None, key
    assert stages["sft"]["kl_to_reference"] == 0.0
    assert stages["ppo_ptx"]["episodes"] == stages["grpo"]["episodes"] == stages["rloo"]["episodes"] == 256
    # RL moved the reward it optimises up: last iterations vs first ones, on its own rollouts.
    for run in ("ppo_ptx", "ppo_beta0", "pg", "grpo", "rloo"):
        rewards = [c["objective/score"] for c in report["curves"][run]]
        assert len(rewards) == 8
        assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, (run, rewards)
    assert [c["claim"][:3] for c in report["claims"]] == ["1. ", "2. ", "3a.", "3b.", "3c.", "4. ", "5. ", "6. "]
    assert all("detail" in c for c in report["claims"])
    # claim 3's ablation: PG's own loss with PPO's schedule (4 epochs × minibatches of 8 of 32: 16 steps per batch)
    pg_reuse = json.loads((out / "pg_reuse" / "summary.json").read_text())["config"]
    assert (pg_reuse["epochs"], pg_reuse["minibatch_size"], pg_reuse["lr"]) == (4, 8, 2.0e-4)
    # the pipeline's defaults that work (README, "Defaults that work"): Dr. GRPO's unscaled advantages, DPO at β 0.5
    assert json.loads((out / "grpo" / "summary.json").read_text())["config"]["scale_rewards"] is False
    assert json.loads((out / "dpo" / "summary.json").read_text())["config"]["beta"] == 0.5
    ppo_cfg = json.loads((out / "ppo_ptx" / "summary.json").read_text())["config"]
    assert (ppo_cfg["beta"], ppo_cfg["lr_schedule"]) == (0.3, "linear")  # PPO's β; its lr decays to 0
    assert {c["check"].split(" ")[0] for c in report["world_checks"]} == {"reward", "Spearman(reward", "PPO-ptx's"}
    assert sum(c["check"].startswith("reward model's") for c in report["world_checks"]) == 2  # held out; eval prompts
    # each says what it was measured on: a handful of prompts can decide it
    rm_summary = json.loads((out / "reward" / "summary.json").read_text())
    held, on_eval = (c["on"] for c in report["world_checks"] if c["check"].startswith("reward model's"))
    assert held.endswith(f"of {rm_summary['held_out_distinct_prompts']} held-out prompts")
    assert 1 <= rm_summary["held_out_distinct_prompts"] <= rm_summary["held_out_prompts"]  # rankings repeat prompts
    assert on_eval == f"{stages['sft']['rm_gold_pairs']} same-prompt pairs of {stages['sft']['rm_gold_questions']} " \
                      f"eval questions" and stages["sft"]["rm_gold_questions"] >= 1
    assert f"({held})" in (out / "report.html").read_text()
    assert 0 <= stages["sft"]["rm_gold_accuracy"] <= 1
    assert set(report["overoptimisation"]) >= {"ppo_ptx", "ppo_gold", "ppo_beta0"}
    assert stages["ppo_ptx"]["gold_vs_sft_se"] > 0 and 0 <= stages["ppo_ptx"]["stereotype_rate"] <= 1
    assert (out / "plots" / "overoptimisation.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "PPO-ptx" in html
    assert (out / "plots" / "curves.png").stat().st_size > 1000


def test_config_rejects_unknown_keys_with_a_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  betta: 0.1\n")
    with pytest.raises(DataError, match=r"ppo.betta.*did you mean 'beta'"):
        load_pipeline_config(f)
    f.write_text("sft:\n  epochs: two\n")
    with pytest.raises(DataError, match=r"sft.epochs.*expected int"):
        load_pipeline_config(f)
    f.write_text("ppo:\n  out: /elsewhere\n")  # wired by the pipeline, not settable
    with pytest.raises(DataError, match="unknown key"):
        load_pipeline_config(f)
    f.write_text("ppo:\n  beta: 0.1\n  episodes: 128\nlabel: {k: 5}\n")
    cfg = load_pipeline_config(f)
    assert cfg.ppo.beta == 0.1 and cfg.ppo.episodes == 128 and cfg.label.k == 5 and cfg.ppo.ptx_coef == 0.1


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="/usr/bin/chromium is absent")
def test_report_renders_in_chromium(tiny_run):
    """The self-contained page loads offline: every figure decodes, the table and sample responses are there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((tiny_run / "report.html").as_uri())
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 3 and all(w > 500 for w in widths)  # curves, over-optimisation, stages
        assert page.locator("table tr").count() >= 7
        assert page.locator("text=PPO-ptx").first.is_visible()
        page.screenshot(path=str(tiny_run / "report.png"), full_page=True)
        browser.close()
    assert (tiny_run / "report.png").stat().st_size > 10000


def test_seeds_report_aggregates_and_counts_claims(tiny_run, tmp_path):
    """Two seeds' reports (the tiny run's and a copy with other numbers) → mean ± sd and claims held on k of 2."""
    from instructrl.report import write_seeds_report

    a = json.loads((tiny_run / "report.json").read_text())
    b = json.loads(json.dumps(a))
    b["stages"]["sft"]["toxicity_rate"] = a["stages"]["sft"]["toxicity_rate"] + 0.2
    b["claims"][0]["holds"] = not a["claims"][0]["holds"]
    agg = write_seeds_report(tmp_path, {0: a, 1: b})
    tox = agg["stages"]["sft"]["toxicity_rate"]
    assert tox["mean"] == pytest.approx(a["stages"]["sft"]["toxicity_rate"] + 0.1)
    assert tox["sd"] == pytest.approx((2 * 0.1 ** 2) ** 0.5) and len(tox["values"]) == 2
    first = agg["claims"][0]
    assert first["holds"] == 1 and first["runs"] == 2 and agg["runs"] == ["seed 0", "seed 1"]
    same = agg["claims"][1]
    assert same["holds"] in (0, 2) and same["min"] == same["max"] == a["claims"][1]["value"]
    html = (tmp_path / "report.html").read_text()
    assert "holds on 1 of 2 runs" in html and "±" in html and "data:image/png;base64," in html


def test_seeds_refuse_a_one_seed_run_directory(tiny_run):
    from instructrl.config import PipelineConfig
    from instructrl.pipeline import run_seeds

    with pytest.raises(ValueError, match="one-seed pipeline run"):
        run_seeds(PipelineConfig(), tiny_run, 2)


def test_user_data_without_a_world_skips_the_world_only_measures(tmp_path):
    """Every input given (no embedded world): no gold judge, so no stereotyped-reply rate, and the eval configs
    still validate."""
    from dataclasses import replace

    from instructrl.config import DataPaths, PipelineConfig
    from instructrl.pipeline import plan

    files = {k: str(tmp_path / f"{k}.jsonl") for k in ("demos", "prompts_train", "prompts_eval", "rankings")}
    cfg = replace(PipelineConfig(), data=DataPaths(**files))
    p = plan(cfg, tmp_path / "run")
    assert p["judge"] is None and "world" not in p
    for ecfg in p["eval"].values():
        assert ecfg.stereotype_samples == 0 and ecfg.world is None
        ecfg.validate("eval")
    assert PipelineConfig().eval.stereotype_samples == 8  # the embedded default measures it
