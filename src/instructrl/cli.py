"""The `instructrl` command line: a thin typer shell over the Python API (one command per pipeline step)."""
from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import typer
import typer.core

from .options import within

if not sys.stderr.isatty():  # logs, not terminals: a progress line every few seconds is enough (read at tqdm import)
    os.environ.setdefault("TQDM_MININTERVAL", "5")

RL_NOTE = " batch sizes are global: under torchrun each process takes 1/N."
STEPS = {  # the commands generated from a step's config class, in the order `instructrl --help` lists them
    "world": "Generate the embedded world: corpus, demonstrations, prompts, bias probes, gold judge settings.",
    "pretrain": "Train a byte-level BPE tokenizer and a tiny GPT from scratch on a {\"text\"} corpus.",
    "sft": "Step 1: supervised fine-tuning on demonstrations (loss on response tokens only).",
    "rm": "Step 2: train a reward model on K-way rankings with the InstructGPT loss.",
    "dpo": "Offline DPO / IPO / conservative DPO on the rankings (no reward model, no sampling).",
    "ppo": "Step 3: PPO (PPO-ptx with --ptx-coef/--ptx-data) with a per-token KL penalty to the SFT model." + RL_NOTE,
    "pg": "Step 3 baseline: vanilla policy gradient, one gradient step per batch of fresh samples." + RL_NOTE,
    "grpo": "Step 3 with GRPO: group-normalised advantages, clipped updates, no value model, KL in the loss." + RL_NOTE,
    "rloo": "Step 3 with RLOO: leave-one-out baseline over k samples per prompt, clipped updates over several "
            "epochs." + RL_NOTE,
    "eval": "Toxicity, gold and reward-model score, KL to a reference, pretraining loss and bias probes.",
}


class Commands(typer.core.TyperGroup):
    """A step's options come from its config class, whose module imports torch (seconds): `instructrl --help`
    lists the steps by their help alone, and a step's command is built when it is named."""

    def list_commands(self, ctx):
        return [*STEPS, *(name for name in super().list_commands(ctx) if name not in STEPS)]

    def get_command(self, ctx, name):
        if name in STEPS and name not in self.commands:  # listed, not run: its name and help are enough
            return typer.core.TyperCommand(name, help=STEPS[name])
        return super().get_command(ctx, name)

    def resolve_command(self, ctx, args):
        if args and args[0] in STEPS and args[0] not in self.commands:
            self.add_command(_step_commands().commands[args[0]])
        return super().resolve_command(ctx, args)


# rich_markup_mode=None: click's help layout, which puts a long option name on its own line and wraps the help;
# rich's table cuts names to fit the width (`--missing-eos-p…` at 80 columns).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=Commands,
                  rich_markup_mode=None,
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


CONFIG_FILE = "instructrl.config"  # ctx.meta key: (path, {option: value}) of a step's --config file
CONFIG_COMMANDS: dict[str, type] = {}  # command name → its config class (tests/test_bounds.py walks them)


def config_command(name: str, cls, train, show: list[str], doc: str, app_=None) -> None:
    """Register `instructrl NAME`, whose options are the fields of config class `cls`, calling `train(cls(...))`."""
    CONFIG_COMMANDS[name] = cls
    def command(ctx: typer.Context, **options):
        options.pop("config_file", None)  # read by read_config (typer passes its default, None, too)
        path, from_file = ctx.meta.get(CONFIG_FILE, (None, {}))
        # the file's values, but for the options given on the command line (its null too, which click's default
        # map reads as "no value")
        from_file = {k: v for k, v in from_file.items() if ctx.get_parameter_source(k).name != "COMMANDLINE"}
        options.update(from_file)
        cfg = cls(**options)
        try:
            cfg.validate()  # where the options are parsed: a bad value stops here, before torch and any model load
        except ValueError as e:
            from .config import blame_file

            raise (blame_file(e, path, from_file) if path else e) from None
        _setup()
        _done(train(cfg), show)

    def read_config(ctx: typer.Context, param, path: Optional[Path]):
        """--config FILE, read first (eager): its values are the defaults the command line overrides, and satisfy
        the required options."""
        if path is not None:
            from .config import load_step_options

            from_file = load_step_options(path, cls)
            ctx.meta[CONFIG_FILE] = (path, from_file)
            ctx.default_map = {**(ctx.default_map or {}), **from_file}

    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, "--config", metavar="FILE", is_eager=True,
                                                     expose_value=False, callback=read_config,
                                                     help="YAML of this step's options (keys as in a pipeline "
                                                          "section, plus paths); flags given override it")),
              *options_of(cls)]
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
                   out: Path = typer.Option(...),
                   k: int = typer.Option(4, help="responses per prompt (K)", callback=within(ge=2)),
                   world: Path = typer.Option(..., help="embedded-world directory (its gold judge ranks)"),
                   temperature: float = typer.Option(0.2, help="labeler noise (Plackett–Luce temperature)",
                                                     callback=within(ge=0)),
                   labelers: int = typer.Option(1, callback=within(ge=1)),
                   labeler_bias_std: float = typer.Option(0.0, callback=within(ge=0)),
                   sample_temperature: float = typer.Option(1.0, callback=within(gt=0)),
                   max_new_tokens: int = typer.Option(32, callback=within(ge=1)),
                   limit: Optional[int] = typer.Option(None, help="use the first N prompts", callback=within(ge=1)),
                   seed: int = typer.Option(0, callback=within(ge=0)), device: str = Dev):
    """Sample K responses per prompt and rank them with simulated labelers (the stand-in for people)."""
    from .data import read_prompts, write_jsonl
    from .models import load_causal_lm, load_tokenizer
    from .outputs import check_file_output
    from .utils import resolve_device
    from .world import GoldJudge
    from .world.labelers import simulate_rankings

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
def sample(model: Path = typer.Option(...), prompts: Path = typer.Option(...),
           n: int = typer.Option(5, callback=within(ge=1)), max_new_tokens: int = typer.Option(32, callback=within(ge=1)),
           temperature: float = typer.Option(0.7, callback=within(ge=0)),
           seed: int = typer.Option(0, callback=within(ge=0)), device: str = Dev):
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


def _register_steps(steps: typer.Typer) -> None:
    """The commands derived from the steps' config classes: `--help` lists every field."""
    from .dpo import DPOConfig, dpo
    from .evaluate import EvalConfig
    from .pretrain import PretrainConfig, pretrain
    from .reward import RewardConfig, train_reward_model
    from .rl import algorithms, train_rl
    from .sft import SFTConfig, sft
    from .world import WorldConfig, generate_world

    config_command("world", WorldConfig, lambda cfg: {"stage": "world", **generate_world(cfg.out, cfg)},
                   ["corpus", "demos", "prompts_train", "prompts_eval", "bias_probes"], STEPS["world"], steps)
    config_command("pretrain", PretrainConfig, pretrain, ["val_loss", "val_perplexity", "parameters", "seconds"],
                   STEPS["pretrain"], steps)
    config_command("sft", SFTConfig, sft, ["val_loss_start", "val_loss_best", "steps", "seconds"], STEPS["sft"], steps)
    config_command("rm", RewardConfig, train_reward_model, ["held_out", "demo_score_mean", "seconds"], STEPS["rm"],
                   steps)
    config_command("dpo", DPOConfig, dpo, ["final", "held_out", "seconds"], STEPS["dpo"], steps)
    for name, algo in algorithms().items():
        config_command(name, algo.config, lambda cfg, algo=algo: train_rl(cfg, algo), ["final", "episodes", "seconds"],
                       STEPS[name], steps)
    config_command("eval", EvalConfig, lambda cfg: _eval(cfg, cfg.out), [], STEPS["eval"], steps)


@functools.cache
def _step_commands():
    """The step commands, built once (importing every step, and with them torch)."""
    steps = typer.Typer(rich_markup_mode=None)
    _register_steps(steps)
    return typer.main.get_command(steps)


@app.command("serve-rm")
def serve_rm(reward: Path = typer.Option(..., help="reward-model directory (ours, or a Hugging Face sequence "
                                                  "classifier with one label)"),
             port: int = typer.Option(8000, callback=within(ge=0, le=65535), help="TCP port (0: any free one, printed)"),
             host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface; then "
                                                         "set a --token)"),
             batch_size: int = typer.Option(64, callback=within(ge=1, le=1024), help="texts per forward pass; a request is scored "
                                                                     "chunk by chunk, taking turns with the others"),
             max_body_bytes: int = typer.Option(8 << 20, callback=within(ge=1), help="larger request bodies are refused (413)"),
             max_queries: int = typer.Option(1024, callback=within(ge=1), help="requests with more queries are refused (413)"),
             max_concurrent: int = typer.Option(64, callback=within(ge=1), help="requests served at once; more get 503"),
             token: Optional[str] = typer.Option(None, envvar="INSTRUCTRL_RM_TOKEN", show_default=False,
                                                 help="require `Authorization: Bearer TOKEN` (401 otherwise); "
                                                      "--reward clients send $INSTRUCTRL_RM_TOKEN"),
             device: str = Dev):
    """Serve a reward model over HTTP with OpenRLHF's remote-RM contract: POST {"query": [texts]} to / or
    /get_reward, get {"rewards": [floats]}. Use it from another run as --reward http://HOST:PORT/get_reward."""
    from .rm_server import serve

    serve(str(reward), host, port, device, batch_size, max_body_bytes, max_queries, max_concurrent, token or None)


@app.command()
def pipeline(out: Path = typer.Option(Path("runs/default"), help="run directory (finished stages are reused)"),
             config: Optional[Path] = typer.Option(None, help="YAML config; see configs/default.yaml"),
             compare: bool = typer.Option(False, help="also run PPO-ptx with the gold judge as reward, PPO "
                                                       "without ptx, PPO with β = 0, vanilla PG, GRPO, RLOO and DPO"),
             seeds: int = typer.Option(1, help="run the whole pipeline for this many seeds (the config's seed, +1, …) "
                                               "in OUT/seed-<k>/ and report mean ± sd over them", callback=within(ge=1)),
             threads: Optional[int] = typer.Option(None, help="torch CPU threads", callback=within(ge=1)),
             float_path: Optional[str] = typer.Option(None, help="run in a child process under this float path: "
                                                      "native | default | avx2 | avx512 (torch's kernel dispatch "
                                                      "level), optionally :tN for N threads, e.g. default:t1 "
                                                      "(rounds floats as another CPU does; README Float paths)"),
             float_paths: Optional[str] = typer.Option(None, help="comma-separated float paths: run --seeds × these, "
                                                       "one at a time, in OUT/<float path>/seed-<k>/ and summarise "
                                                       "every claim and check in OUT/robust.json"),
             jobs: int = typer.Option(1, help="with --float-paths: runs at once, each with cores/jobs threads (or its "
                                              ":tN); never more threads in all than cores", callback=within(ge=1)),
             rerun_changed: bool = typer.Option(False, help="recompute finished stages whose options or inputs "
                                                            "changed (default: stop, naming what changed)")):
    """The main job: world → pretrain → SFT → rankings → reward model → PPO-ptx → eval → report."""
    from .machine import cpu_info, float_path_threads, parse_float_path

    for name in (float_paths or "").split(",") + [float_path or ""]:
        if name:
            parse_float_path(name)  # a bad name is refused before torch loads
    from . import robust

    if float_path and not float_paths and seeds == 1 and not robust.in_float_path(float_path):
        t = float_path_threads(float_path, threads)  # re-executed: the dispatch is fixed when torch loads
        sys.exit(robust.run_float_path(robust.float_path_command(out, config, float_path, t, compare, rerun_changed),
                                       float_path, t))
    from .config import load_pipeline_config
    from .pipeline import run_pipeline, run_seeds
    from .utils import write_json

    _setup(threads)
    cfg = load_pipeline_config(config)
    cfg.compare = cfg.compare or compare
    if float_paths or float_path and seeds > 1:
        try:
            robust.run_grid(cfg, out, seeds, (float_paths or float_path).split(","), threads, rerun_changed, jobs)
        except robust.RunFailed as e:
            from .utils import console

            console.print(f"[bold red]stopped:[/] {e}")
            sys.exit(e.code)
    elif seeds > 1:
        run_seeds(cfg, out, seeds, rerun_changed)
    else:
        run_pipeline(cfg, out, rerun_changed)
        if float_path:  # the dispatch level and threads this run really had, for robust.json
            write_json(Path(out) / "machine.json", cpu_info())


def _current_run():
    """The run in progress, if a step started one (without importing the run shell, and torch, when none did)."""
    module = sys.modules.get(f"{__package__}.run")
    return module.Run.current if module is not None else None


def main() -> None:
    """Entry point. Exit codes (README, "Exit codes"): 0 done; 2 a user error (one line naming the file/line/field or
    the option; nothing written); 3 stopped on non-finite values (nothing written; the last good checkpoint kept);
    4 an outside failure (disk full, I/O or network error; one line naming the path, the last checkpoint kept);
    130 interrupted (Ctrl-C; the message says how to resume)."""
    from rich.markup import escape

    from .data import DataError
    from .utils import console

    # transformers' progress bars off, as _setup() does, without importing it for `--help` or `label`
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # click's usage errors (an unknown option, a value that does not parse or is out of its bounds) come here too,
    # to be said in one line; ClickException is click's, or the copy of it that typer >= 0.2x carries
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)
    except usage_error as e:
        message, where = " ".join(e.format_message().split()), getattr(e, "ctx", None)
        if message:  # (none after the help that a bare `instructrl label` shows)
            console.print(f"[bold red]error:[/] {escape((f'{where.command_path}: ' if where else '') + message)}")
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("[bold yellow]aborted[/]")
        sys.exit(1)
    except (DataError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)
    except RuntimeError as e:  # optim (torch) is imported here, once a run has raised something
        from .optim import NonFiniteError

        if not isinstance(e, NonFiniteError):
            raise
        console.print(f"[bold red]stopped:[/] {escape(str(e))}")
        sys.exit(3)
    except OSError as e:  # disk full, I/O, network: not the user's mistake, and nothing half-written is left
        where = f" writing {e.filename}" if e.filename else ""
        run = _current_run()
        kept = f"; {run.out} was not written; {run.last_good()}" if run is not None else ""
        console.print(f"[bold red]failed:[/] {escape(f'{e.strerror or e}{where}{kept}')}")
        sys.exit(4)
    if code == 130:  # typer's exit code for Ctrl-C (KeyboardInterrupt)
        run = _current_run()
        said = run.interrupted() if run is not None else "interrupted"
        console.print(f"[bold yellow]{escape(said)}[/]")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
