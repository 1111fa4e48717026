"""The `instructrl` command line: a thin typer shell over the Python API (one command per pipeline step)."""
from __future__ import annotations

import inspect
import json
import os
import sys
import typing
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


def _cli_type(tp):
    """typer's spelling of a field type (`str | None` → Optional[str]; `list[str]` → List[str], a repeatable
    option)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return typing.List[args[0]]
    if type(None) in args:
        return Optional[next(a for a in args if a is not type(None))]
    return tp


def options_of(cls) -> list[inspect.Parameter]:
    """One CLI option per config field (option groups flat), help text from the field."""
    from .options import flat_fields

    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(f.type),
                              default=typer.Option(... if f.required else f.default, help=f.help))
            for f in flat_fields(cls)]


def config_command(name: str, cls, train, show: list[str], doc: str, app_=None) -> None:
    """Register `instructrl NAME`, whose options are the fields of config class `cls`, calling `train(cls(...))`."""
    def command(**options):
        _setup()
        _done(train(cls(**options)), show)

    params = options_of(cls)
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name
    (app_ or app).command(name)(command)


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
    if not keys:
        return
    shown = {k: summary[k] for k in keys if k in summary}
    console.print(f"[bold green]✓ {summary.get('stage', 'done')}[/] " + json.dumps(shown, default=str))


@label_app.command("simulate")
def label_simulate(policy: Path = typer.Option(...), prompts: Path = typer.Option(...),
                   out: Path = typer.Option(...), k: int = typer.Option(4, help="responses per prompt (K)"),
                   world: Path = typer.Option(..., help="embedded-world directory (its gold judge ranks)"),
                   temperature: float = typer.Option(0.2, help="labeler noise (Plackett–Luce temperature)"),
                   labelers: int = 1, labeler_bias_std: float = 0.0, sample_temperature: float = 1.0,
                   max_new_tokens: int = typer.Option(32, min=1),
                   limit: Optional[int] = typer.Option(None, min=1, help="use the first N prompts"),
                   seed: int = 0, device: str = Dev):
    """Sample K responses per prompt and rank them with simulated labelers (the stand-in for people)."""
    from .data import read_prompts, write_jsonl
    from .models import load_causal_lm, load_tokenizer
    from .outputs import check_file_output
    from .utils import resolve_device
    from .world import GoldJudge
    from .world.labelers import simulate_rankings

    if k < 2:
        raise typer.BadParameter("K must be at least 2")
    check_file_output(out, [str(policy), str(prompts), str(world)])  # before any model loads
    ps = read_prompts(prompts)[:limit]
    judge = GoldJudge.from_world(world)
    dev = resolve_device(device)
    recs = simulate_rankings(load_causal_lm(policy, dev), load_tokenizer(policy), ps, judge, k=k,
                             temperature=temperature, n_labelers=labelers, labeler_bias_std=labeler_bias_std,
                             sample_temperature=sample_temperature, max_new_tokens=max_new_tokens, seed=seed)
    write_jsonl(out, recs, overwrite=False)
    _done({"stage": "label simulate", "rankings": len(recs), "out": str(out)}, ["rankings", "out"])


@app.command()
def sample(model: Path = typer.Option(...), prompts: Path = typer.Option(...), n: int = typer.Option(5, min=1),
           max_new_tokens: int = typer.Option(32, min=1), temperature: float = typer.Option(0.7, min=0.0),
           seed: int = 0, device: str = Dev):
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


def _eval(cfg, out: Optional[str] = None) -> dict:
    from .evaluate import evaluate
    from .outputs import check_file_output, inputs_of
    from .utils import atomic_write_text

    if out:  # before the evaluation runs
        check_file_output(out, inputs_of(cfg))
    r = evaluate(cfg)
    if out:
        atomic_write_text(out, json.dumps(r, indent=2, ensure_ascii=False) + "\n", overwrite=False)
    typer.echo(json.dumps({k: v for k, v in r.items() if k not in ("config", "examples")}, indent=2))
    return r


def _register_steps() -> None:
    """The commands derived from the steps' config classes: `--help` lists every field."""
    from .dpo import DPOConfig, dpo
    from .evaluate import EvalConfig
    from .pretrain import PretrainConfig, pretrain
    from .reward import RewardConfig, train_reward_model
    from .rl import algorithms, train_rl
    from .sft import SFTConfig, sft
    from .world import WorldConfig, generate_world

    config_command("world", WorldConfig, lambda cfg: {"stage": "world", **generate_world(cfg.out, cfg)},
                   ["corpus", "demos", "prompts_train", "prompts_eval", "bias_probes"],
                   "Generate the embedded world: corpus, demonstrations, prompts, bias probes, gold judge settings.")
    config_command("pretrain", PretrainConfig, pretrain, ["val_loss", "val_perplexity", "parameters", "seconds"],
                   "Train a byte-level BPE tokenizer and a tiny GPT from scratch on a {\"text\"} corpus.")
    config_command("sft", SFTConfig, sft, ["val_loss_start", "val_loss_best", "steps", "seconds"],
                   "Step 1: supervised fine-tuning on demonstrations (loss on response tokens only).")
    config_command("rm", RewardConfig, train_reward_model, ["held_out", "demo_score_mean", "seconds"],
                   "Step 2: train a reward model on K-way rankings with the InstructGPT loss.")
    config_command("dpo", DPOConfig, dpo, ["final", "held_out", "seconds"],
                   "Offline DPO / IPO / conservative DPO on the rankings (no reward model, no sampling).")
    docs = {"ppo": "Step 3: PPO (PPO-ptx with --ptx-coef/--ptx-data) with a per-token KL penalty to the SFT model.",
            "pg": "Step 3 baseline: vanilla policy gradient, one gradient step per batch of fresh samples."}
    for name, algo in algorithms().items():
        config_command(name, algo.config, lambda cfg, algo=algo: train_rl(cfg, algo), ["final", "episodes", "seconds"],
                       docs.get(name, (algo.__doc__ or name).strip().splitlines()[0]) +
                       " batch sizes are global: under torchrun each process takes 1/N.")
    config_command("eval", EvalConfig, lambda cfg: _eval(cfg, cfg.out), [],
                   "Toxicity, gold and reward-model score, KL to a reference, pretraining loss and bias probes.")


_register_steps()


@app.command("serve-rm")
def serve_rm(reward: Path = typer.Option(..., help="reward-model directory (ours, or a Hugging Face sequence "
                                                  "classifier with one label)"),
             port: int = typer.Option(8000, help="TCP port"),
             host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
             batch_size: int = typer.Option(64, help="texts per forward pass"), device: str = Dev):
    """Serve a reward model over HTTP with OpenRLHF's remote-RM contract: POST {"query": [texts]} to / or
    /get_reward, get {"rewards": [floats]}. Use it from another run as --reward http://HOST:PORT/get_reward."""
    import uvicorn

    from .models import ScalarHeadModel, load_tokenizer
    from .rewards import rm_app
    from .utils import resolve_device

    model = ScalarHeadModel.from_pretrained(reward, resolve_device(device)).eval()
    uvicorn.run(rm_app(model, load_tokenizer(reward), batch_size), host=host, port=port, log_level="warning")


@app.command()
def pipeline(out: Path = typer.Option(Path("runs/default"), help="run directory (finished stages are reused)"),
             config: Optional[Path] = typer.Option(None, help="YAML config; see configs/default.yaml"),
             compare: bool = typer.Option(False, help="also run PPO-ptx with the gold judge as reward, PPO "
                                                       "without ptx, PPO with β = 0, vanilla PG, GRPO, RLOO and DPO"),
             seeds: int = typer.Option(1, min=1, help="run the whole pipeline for this many seeds (the config's seed, "
                                                      "+1, …) in OUT/seed-<k>/ and report mean ± sd over them"),
             threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
             rerun_changed: bool = typer.Option(False, help="recompute finished stages whose options or inputs "
                                                            "changed (default: stop, naming what changed)")):
    """The main job: world → pretrain → SFT → rankings → reward model → PPO-ptx → eval → report."""
    from .config import load_pipeline_config
    from .pipeline import run_pipeline, run_seeds

    _setup(threads)
    cfg = load_pipeline_config(config)
    cfg.compare = cfg.compare or compare
    if seeds > 1:
        run_seeds(cfg, out, seeds, rerun_changed)
    else:
        run_pipeline(cfg, out, rerun_changed)


def main() -> None:
    """Entry point. Exit codes (README, "Exit codes"): 0 done; 2 a user error (one line naming the file/line/field or
    the option; nothing written); 3 stopped on non-finite values (nothing written; the last good checkpoint kept);
    4 an outside failure (disk full, I/O or network error; one line naming the path, the last checkpoint kept);
    130 interrupted (Ctrl-C; the message says how to resume)."""
    from rich.markup import escape

    from .data import DataError
    from .optim import NonFiniteError
    from .run import Run
    from .utils import console

    _setup()
    try:
        code = app(standalone_mode=False)  # click's usage errors come here too: one line each, as ours
    except typer.TyperException as e:  # click's own (a usage error: exit 2)
        if not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        console.print(f"[bold red]error:[/] {escape(e.format_message())} (see "
                      f"`{ctx.command_path if ctx else 'instructrl'} --help`)")
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("[bold yellow]aborted[/]")
        sys.exit(1)
    except (DataError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)
    except NonFiniteError as e:
        console.print(f"[bold red]stopped:[/] {escape(str(e))}")
        sys.exit(3)
    except OSError as e:  # disk full, I/O, network: not the user's mistake, and nothing half-written is left
        where = f" writing {e.filename}" if e.filename else ""
        run = Run.current
        kept = f"; {run.out} was not written; {run.last_good()}" if run is not None else ""
        console.print(f"[bold red]failed:[/] {escape(f'{e.strerror or e}{where}{kept}')}")
        sys.exit(4)
    if code == 130:  # typer's exit code for Ctrl-C (KeyboardInterrupt)
        said = Run.current.interrupted() if Run.current is not None else "interrupted"
        console.print(f"[bold yellow]{escape(said)}[/]")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
