"""Config dataclasses are the single source of every option: help text, CLI flags and YAML keys derive from them.

A field is declared once with `option(default, "help")`. Option groups shared by several steps (`RunOptions`,
`LoraOptions`, `DataOptions`) are composed into a step's config as a field marked `group(prefix)`; their fields then
appear flat, with the prefix, both on the command line (`--lora-r`) and in YAML (`lora_r:`). `wired=True` marks the
fields the pipeline fills in between stages (paths, seed, device), which a pipeline YAML may not set.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, wired: bool = False, required: bool = False,
           factory=None, ge=None, gt=None, le=None, lt=None, choices: tuple | None = None, learns: bool = True):
    """A config field with its help text (shown by --help and in configs/default.yaml) and what `validate` checks:
    the bounds (ge: ≥, gt: >, le: ≤, lt: <) and the allowed values (`choices`). A float is always finite.
    `learns=False` marks an option that changes how a run is carried out but not what it learns (e.g. a server's
    timeout): `--resume` and the pipeline's reuse ignore it."""
    meta = {"help": help, "wired": wired, "required": required, "choices": choices, "learns": learns,
            "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def group(cls, prefix: str = ""):
    """A composed option group whose fields appear flat (with `prefix`) in the CLI and the YAML."""
    return field(default_factory=cls, metadata={"group": prefix})


def config(cls):
    """A dataclass whose constructor also takes its groups' options flat: `SFTConfig(model=..., lora_r=8, seed=1)`.

    Group objects passed in (as `dataclasses.replace` does) are copied, so configs never share a group."""
    cls = dataclass(cls)
    init = cls.__init__
    own = {f.name for f in dataclasses.fields(cls)}
    groups = [f.name for f in dataclasses.fields(cls) if "group" in f.metadata]

    def __init__(self, **kw):
        flat = {k: kw.pop(k) for k in list(kw) if k not in own}
        init(self, **{k: copy.copy(v) if k in groups else v for k, v in kw.items()})
        fields = {f.name: f for f in flat_fields(cls)}
        for name, value in flat.items():
            if name not in fields:
                raise TypeError(f"{cls.__name__} has no option {name!r}")
            fields[name].set(self, value)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    cls.validate = validate
    return cls


SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def describe(bounds: dict) -> str:
    """The bounds as the errors say them: '>= 0 and < 1'."""
    return " and ".join(f"{SIGNS[op]} {b}" for op, b in bounds.items())


def check_value(name: str, value, bounds: dict, choices=None) -> None:
    """One option's value against its declaration: a one-line ValueError naming the option (`name`) and the bound.
    Floats must be finite (nan and inf are never a setting), lists are checked element by element."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, list):
        for v in value:
            check_value(name, v, bounds, choices)
        return
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' ' + describe(bounds) if bounds else ''}, not {value}")
    for op, bound in bounds.items():
        if not {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}[op]:
            raise ValueError(f"{name} must be {SIGNS[op]} {bound}, not {value}")


def within(**bounds):
    """A typer callback checking a hand-written command's numeric option as a config's options are checked:
    `typer.Option(4, callback=within(ge=2))`."""
    def callback(ctx, param, value):
        import typer

        name = max(param.opts, key=len)
        try:
            check_value(name, value, bounds)
        except ValueError as e:  # click's usage error: exit 2, "Invalid value for '--k': must be >= 2, not 1"
            raise typer.BadParameter(str(e).removeprefix(f"{name} "), ctx, param) from None
        return value
    return callback


def validate(cfg, where: str = "", keys: dict[str, str] | None = None) -> None:
    """Every option within its declaration (`check_value`), then the option groups' and the class's cross-option
    `check()`: a one-line ValueError naming the option (`--batch-size`, or `sft.batch_size` with `where="sft"`)
    before anything runs. `keys`: options set from elsewhere, named by the key that sets them."""
    keys = keys or {}

    def key(name: str) -> str:
        return keys.get(name, f"{where}.{name}")

    for f in flat_fields(type(cfg)):
        meta = f.field.metadata
        check_value(key(f.name) if where else flag(f.name), f.get(cfg), meta.get("bounds", {}), meta.get("choices"))
    groups = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if "group" in f.metadata]
    for check in [getattr(g, "check", None) for g in groups] + [getattr(cfg, "check", None)]:
        if check is None:
            continue
        try:
            check()
        except ValueError as e:
            if not where:
                raise
            # in a YAML section, name its keys: --batch-size → ppo.batch_size
            raise ValueError(re.sub(r"--([a-z0-9-]+)", lambda m: key(m[1].replace("-", "_")), str(e))) from None


def flag(name: str) -> str:
    """An option's CLI spelling (errors name the flag the user typed)."""
    return "--" + name.replace("_", "-")


AUTOCAST = ("off", "bf16", "auto")  # --autocast (utils.resolve_autocast)


@dataclass
class RunOptions:
    """What every trainer's run shell needs: seed, device, checkpoints, logging."""

    seed: int = option(0, "random seed (under torchrun rank r uses seed + r·100003)", wired=True, ge=0)
    device: str = option("auto", "auto | cpu | cuda", wired=True)
    dtype: str = option("float32", "float32 | bfloat16 | float16 (log-softmax and losses stay float32)", wired=True)
    autocast: str = option("off", "off | bf16 | auto: forward passes in bfloat16 autocast with float32 weights and "
                                  "optimizer (the scalar heads, log-softmax and losses in float32, and on the CPU "
                                  "attention too); auto: bf16 where the hardware multiplies bf16 natively (a CPU "
                                  "with AVX-512 BF16, a GPU with bf16)", wired=True, choices=AUTOCAST)
    fsdp: bool = option(False, "under torchrun, shard the models over the processes (with LoRA, checkpoints and "
                               "--resume; checkpoints hold whole, gathered weights)")
    save_every: int = option(0, "steps (RL: iterations) between checkpoints in OUT-checkpoints/ (0: none)", ge=0)
    resume: bool = option(False, "continue from the newest readable checkpoint in OUT-checkpoints/ (of the same "
                                 "options and inputs)")
    overwrite: bool = option(False, "replace a finished output of this step in --out (and start afresh over old "
                                    "checkpoints)")
    keep_checkpoints: int = option(2, "checkpoints kept in OUT-checkpoints/", ge=1)
    max_nonfinite: int = option(3, "non-finite rewards/losses/gradient norms without an update in between before "
                                   "the run stops", ge=1)
    log_with: str = option("", "extra metric sinks besides metrics.jsonl, comma-separated: tensorboard, trackio, "
                               "wandb, mlflow (events and run ids in OUT-logs/)")
    progress: bool = option(True, "show a progress bar", wired=True)


@dataclass
class MemoryOptions:
    """Fitting bigger models and batches: gradient accumulation and activation checkpointing."""

    micro_batch_size: int = option(0, "examples (RL: rollouts) per forward/backward pass in each process; gradients "
                                      "are accumulated over the micro-batches of each (mini)batch, whose loss stays "
                                      "normalised by its global count (0: the process's whole share at once)", ge=0)
    gradient_checkpointing: bool = option(False, "recompute activations in backward instead of storing them "
                                                 "(non-reentrant) in the backbones being trained: policy, value or reward "
                                                 "model")


@dataclass
class LoraOptions:
    """LoRA adapters (peft); the trained model is saved merged."""

    r: int = option(0, "LoRA rank (0: full fine-tuning)", ge=0)
    alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)", gt=0)
    dropout: float = option(0.0, "LoRA dropout; keep 0 (dropout breaks the first PPO ratio = 1) [N+ D7]", ge=0, lt=1)
    target_modules: str | None = option(None, "comma-separated module names or 'all-linear' (default: peft's per "
                                              "architecture)")


@dataclass
class DataOptions:
    """How a step reads its data file and renders it for the model (shared by every step that reads data)."""

    split: str | None = option(None, "split of a `datasets` source (.json/.parquet/.arrow file or directory) to "
                                     "read (default: 'train' or the only one; a JSONL file is 'train')")
    chat_template: str | None = option(None, "Jinja chat-template file for a tokenizer without one (an error if "
                                             "the tokenizer has a different one; the same one is a no-op)")
    prompt_key: str = option("prompt", "column of the prompts")

    def columns(self):
        """The data.Columns these options map (unmapped fields keep their default names)."""
        from .data import Columns

        keys = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_key")}
        return Columns(**{k.removesuffix("_key"): v for k, v in keys.items()})


@dataclass
class DemoDataOptions(DataOptions):
    """DataOptions for demonstrations."""

    completion_key: str = option("completion", "column of the completions (\"response\" is read too when absent)")
    messages_key: str = option("messages", "column of whole conversations (instead of prompt + completion)")


@dataclass
class PairDataOptions(DataOptions):
    """DataOptions for preference data."""

    chosen_key: str = option("chosen", "column of the preferred response of a pair (or whole transcript)")
    rejected_key: str = option("rejected", "column of the other response of a pair (or whole transcript)")


@dataclass(frozen=True)
class FlatField:
    name: str                 # the flat name: CLI --name-with-dashes, YAML key
    path: tuple[str, ...]     # attribute path inside the config
    field: dataclasses.Field
    type: Any

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def wired(self) -> bool:
        return self.field.metadata.get("wired", False)

    @property
    def learns(self) -> bool:
        return self.field.metadata.get("learns", True)

    @property
    def required(self) -> bool:
        return self.field.metadata.get("required", False)

    @property
    def default(self):
        f = self.field
        return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default

    def get(self, cfg):
        for p in self.path:
            cfg = getattr(cfg, p)
        return cfg

    def set(self, cfg, value) -> None:
        for p in self.path[:-1]:
            cfg = getattr(cfg, p)
        setattr(cfg, self.path[-1], value)


def flat_fields(cls, prefix: str = "", path: tuple[str, ...] = ()) -> Iterator[FlatField]:
    """Every option of a config class, option groups flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            yield from flat_fields(hints[f.name], prefix + f.metadata["group"], path + (f.name,))
        else:
            yield FlatField(prefix + f.name, path + (f.name,), f, hints[f.name])


def to_flat(cfg, learned_only: bool = False) -> dict:
    """The config as {flat name: value} (summaries, YAML dumps); `learned_only`: without the options marked
    `learns=False` (what a checkpoint's fingerprint compares)."""
    return {f.name: f.get(cfg) for f in flat_fields(type(cfg)) if f.learns or not learned_only}
