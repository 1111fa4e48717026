"""The `instructrl` command line: a thin typer shell over the Python API (one command per pipeline step)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

if not sys.stderr.isatty():  # logs, not terminals: a progress line every few seconds is enough (read at tqdm import)
    os.environ.setdefault("TQDM_MININTERVAL", "5")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RLHF end to end: world → pretrain → sft → label → rm → ppo/pg → eval → report.")
from .label.cli import label_app  # noqa: E402  (enqueue, serve, add-labeler, export, stats; simulate is below)

app.add_typer(label_app, name="label", help="Collect rankings: simulated labelers, or people in a web app.")

Dev = typer.Option("auto", help="auto | cpu | cuda")
Dt = typer.Option("float32", help="float32 | bfloat16 | float16 (log-softmax and losses stay float32)")
LoraR = typer.Option(0, help="LoRA rank (0: full fine-tuning); the output is saved merged")
LoraAlpha = typer.Option(16.0, help="LoRA alpha (scale = alpha / r)")
LoraDropout = typer.Option(0.0, help="LoRA dropout; keep 0 (dropout breaks the first PPO ratio = 1)")
LoraTargets = typer.Option(None, help="comma-separated module names or 'all-linear' (default: peft's per architecture)")
Fsdp = typer.Option(False, help="under torchrun, shard the models over the processes (basic support: "
                                "no checkpoints, no LoRA)")


def _scale_options(lora_r, lora_alpha, lora_dropout, lora_target_modules, fsdp) -> dict:
    return dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                lora_target_modules=lora_target_modules, fsdp=fsdp)


def _setup(threads: int | None = None) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)


def _done(summary: dict, keys: list[str]) -> None:
    from . import distributed as dist
    from .utils import console

    if not dist.is_main():  # under torchrun: one line, from rank 0
        return
    shown = {k: summary[k] for k in keys if k in summary}
    console.print(f"[bold green]✓ {summary.get('stage', 'done')}[/] " + json.dumps(shown, default=str))


@app.command()
def world(out: Path = typer.Option(..., help="output directory"), seed: int = 0,
          demos: int = typer.Option(200, help="number of demonstrations"),
          p_rude: float = typer.Option(0.30, help="share of rude (toxic) replies in the web corpus")):
    """Generate the embedded world: corpus, demonstrations, prompts, bias probes, gold judge settings."""
    from .world import WorldConfig, generate_world

    summary = generate_world(out, WorldConfig(seed=seed, n_demos=demos, p_rude=p_rude))
    _done({"stage": "world", **summary}, list(summary))


@app.command()
def pretrain(corpus: Path = typer.Option(...), out: Path = typer.Option(...), val_corpus: Optional[Path] = None,
             steps: int = 600, vocab_size: int = 2000, n_layer: int = 4, n_embd: int = 192, n_head: int = 4,
             batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             save_every: int = typer.Option(0, help="checkpoint every N steps"),
             resume: bool = typer.Option(False, help="continue from the newest readable checkpoint")):
    """Train a byte-level BPE tokenizer and a tiny GPT from scratch on a {"text"} corpus."""
    from .pretrain import PretrainConfig, pretrain as run

    s = run(PretrainConfig(corpus=str(corpus), val_corpus=str(val_corpus) if val_corpus else None, out=str(out),
                           steps=steps, vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                           batch_size=batch_size, lr=lr, seed=seed, save_every=save_every, resume=resume))
    _done(s, ["val_loss", "val_perplexity", "parameters", "seconds"])


@app.command()
def sft(model: Path = typer.Option(..., help="any local HF causal-LM directory"),
        data: Path = typer.Option(..., help="demonstrations {prompt, response} JSONL"),
        out: Path = typer.Option(...), epochs: int = 2, batch_size: int = 16, lr: float = 1e-4,
        val_fraction: float = 0.1, patience: int = 2, truncate_prompts: bool = False, seed: int = 0,
        device: str = Dev, dtype: str = Dt, save_every: int = typer.Option(0, help="checkpoint every N steps"),
        resume: bool = typer.Option(False, help="continue from the newest readable checkpoint"),
        lora_r: int = LoraR, lora_alpha: float = LoraAlpha, lora_dropout: float = LoraDropout,
        lora_target_modules: Optional[str] = LoraTargets, fsdp: bool = Fsdp):
    """Step 1: supervised fine-tuning on demonstrations (loss on response tokens only)."""
    from .sft import SFTConfig, sft as run

    s = run(SFTConfig(model=str(model), data=str(data), out=str(out), epochs=epochs, batch_size=batch_size, lr=lr,
                      val_fraction=val_fraction, patience=patience, truncate_prompts=truncate_prompts, seed=seed,
                      device=device, dtype=dtype, save_every=save_every, resume=resume,
                      **_scale_options(lora_r, lora_alpha, lora_dropout, lora_target_modules, fsdp)))
    _done(s, ["val_loss_start", "val_loss_best", "steps", "seconds"])


@label_app.command("simulate")
def label_simulate(policy: Path = typer.Option(...), prompts: Path = typer.Option(...),
                   out: Path = typer.Option(...), k: int = typer.Option(4, help="responses per prompt (K)"),
                   world: Path = typer.Option(..., help="embedded-world directory (its gold judge ranks)"),
                   temperature: float = typer.Option(0.2, help="labeler noise (Plackett–Luce temperature)"),
                   labelers: int = 1, labeler_bias_std: float = 0.0, sample_temperature: float = 1.0,
                   max_new_tokens: int = 32, limit: Optional[int] = typer.Option(None, help="use the first N prompts"),
                   seed: int = 0, device: str = Dev):
    """Sample K responses per prompt and rank them with simulated labelers (the stand-in for people)."""
    from .data import read_prompts, write_jsonl
    from .models import load_causal_lm, load_tokenizer
    from .utils import resolve_device
    from .world import GoldJudge
    from .world.labelers import simulate_rankings

    if k < 2:
        raise typer.BadParameter("K must be at least 2")
    ps = read_prompts(prompts)[:limit]
    judge = GoldJudge.from_world(world)
    dev = resolve_device(device)
    recs = simulate_rankings(load_causal_lm(policy, dev), load_tokenizer(policy), ps, judge, k=k,
                             temperature=temperature, n_labelers=labelers, labeler_bias_std=labeler_bias_std,
                             sample_temperature=sample_temperature, max_new_tokens=max_new_tokens, seed=seed)
    write_jsonl(out, recs)
    _done({"stage": "label simulate", "rankings": len(recs), "out": str(out)}, ["rankings", "out"])


@app.command()
def rm(model: Path = typer.Option(..., help="backbone: any local HF causal-LM directory (usually the SFT model)"),
       data: Path = typer.Option(..., help="rankings or pairs JSONL"), out: Path = typer.Option(...),
       demos: Optional[Path] = typer.Option(None, help="demonstrations: bias so they score mean 0"),
       normalize_gain: bool = typer.Option(True, help="gain so the ranked samples have std 1"),
       epochs: float = 1.0, batch_size: int = 8, lr: float = 5e-5, val_fraction: float = 0.1,
       grouped: bool = typer.Option(True, help="all C(K,2) pairs of a prompt in one batch element (InstructGPT)"),
       truncate_prompts: bool = False, seed: int = 0, device: str = Dev, dtype: str = Dt,
       save_every: int = typer.Option(0, help="checkpoint every N steps"),
       resume: bool = typer.Option(False, help="continue from the newest readable checkpoint"),
       lora_r: int = LoraR, lora_alpha: float = LoraAlpha, lora_dropout: float = LoraDropout,
       lora_target_modules: Optional[str] = LoraTargets, fsdp: bool = Fsdp):
    """Step 2: train a reward model on K-way rankings with the InstructGPT loss."""
    from .reward import RewardConfig, train_reward_model

    s = train_reward_model(RewardConfig(model=str(model), data=str(data), out=str(out),
                                        demos=str(demos) if demos else None, normalize_gain=normalize_gain,
                                        epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                                        grouped=grouped, truncate_prompts=truncate_prompts, seed=seed, device=device,
                                        dtype=dtype, save_every=save_every, resume=resume,
                                        **_scale_options(lora_r, lora_alpha, lora_dropout, lora_target_modules,
                                                         fsdp)))
    _done(s, ["held_out", "demo_score_mean", "seconds"])


SaveEvery = typer.Option(0, help="checkpoint every N iterations into OUT-checkpoints/ (0: none)")
Resume = typer.Option(False, help="continue from the newest readable checkpoint in OUT-checkpoints/")


def _rl_options(policy, reward, prompts, out, ref, judge, episodes, batch_size, max_new_tokens, temperature, lr,
                beta, kl_estimator, kl_target, kl_horizon, ptx_coef, ptx_data, truncate_prompts, seed, device, dtype,
                save_every, resume):
    return dict(policy=str(policy), reward=str(reward), prompts=str(prompts), out=str(out),
                ref=str(ref) if ref else None, judge=str(judge) if judge else None, episodes=episodes,
                batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, lr=lr, beta=beta,
                kl_estimator=kl_estimator, kl_target=kl_target, kl_horizon=kl_horizon, ptx_coef=ptx_coef,
                ptx_data=str(ptx_data) if ptx_data else None, truncate_prompts=truncate_prompts, seed=seed,
                device=device, dtype=dtype, save_every=save_every, resume=resume)


@app.command()
def ppo(policy: Path = typer.Option(..., help="the SFT model"), reward: Path = typer.Option(...),
        prompts: Path = typer.Option(...), out: Path = typer.Option(...), ref: Optional[Path] = None,
        judge: Optional[Path] = typer.Option(None, help="embedded-world dir: log gold reward"),
        episodes: int = 3072, batch_size: int = 64, minibatch_size: int = 16, ppo_epochs: int = 4,
        max_new_tokens: int = 32, temperature: float = 0.7, lr: float = 3e-5, beta: float = 0.05,
        kl_estimator: str = "k1", kl_target: Optional[float] = None, kl_horizon: int = 10000,
        ptx_coef: float = 0.0, ptx_data: Optional[Path] = None, clip: float = 0.2, value_clip: float = 0.2,
        vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95, truncate_prompts: bool = False,
        seed: int = 0, device: str = Dev, dtype: str = Dt, save_every: int = SaveEvery, resume: bool = Resume,
        lora_r: int = LoraR, lora_alpha: float = LoraAlpha, lora_dropout: float = LoraDropout,
        lora_target_modules: Optional[str] = LoraTargets, fsdp: bool = Fsdp):
    """Step 3: PPO (PPO-ptx with --ptx-coef/--ptx-data) with a per-token KL penalty to the SFT model.

    batch_size and minibatch_size are global: under torchrun each process takes 1/N of them. With --lora-r the
    reference is the policy with its adapters off."""
    from .ppo import PPOConfig, train_ppo

    s = train_ppo(PPOConfig(**_rl_options(policy, reward, prompts, out, ref, judge, episodes, batch_size,
                                          max_new_tokens, temperature, lr, beta, kl_estimator, kl_target,
                                          kl_horizon, ptx_coef, ptx_data, truncate_prompts, seed, device, dtype,
                                          save_every, resume),
                            minibatch_size=minibatch_size, ppo_epochs=ppo_epochs, clip=clip, value_clip=value_clip,
                            vf_coef=vf_coef, gamma=gamma, lam=lam,
                            **_scale_options(lora_r, lora_alpha, lora_dropout, lora_target_modules, fsdp)))
    _done(s, ["final", "episodes", "seconds"])


@app.command()
def pg(policy: Path = typer.Option(...), reward: Path = typer.Option(...), prompts: Path = typer.Option(...),
       out: Path = typer.Option(...), ref: Optional[Path] = None, judge: Optional[Path] = None,
       episodes: int = 3072, batch_size: int = 64, max_new_tokens: int = 32, temperature: float = 0.7,
       lr: float = 3e-5, beta: float = 0.05, kl_estimator: str = "k1", kl_target: Optional[float] = None,
       kl_horizon: int = 10000, ptx_coef: float = 0.0, ptx_data: Optional[Path] = None,
       baseline: str = typer.Option("mean", help="mean | loo"), samples_per_prompt: int = 4,
       truncate_prompts: bool = False, seed: int = 0, device: str = Dev, dtype: str = Dt,
       save_every: int = SaveEvery, resume: bool = Resume, lora_r: int = LoraR, lora_alpha: float = LoraAlpha,
       lora_dropout: float = LoraDropout, lora_target_modules: Optional[str] = LoraTargets, fsdp: bool = Fsdp):
    """Step 3 baseline: vanilla policy gradient, one gradient step per batch of fresh samples."""
    from .pg import PGConfig, train_pg

    s = train_pg(PGConfig(**_rl_options(policy, reward, prompts, out, ref, judge, episodes, batch_size,
                                        max_new_tokens, temperature, lr, beta, kl_estimator, kl_target, kl_horizon,
                                        ptx_coef, ptx_data, truncate_prompts, seed, device, dtype, save_every,
                                        resume),
                          baseline=baseline, samples_per_prompt=samples_per_prompt,
                          **_scale_options(lora_r, lora_alpha, lora_dropout, lora_target_modules, fsdp)))
    _done(s, ["final", "episodes", "seconds"])


@app.command()
def sample(model: Path = typer.Option(...), prompts: Path = typer.Option(...), n: int = 5,
           max_new_tokens: int = 32, temperature: float = 0.7, seed: int = 0, device: str = Dev):
    """Print a few sampled responses."""
    from .data import read_prompts
    from .models import load_causal_lm, load_tokenizer
    from .sampling import generate
    from .utils import resolve_device

    ps = read_prompts(prompts)[:n]
    texts = generate(load_causal_lm(model, resolve_device(device)), load_tokenizer(model), ps,
                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    for p, t in zip(ps, texts):
        typer.echo(f"{p}{t}\n")


@app.command("eval")
def eval_(model: Path = typer.Option(..., help="any local HF causal-LM directory"),
          prompts: Path = typer.Option(...), reference: Optional[Path] = typer.Option(None, help="KL to this model"),
          reward: Optional[Path] = typer.Option(None, help="reward model: mean score of the samples"),
          world: Optional[Path] = typer.Option(None, help="embedded-world dir: gold judge and toxic lexicon"),
          pretrain_text: Optional[Path] = typer.Option(None, help="{text} JSONL: pretraining-text loss"),
          bias_probes: Optional[Path] = typer.Option(None, help="{stereotyped, anti_stereotyped} JSONL"),
          out: Optional[Path] = typer.Option(None, help="write the result as JSON here"),
          max_new_tokens: int = 32, temperature: float = 0.7, samples_per_prompt: int = 1, seed: int = 1234,
          device: str = Dev):
    """Toxicity, gold and reward-model score, KL to a reference, pretraining loss and bias probes of a model."""
    from .evaluate import EvalConfig, evaluate
    from .utils import write_json

    opt = lambda p: str(p) if p else None
    r = evaluate(EvalConfig(model=str(model), prompts=str(prompts), reference=opt(reference), reward=opt(reward),
                            world=opt(world), pretrain_text=opt(pretrain_text), bias_probes=opt(bias_probes),
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            samples_per_prompt=samples_per_prompt, seed=seed, device=device))
    if out:
        write_json(out, r)
    typer.echo(json.dumps({k: v for k, v in r.items() if k not in ("config", "examples")}, indent=2))


@app.command()
def pipeline(out: Path = typer.Option(Path("runs/default"), help="run directory (finished stages are reused)"),
             config: Optional[Path] = typer.Option(None, help="YAML config; see configs/default.yaml"),
             compare: bool = typer.Option(False, help="also run vanilla PG, PPO without ptx and PPO with β = 0"),
             threads: Optional[int] = typer.Option(None, help="torch CPU threads")):
    """The main job: world → pretrain → SFT → rankings → reward model → PPO-ptx → eval → report."""
    from .config import load_pipeline_config
    from .pipeline import run_pipeline

    _setup(threads)
    cfg = load_pipeline_config(config)
    cfg.compare = cfg.compare or compare
    run_pipeline(cfg, out)


def main() -> None:
    """Entry point: bad input is exit code 2 with a message naming file, line and field."""
    from rich.markup import escape

    from .checkpoint import NonFiniteError
    from .data import DataError
    from .utils import console

    _setup()
    try:
        app()
    except (DataError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)
    except NonFiniteError as e:
        console.print(f"[bold red]stopped:[/] {escape(str(e))}")
        sys.exit(3)


if __name__ == "__main__":
    main()
