"""The main job: world → tokenizer + pretrain → SFT → rankings → reward model → PPO-ptx → evaluation → report.

Every stage's config is built and validated before the first stage runs. Each stage writes DIR/<stage>/summary.json
last (atomically, with its outputs), and DIR/fingerprints.json records what each finished stage was made from (its
options and its inputs' contents). A finished stage is reused only when its fingerprint matches; otherwise the run
stops naming what changed, or, with --rerun-changed, recomputes the stage (and so every stage that reads it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import time
from pathlib import Path

from .config import PipelineConfig, dump_config, validate_pipeline
from .options import flat_fields, to_flat
from .optim import NonFiniteError
from .outputs import RUN_CONTROL, OutputLock, check_place, clean_temporaries, content_id, differences
from .stages import BY_NAME
from .utils import atomic_dir, atomic_write_text, console, peak_rss_mb, resolve_autocast, resolve_device, write_json

FINGERPRINTS = "fingerprints.json"
NOT_LEARNED = RUN_CONTROL | {"device"}  # options a stage may be reused across


def _finished(d: Path) -> dict | None:
    f = d / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def stage_fingerprint(cfg, extra_inputs: dict | None = None, contents: bool = True) -> dict:
    """A stage's options (without paths and run control) and its inputs: the wired paths (and `extra_inputs`),
    with their contents when `contents` (an upstream stage that was rerun changes its readers' fingerprints)."""
    options, inputs = {}, dict(extra_inputs or {})
    for f in flat_fields(type(cfg)):
        value = f.get(cfg)
        if f.wired and f.learns and f.name not in ("seed", "dtype", "autocast", "device", "progress", "overwrite"):
            if f.name != "out" and value:
                for i, v in enumerate(value if isinstance(value, list) else [value]):  # e.g. several --reward
                    inputs[f"{f.name}[{i}]" if isinstance(value, list) else f.name] = re.sub(r"@[0-9.eE+-]+$", "", v)
        elif f.name == "autocast" and value == "off":
            continue  # float32, as every stage ran before --autocast: their finished stages stay reusable
        elif f.name not in NOT_LEARNED and f.learns:
            options[f.name] = value
    return {"options": options, "inputs": {k: content_id(v) if contents else None for k, v in inputs.items()}}


def check_run_dir(out: Path, inputs: list[str], ours=lambda d: (d / FINGERPRINTS).is_file()) -> None:
    """OUT may be absent, empty, or a pipeline run (`ours`: it holds fingerprints.json, written first); a file or a
    directory with anything else in it is refused, before any stage runs: nothing the user made is replaced."""
    check_place(out, [x for x in inputs if x], "--out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not ours(out):
        raise ValueError(f"--out {out} is a directory with other files in it (not a pipeline run); refusing to "
                         f"replace them: choose a new --out")


# The headline numbers a stage hands on (to the stages after it and to the report): never NaN or inf.
HEADLINE = ("toxicity_rate", "gold_reward", "rm_reward", "kl_to_reference", "pretrain_loss", "objective/score",
            "objective/kl", "objective/gold", "val_loss", "val_loss_best")


def check_finite(what: str, result: dict) -> None:
    numbers = {**result, **(result.get("final") or {})}
    bad = next((k for k in HEADLINE if isinstance(numbers.get(k), float) and not math.isfinite(numbers[k])), None)
    if bad is not None:
        raise NonFiniteError(f"pipeline: {what}: {bad} is {numbers[bad]}; stopped before it reaches the next stage "
                             f"and the report (change the stage's options and rerun with --rerun-changed)")


class Stages:
    """The run directory's record of finished stages, and the reuse rule."""

    def __init__(self, out: Path, rerun_changed: bool):
        self.out, self.rerun_changed = out, rerun_changed
        f = out / FINGERPRINTS
        self.saved = json.loads(f.read_text()) if f.is_file() else {}

    def check_options(self, key: str, d: Path, fp: dict) -> None:
        """Before anything runs: a finished stage whose options changed is refused (unless --rerun-changed)."""
        old = self.saved.get(key)
        if old is None or not d.exists() or self.rerun_changed:
            return
        diff = differences({"options": old["options"], "inputs": {}}, {"options": fp["options"], "inputs": {}},
                           lambda k: f"{key.split('/')[0]}.{k}")
        if diff:
            raise self._changed(key, d, diff)

    def _changed(self, key: str, d: Path, diff: list[str]) -> ValueError:
        return ValueError(f"pipeline: the finished stage {key} in {d} was made with other settings ({'; '.join(diff)});"
                          f" pass --rerun-changed to recompute it and the stages after it, or choose a new --out")

    def reusable(self, key: str, d: Path, fp: dict) -> bool:
        """True: reuse d. False: (re)compute it (a stale d is removed first, with --rerun-changed)."""
        if not d.exists():
            return False
        old = self.saved.get(key)
        if old is None:  # finished before fingerprints were recorded (or killed just before): adopt it
            self.record(key, fp)
            return True
        diff = differences(old, fp, lambda k: f"{key.split('/')[0]}.{k}")
        if not diff:
            return True
        if not self.rerun_changed:
            raise self._changed(key, d, diff)
        console.print(f"[yellow]• {key}: {'; '.join(diff)}: recomputing[/]")
        if d.is_dir():
            shutil.rmtree(d)
        else:
            d.unlink()
        return False

    def record(self, key: str, fp: dict) -> None:
        self.saved[key] = fp
        self.record_all()

    def record_all(self) -> None:
        write_json(self.out / FINGERPRINTS, self.saved)


def _stage(stages: Stages, name: str, d: Path, fp: dict, fn, show: list[str]) -> dict:
    """Run stage `name` (see stages.py) into `d`, or reuse it when `d` holds the same finished stage."""
    title = BY_NAME[name].title
    if _finished(d) is not None and stages.reusable(name, d, fp):
        console.print(f"[dim]• {title}: reused {d}[/]")
        check_finite(name, _finished(d))
        return _finished(d)
    console.rule(f"[bold]{title}")
    t0 = time.time()
    summary = fn()
    check_finite(name, summary)
    stages.record(name, fp)
    shown = ", ".join(f"{k}={_fmt(summary[k])}" for k in show if k in summary)
    console.print(f"[bold green]✓ {title}[/] {shown} [dim]({time.time() - t0:.0f}s)[/]")
    return summary


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items() if not isinstance(x, dict)) + "}"
    return str(v)


# stages trained by the RL driver
RL_STAGES = ("ppo_ptx", "ppo_gold", "ppo", "ppo_beta0", "pg", "pg_reuse", "grpo", "rloo")


def plan(cfg: PipelineConfig, out: Path) -> dict:
    """Every stage's config, paths filled in: name → config (the rankings stage: its LabelSettings)."""
    wdir = out / "world"
    uses_world = not all([cfg.data.demos, cfg.data.prompts_train, cfg.data.prompts_eval]) or not cfg.data.rankings
    data = {k: getattr(cfg.data, k) for k in dataclasses.asdict(cfg.data)}
    defaults = {"demos": "demos.jsonl", "prompts_train": "prompts_train.jsonl", "prompts_eval": "prompts_eval.jsonl",
                "pretrain_text": "corpus.jsonl", "pretrain_val": "corpus_val.jsonl", "bias_probes": "bias_probes.jsonl"}
    for k, f in defaults.items():
        data[k] = data[k] or (str(wdir / f) if uses_world else None)
    judge_dir = str(wdir) if uses_world else None
    # flat options of RunOptions; autocast as it will run (auto: bf16 on this machine or not), so that a stage made
    # with the other one is not reused for it
    common = {"seed": cfg.seed, "device": cfg.device, "dtype": cfg.dtype,
              "autocast": resolve_autocast(cfg.autocast, resolve_device(cfg.device), cfg.dtype)}
    p: dict = {"data": data, "judge": judge_dir}
    if uses_world:
        p["world"] = dataclasses.replace(cfg.world, out=str(wdir), seed=cfg.seed)
    pretrained = cfg.base_model or str(out / "pretrained")
    if not cfg.base_model:
        p["pretrained"] = dataclasses.replace(cfg.pretrain, corpus=data["pretrain_text"], val_corpus=data["pretrain_val"],
                                              out=pretrained, seed=cfg.seed, autocast=common["autocast"])
    sdir, rdir = str(out / "sft"), str(out / "reward")
    p["sft"] = dataclasses.replace(cfg.sft, model=pretrained, data=data["demos"], out=sdir, **common)
    rankings = cfg.data.rankings or str(out / "rankings" / "rankings.jsonl")
    if not cfg.data.rankings:
        p["rankings"] = cfg.label
    p["reward"] = dataclasses.replace(cfg.reward, model=sdir, data=rankings, demos=data["demos"], out=rdir, **common)
    rl = dict(policy=sdir, reward=[rdir], prompts=data["prompts_train"], judge=judge_dir, ptx_data=data["pretrain_text"],
              **common)
    p["ppo_ptx"] = dataclasses.replace(cfg.ppo, out=str(out / "ppo_ptx"), **rl)
    if cfg.compare:
        if judge_dir:  # the "perfect reward model" line: the hidden judge itself as the reward (value init: our RM)
            p["ppo_gold"] = dataclasses.replace(cfg.ppo, out=str(out / "ppo_gold"),
                                                **{**rl, "reward": [f"gold:{judge_dir}"], "value": rdir})
        p["ppo"] = dataclasses.replace(cfg.ppo, out=str(out / "ppo"), **{**rl, "ptx_coef": 0.0})
        p["ppo_beta0"] = dataclasses.replace(cfg.ppo, out=str(out / "ppo_beta0"), **{**rl, "ptx_coef": 0.0, "beta": 0.0})
        p["pg"] = dataclasses.replace(cfg.pg, out=str(out / "pg"), episodes=cfg.ppo.episodes, **{**rl, "ptx_coef": 0.0})
        # claim 3 as the article states it: the same PG loss taking PPO's several steps per batch, without its clip
        p["pg_reuse"] = dataclasses.replace(p["pg"], out=str(out / "pg_reuse"), epochs=cfg.ppo.ppo_epochs,
                                            minibatch_size=cfg.ppo.minibatch_size)
        # the critic-free methods at PPO's number of sampled episodes; DPO on the same rankings as the reward model
        for name in ("grpo", "rloo"):
            p[name] = dataclasses.replace(getattr(cfg, name), out=str(out / name), episodes=cfg.ppo.episodes,
                                          **{**rl, "ptx_coef": 0.0})
        p["dpo"] = dataclasses.replace(cfg.dpo, policy=sdir, data=rankings, out=str(out / "dpo"), **common)
    for name in RL_STAGES:  # a section's eval_every: held-out scores and completions during training
        if name in p and p[name].eval_every:
            p[name].eval_prompts = data["prompts_eval"]
    evaluated = ["pretrained", "sft"] + [n for n in RL_STAGES + ("dpo",) if n in p]
    p["eval"] = {name: dataclasses.replace(cfg.eval, model=pretrained if name == "pretrained" else str(out / name),
                                           prompts=data["prompts_eval"], reference=sdir, reward=[rdir], world=judge_dir,
                                           pretrain_text=data["pretrain_val"], bias_probes=data["bias_probes"],
                                           device=cfg.device, out=None, judge=_judges(name, judge_dir, rdir),
                                           # the stereotyped-reply rate reads the world's describe prompts
                                           stereotype_samples=cfg.eval.stereotype_samples if judge_dir else 0)
                 for name in evaluated}
    return p


def preflight(cfg: PipelineConfig, out: Path) -> None:
    """Every section checked before the first stage runs, those only --compare trains included (a mistake in the
    grpo section is refused now, not after the world, SFT, labels and the reward model have run)."""
    validate_pipeline(cfg, plan(dataclasses.replace(cfg, compare=True), out))


def _judges(stage: str, judge_dir: str | None, rdir: str) -> str | None:
    """The judges of a stage's win rate against SFT: the world's gold judge and the reward model."""
    return None if stage == "sft" else ",".join((["gold"] if judge_dir else []) + [rdir])


def _label_fingerprint(cfg: PipelineConfig, p: dict, contents: bool) -> dict:
    inputs = {"sft": p["sft"].out, "prompts_train": p["data"]["prompts_train"], "world": p["judge"]}
    if cfg.label.demo_prompts:
        inputs["demos"] = p["data"]["demos"]
    if cfg.label.pretrained_share > 0:
        inputs["pretrained"] = p["pretrained"].out if "pretrained" in p else cfg.base_model
    return {"options": {**to_flat(cfg.label), "seed": cfg.seed},
            "inputs": {k: content_id(v) if contents else None for k, v in inputs.items()}}


def run_pipeline(cfg: PipelineConfig, out: str | Path, rerun_changed: bool = False) -> dict:
    t_start = time.time()
    out = Path(out)
    p = plan(cfg, out)
    preflight(cfg, out)  # every section, before the first stage runs
    stages = Stages(out, rerun_changed)
    trained = [n for n in ("world", "pretrained", "sft", "reward", *RL_STAGES, "dpo") if n in p]
    for name in trained:  # a changed option is refused now, not after the stages before it ran
        stages.check_options(name, out / name, stage_fingerprint(p[name], contents=False))
    if "rankings" in p:
        stages.check_options("rankings", out / "rankings", _label_fingerprint(cfg, p, False))
    for name, ecfg in p["eval"].items():
        stages.check_options(f"eval/{name}", out / "eval" / f"{name}.json", stage_fingerprint(ecfg, contents=False))
    check_run_dir(out, [cfg.base_model, *dataclasses.asdict(cfg.data).values()])
    lock = OutputLock(out).acquire()  # one pipeline per run directory
    try:
        return _run(cfg, out, p, stages, t_start)
    finally:
        lock.release()


def _run(cfg: PipelineConfig, out: Path, p: dict, stages: Stages, t_start: float) -> dict:
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
    from .world.labelers import simulate_rankings, split_share

    out.mkdir(parents=True, exist_ok=True)
    for name in (FINGERPRINTS, "config.yaml", "report.json", "report.html", "rankings",
                 *(f"eval/{n}.json" for n in p["eval"])):  # what a killed pipeline left half-written
        clean_temporaries(out / name)
    if not (out / FINGERPRINTS).is_file():  # first: it marks OUT as a pipeline run
        stages.record_all()
    atomic_write_text(out / "config.yaml", dump_config(cfg, settable_only=True))  # rerun: `--config OUT/config.yaml`
    data, judge_dir = p["data"], p["judge"]

    def run(name, fn, show):
        return _stage(stages, name, out / name, stage_fingerprint(p[name]), fn, show)

    # World (embedded default) or the user's own data; step 0: tokenizer + tiny model, unless the user brings one.
    if "world" in p:
        run("world", lambda: generate_world(out / "world", p["world"]),
            ["corpus", "demos", "prompts_train", "prompts_eval"])
    stages_dirs: dict[str, str] = {"pretrained": cfg.base_model} if cfg.base_model else {}
    if "pretrained" in p:
        run("pretrained", lambda: pretrain(p["pretrained"]), ["val_perplexity", "parameters"])
        stages_dirs["pretrained"] = p["pretrained"].out

    # Step 1: SFT.
    run("sft", lambda: sft(p["sft"]), ["val_loss_start", "val_loss_best"])
    sdir = Path(p["sft"].out)
    stages_dirs["sft"] = str(sdir)

    # Rankings: exported human rankings, or simulated labelers on SFT samples.
    if "rankings" in p:
        ldir = out / "rankings"

        def label():
            from .data import read_demos, read_prompts, write_jsonl
            from .models import load_causal_lm, load_tokenizer

            t0 = time.time()
            ls = cfg.label
            prompts = read_prompts(data["prompts_train"])
            if ls.demo_prompts:  # more questions for the reward model, in one seeded order
                prompts += [d.prompt for d in read_demos(data["demos"])]
                random.Random(cfg.seed).shuffle(prompts)
            prompts = prompts[: ls.n_prompts]
            dev = resolve_device(cfg.device)
            judge, tok = GoldJudge.from_world(judge_dir), load_tokenizer(sdir)
            to_sft, to_pretrained = split_share(prompts, ls.pretrained_share)
            recs = []
            for policy, model_dir, part, seed in (("sft", sdir, to_sft, cfg.seed),
                                                  ("pretrained", stages_dirs["pretrained"], to_pretrained,
                                                   cfg.seed + 7919)):
                if part:  # each policy's samples, ranked; the record says whose they are
                    recs += [{**r, "policy": policy} for r in simulate_rankings(
                        load_causal_lm(model_dir, dev), tok, part, judge, k=ls.k, temperature=ls.temperature,
                        n_labelers=ls.labelers, labeler_bias_std=ls.labeler_bias_std,
                        sample_temperature=ls.sample_temperature, seed=seed)]
            with atomic_dir(ldir) as tmp:
                write_jsonl(tmp / "rankings.jsonl", recs)
                summary = {"stage": "rankings", "rankings": len(recs), "k": ls.k, "seconds": time.time() - t0}
                write_json(tmp / "summary.json", summary)
            return summary
        _stage(stages, "rankings", ldir, _label_fingerprint(cfg, p, True), label, ["rankings", "k"])

    # Step 2: reward model.
    rm_summary = run("reward", lambda: train_reward_model(p["reward"]), ["held_out", "demo_score_mean"])

    # Step 3: PPO-ptx, and the comparison runs.
    algorithms = {"ppo_ptx": PPO, "ppo_gold": PPO, "ppo": PPO, "ppo_beta0": PPO, "pg": PolicyGradient,
                  "pg_reuse": PolicyGradient, "grpo": GRPO, "rloo": RLOO}
    for name in RL_STAGES:
        if name in p:
            run(name, lambda name=name: train_rl(p[name], algorithms[name]), ["final", "seconds"])
            stages_dirs[name] = p[name].out
    if "dpo" in p:
        run("dpo", lambda: dpo(p["dpo"]), ["final", "seconds"])
        stages_dirs["dpo"] = p["dpo"].out

    # Evaluation of every stage on the held-out prompts.
    evals = {}
    for name in stages_dirs:
        ecfg, f = p["eval"][name], out / "eval" / f"{name}.json"
        fp = stage_fingerprint(ecfg)
        if f.is_file() and stages.reusable(f"eval/{name}", f, fp):
            evals[name] = json.loads(f.read_text())
            check_finite(f"eval/{name}", evals[name])
            continue
        console.print(f"[bold]eval[/] {name} …")
        evals[name] = evaluate(ecfg)
        check_finite(f"eval/{name}", evals[name])
        write_json(f, evals[name])
        stages.record(f"eval/{name}", fp)
        e = evals[name]
        console.print(f"[green]✓ eval {name}[/] toxicity={e['toxicity_rate']:.3f}"
                      + (f" gold={e['gold_reward']:.3f}" if "gold_reward" in e else "")
                      + f" rm={e.get('rm_reward', float('nan')):.3f} kl={e.get('kl_to_reference', 0):.2f}")

    from .report import write_report

    report = write_report(out, stages_dirs, evals, rm_summary, seconds=time.time() - t_start, peak_rss_mb=peak_rss_mb())
    console.print(f"[bold green]report:[/] {out / 'report.html'}  ({out / 'report.json'})")
    return report


def run_seeds(cfg: PipelineConfig, out: str | Path, seeds: int, rerun_changed: bool = False) -> dict:
    """The pipeline once per seed (cfg.seed, cfg.seed + 1, …) in OUT/seed-<k>/, then one report over them:
    every stage's metrics as mean ± sd, and each claim with the number of seeds it holds on."""
    from .report import write_seeds_report

    out = Path(out)
    if (out / FINGERPRINTS).is_file():
        raise ValueError(f"--out {out} holds a one-seed pipeline run; --seeds writes OUT/seed-<k>/ and its own report: "
                         f"choose a new --out")
    check_run_dir(out, [cfg.base_model, *dataclasses.asdict(cfg.data).values()],
                  ours=lambda d: any((s / FINGERPRINTS).is_file() for s in d.glob("seed-*")))
    runs = {cfg.seed + i: dataclasses.replace(cfg, seed=cfg.seed + i) for i in range(seeds)}
    for seed, c in runs.items():  # every seed's plan is checked before the first stage of any runs
        preflight(c, out / f"seed-{seed}")
    reports = {}
    for seed, c in runs.items():
        console.rule(f"[bold]seed {seed}")
        reports[seed] = run_pipeline(c, out / f"seed-{seed}", rerun_changed)
    agg = write_seeds_report(out, reports)
    console.print(f"[bold green]report over seeds {list(runs)}:[/] {out / 'report.html'}  ({out / 'report.json'})")
    return agg
