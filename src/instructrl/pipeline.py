"""The main job: world → tokenizer + pretrain → SFT → rankings → reward model → PPO-ptx → evaluation → report.

Each stage writes DIR/<stage>/summary.json last (atomically, with its outputs); a stage whose summary exists is
reused, so an interrupted pipeline continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .config import PipelineConfig, dump_config
from .stages import BY_NAME
from .utils import atomic_dir, console, peak_rss_mb, write_json


def _finished(d: Path) -> dict | None:
    f = d / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _stage(name: str, d: Path, fn, show: list[str]) -> dict:
    """Run stage `name` (see stages.py) into `d`, or reuse it when `d` holds a finished stage."""
    name = BY_NAME[name].title
    done = _finished(d)
    if done is not None:
        console.print(f"[dim]• {name}: reused {d}[/]")
        return done
    console.rule(f"[bold]{name}")
    t0 = time.time()
    summary = fn()
    shown = ", ".join(f"{k}={_fmt(summary[k])}" for k in show if k in summary)
    console.print(f"[bold green]✓ {name}[/] {shown} [dim]({time.time() - t0:.0f}s)[/]")
    return summary


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items() if not isinstance(x, dict)) + "}"
    return str(v)


def run_pipeline(cfg: PipelineConfig, out: str | Path) -> dict:
    from .dpo import dpo
    from .evaluate import evaluate
    from .grpo import GRPO
    from .pg import PolicyGradient
    from .ppo import PPO
    from .rl import train_rl
    from .pretrain import pretrain
    from .reward import train_reward_model
    from .rloo import RLOO
    from .sft import sft
    from .world import GoldJudge, generate_world
    from .world.labelers import simulate_rankings

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    common = {"seed": cfg.seed, "device": cfg.device, "dtype": cfg.dtype}  # flat options of RunOptions

    # World (embedded default) or the user's own data.
    wdir = out / "world"
    uses_world = not all([cfg.data.demos, cfg.data.prompts_train, cfg.data.prompts_eval]) or not cfg.data.rankings
    if uses_world:
        _stage("world", wdir, lambda: generate_world(wdir, dataclasses.replace(cfg.world, out=str(wdir), seed=cfg.seed)),
               ["corpus", "demos", "prompts_train", "prompts_eval"])
    data = {k: getattr(cfg.data, k) for k in dataclasses.asdict(cfg.data)}
    defaults = {"demos": "demos.jsonl", "prompts_train": "prompts_train.jsonl", "prompts_eval": "prompts_eval.jsonl",
                "pretrain_text": "corpus.jsonl", "pretrain_val": "corpus_val.jsonl", "bias_probes": "bias_probes.jsonl"}
    for k, f in defaults.items():
        data[k] = data[k] or (str(wdir / f) if uses_world else None)
    judge_dir = str(wdir) if uses_world else None

    # Step 0: tokenizer + tiny model, unless the user brings a model.
    stages: dict[str, str] = {}
    if cfg.base_model:
        stages["pretrained"] = cfg.base_model
    else:
        pdir = out / "pretrained"
        _stage("pretrained", pdir, lambda: pretrain(dataclasses.replace(
            cfg.pretrain, corpus=data["pretrain_text"], val_corpus=data["pretrain_val"], out=str(pdir), seed=cfg.seed)),
            ["val_perplexity", "parameters"])
        stages["pretrained"] = str(pdir)

    # Step 1: SFT.
    sdir = out / "sft"
    _stage("sft", sdir, lambda: sft(dataclasses.replace(
        cfg.sft, model=stages["pretrained"], data=data["demos"], out=str(sdir), **common)),
        ["val_loss_start", "val_loss_best"])
    stages["sft"] = str(sdir)

    # Rankings: exported human rankings, or simulated labelers on SFT samples.
    if cfg.data.rankings:
        rankings = cfg.data.rankings
    else:
        ldir = out / "rankings"

        def label():
            from .data import read_prompts, write_jsonl
            from .models import load_causal_lm, load_tokenizer
            from .utils import resolve_device

            t0 = time.time()
            ls = cfg.label
            prompts = read_prompts(data["prompts_train"])[: ls.n_prompts]
            dev = resolve_device(cfg.device)
            recs = simulate_rankings(load_causal_lm(sdir, dev), load_tokenizer(sdir), prompts,
                                     GoldJudge.from_world(judge_dir), k=ls.k, temperature=ls.temperature,
                                     n_labelers=ls.labelers, labeler_bias_std=ls.labeler_bias_std,
                                     sample_temperature=ls.sample_temperature, seed=cfg.seed)
            with atomic_dir(ldir) as tmp:
                write_jsonl(tmp / "rankings.jsonl", recs)
                summary = {"stage": "rankings", "rankings": len(recs), "k": ls.k, "seconds": time.time() - t0}
                write_json(tmp / "summary.json", summary)
            return summary
        _stage("rankings", ldir, label, ["rankings", "k"])
        rankings = str(ldir / "rankings.jsonl")

    # Step 2: reward model.
    rdir = out / "reward"
    rm_summary = _stage("reward", rdir, lambda: train_reward_model(dataclasses.replace(
        cfg.reward, model=str(sdir), data=rankings, demos=data["demos"], out=str(rdir), **common)),
        ["held_out", "demo_score_mean"])

    # Step 3: PPO-ptx, and the comparison runs.
    rl_common = dict(policy=str(sdir), reward=str(rdir), prompts=data["prompts_train"], judge=judge_dir,
                     ptx_data=data["pretrain_text"], **common)
    runs = {"ppo_ptx": lambda d: train_rl(dataclasses.replace(cfg.ppo, out=str(d), **rl_common), PPO)}
    if cfg.compare:
        runs["ppo"] = lambda d: train_rl(dataclasses.replace(cfg.ppo, out=str(d), **{**rl_common, "ptx_coef": 0.0}),
                                         PPO)
        runs["ppo_beta0"] = lambda d: train_rl(dataclasses.replace(
            cfg.ppo, out=str(d), **{**rl_common, "ptx_coef": 0.0, "beta": 0.0}), PPO)
        runs["pg"] = lambda d: train_rl(dataclasses.replace(
            cfg.pg, out=str(d), episodes=cfg.ppo.episodes, **{**rl_common, "ptx_coef": 0.0}), PolicyGradient)
        # the critic-free methods at PPO's number of sampled episodes; DPO on the same rankings as the reward model
        runs["grpo"] = lambda d: train_rl(dataclasses.replace(
            cfg.grpo, out=str(d), episodes=cfg.ppo.episodes, **{**rl_common, "ptx_coef": 0.0}), GRPO)
        runs["rloo"] = lambda d: train_rl(dataclasses.replace(
            cfg.rloo, out=str(d), episodes=cfg.ppo.episodes, **{**rl_common, "ptx_coef": 0.0}), RLOO)
        runs["dpo"] = lambda d: dpo(dataclasses.replace(cfg.dpo, policy=str(sdir), data=rankings, out=str(d),
                                                        **common))
    for name, fn in runs.items():
        d = out / name
        _stage(name, d, lambda fn=fn, d=d: fn(d), ["final", "seconds"])
        stages[name] = str(d)

    # Evaluation of every stage on the held-out prompts.
    edir = out / "eval"
    evals = {}
    for name, model in stages.items():
        f = edir / f"{name}.json"
        if f.is_file():
            evals[name] = json.loads(f.read_text())
            continue
        console.print(f"[bold]eval[/] {name} …")
        ecfg = dataclasses.replace(cfg.eval, model=model, prompts=data["prompts_eval"], reference=str(sdir),
                                   reward=str(rdir), world=judge_dir, pretrain_text=data["pretrain_val"],
                                   bias_probes=data["bias_probes"], device=cfg.device, out=None)
        evals[name] = evaluate(ecfg)
        write_json(f, evals[name])
        e = evals[name]
        console.print(f"[green]✓ eval {name}[/] toxicity={e['toxicity_rate']:.3f}"
                      + (f" gold={e['gold_reward']:.3f}" if "gold_reward" in e else "")
                      + f" rm={e.get('rm_reward', float('nan')):.3f} kl={e.get('kl_to_reference', 0):.2f}")

    from .report import write_report

    report = write_report(out, stages, evals, rm_summary, seconds=time.time() - t_start, peak_rss_mb=peak_rss_mb())
    console.print(f"[bold green]report:[/] {out / 'report.html'}  ({out / 'report.json'})")
    return report
