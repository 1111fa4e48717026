"""The pipeline's YAML config: one section per step, each mapping onto that step's config class.

Keys are the steps' option names (the CLI's, with underscores; option groups flat: `lora_r`, `save_every`), and
unknown keys are errors with a suggestion. The fields marked `wired` (paths between stages, seed, device) are
filled in by the pipeline; a section may not set them. Every config is checked here, before any stage runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DataError
from .dpo import DPOConfig
from .evaluate import EvalConfig
from .grpo import GRPOConfig
from .options import AUTOCAST, check_value, config, flat_fields, option
from .pg import PGConfig
from .ppo import PPOConfig
from .pretrain import PretrainConfig
from .reward import RewardConfig
from .rloo import RLOOConfig
from .sft import SFTConfig
from .world import WorldConfig


@config
class DataPaths:
    """Bring your own data instead of the embedded world (any field left empty comes from the world)."""

    demos: str | None = option(None, "demonstrations {prompt, response}")
    prompts_train: str | None = option(None, "RL and labeling prompts {prompt}")
    prompts_eval: str | None = option(None, "evaluation prompts {prompt}")
    rankings: str | None = option(None, "human rankings (e.g. `instructrl label export`); skips simulated labelers")
    pretrain_text: str | None = option(None, "{text} for PPO-ptx")
    pretrain_val: str | None = option(None, "{text} held out, for the pretraining-loss metric")
    bias_probes: str | None = option(None, "{stereotyped, anti_stereotyped} sentence pairs")


@config
class LabelSettings:
    """Simulated labelers: K samples of the SFT (or pretrained) model per prompt, ranked by the hidden judge with
    noise."""

    k: int = option(6, "responses per prompt (K): C(K,2) comparisons each", ge=2)
    n_prompts: int = option(1200, "prompts to label", ge=1)
    temperature: float = option(0.2, "labeler noise (Plackett–Luce temperature)", ge=0)
    labelers: int = option(1, "simulated labelers", ge=1)
    labeler_bias_std: float = option(0.0, "spread of the labelers' individual biases", ge=0)
    sample_temperature: float = option(1.0, "temperature of the samples to rank (SFT's and the pretrained model's)",
                                       gt=0)
    pretrained_share: float = option(0.25, "share of the prompts whose K samples come from the pretrained model "
                                          "instead of SFT: more varied comparisons (rude, stereotyped, wrong), so the "
                                          "reward model learns more than SFT's own mistakes", ge=0, le=1)
    demo_prompts: bool = option(True, "label the demonstrations' prompts too: the RL prompts and theirs in one "
                                      "seeded order, the first n_prompts ranked (the reward model meets more "
                                      "questions, and the prompts it holds out are more of them)")


# The pipeline's online RL methods all sample at temperature 1, as InstructGPT does [IG], so they compare on equal
# footing: at the classes' 0.7, SFT's samples already sit near what the reward model can tell apart and the gold
# reward of the training batches barely climbs. Evaluation keeps its own 0.7.
RL_TEMPERATURE = 1.0


@dataclass
class PipelineConfig:
    seed: int = option(0, "random seed of every stage", ge=0)
    device: str = option("auto", "auto | cpu | cuda")
    dtype: str = option("float32", "float32 | bfloat16 | float16")
    # auto: the pretraining, SFT, reward model and RL stages run their forward passes in bf16 autocast where the CPU
    # (AVX-512 BF16) or GPU multiplies bf16 natively (README, "Performance": 1.28× faster here, the same checks)
    autocast: str = option("auto", "off | bf16 | auto: forward passes of the training stages in bfloat16 autocast, "
                                    "float32 weights (auto: where the hardware multiplies bf16 natively)",
                           choices=AUTOCAST)
    base_model: str | None = option(None, "any local HF causal-LM directory; skips the tiny model's pretraining")
    compare: bool = option(False, "also run PPO-ptx with the gold judge as reward, PPO without ptx, PPO with β = 0, "
                                  "vanilla PG, GRPO, RLOO and DPO")
    data: DataPaths = field(default_factory=DataPaths)
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    label: LabelSettings = field(default_factory=LabelSettings)
    # the reward's scale is set on SFT's samples, the policy RL starts from (the labels also rank pretrained samples)
    # A fifth of the labelled questions held out (17 of the embedded world's 86): a tenth (8) let one or two questions
    # decide the held-out accuracy (README, "Does a run measure alignment on any CPU?").
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(gain_policy="sft", val_fraction=0.2))
    # γ tuned on the embedded world; half the class's lr: less KL, the same gold reward. β 0.3: at 0.05 PPO-ptx
    # drifted to replies the reward model misranks (Spearman within a prompt 0.04 on its samples, 0.70 at β 0.3,
    # with the same gold rise; README, "Does a run measure alignment on any CPU?"). The learning rate decays linearly
    # to 0: at a constant one, the last eighth of the run's training-batch gold fell more than 0.05 below its best
    # eighth on 3 of 10 runs.
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(ptx_coef=0.1, lr=1.5e-5, beta=0.3, lr_schedule="linear",
                                                             temperature=RL_TEMPERATURE))
    pg: PGConfig = field(default_factory=lambda: PGConfig(temperature=RL_TEMPERATURE))
    # group-centred rewards not divided by the group's std (Dr. GRPO): divided, GRPO drifted to KL 9.7 and ended
    # 0.30 below SFT's gold on the embedded world (README, "Defaults that work")
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(temperature=RL_TEMPERATURE, scale_rewards=False))
    rloo: RLOOConfig = field(default_factory=lambda: RLOOConfig(temperature=RL_TEMPERATURE))
    # β 0.5: at β 0.1 DPO drifted (KL 3.8× PPO-ptx's; on SFT's own rankings alone, KL 8–10 on two seeds of three)
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(beta=0.5))
    # several samples per prompt (standard errors), generation bias and stereotyped replies in the report
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(samples_per_prompt=4, bias_samples=2,
                                                                stereotype_samples=8))


SECTIONS = [f.name for f in dataclasses.fields(PipelineConfig) if dataclasses.is_dataclass(f.default_factory)
            or f.default is dataclasses.MISSING]


def settable(cls) -> dict:
    """A section's YAML keys: its options that the pipeline does not wire."""
    return {f.name: f for f in flat_fields(cls) if not f.wired}


def _check_type(value, tp, where: str, path: Path):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return value
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise DataError(path, None, f"expected a list, got {type(value).__name__} ({value!r})", where)
        return [_check_type(v, typing.get_args(tp)[0], f"{where}[{i}]", path) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise DataError(path, None, f"expected {tp.__name__}, got {type(value).__name__} ({value!r})", where)
    return value


def _unknown(key, names, where: str, path: Path) -> DataError:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(names))}"
    return DataError(path, None, f"unknown key{hint}", where)


def _mapping(value, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise DataError(path, None, f"expected a mapping, got {type(value).__name__}", where)
    return value


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"cannot read: {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise DataError(path, line + 1 if line is not None else None, f"invalid YAML: {e}") from None
    return _mapping(raw, "<root>", path)


def load_pipeline_config(path: str | Path | None) -> PipelineConfig:
    cfg = PipelineConfig()
    if path is None:
        return cfg
    path = Path(path)
    top = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    hints = typing.get_type_hints(PipelineConfig)
    for key, value in _read_yaml(path).items():
        if key not in top:
            raise _unknown(key, top, key, path)
        section = getattr(cfg, key)
        if not dataclasses.is_dataclass(section):
            setattr(cfg, key, _check_type(value, hints[key], key, path))
            continue
        fields = {f.name: f for f in flat_fields(type(section))} if key == "data" else settable(type(section))
        for name, v in _mapping(value, key, path).items():
            if name not in fields:
                raise _unknown(name, fields, f"{key}.{name}", path)
            fields[name].set(section, _check_type(v, fields[name].type, f"{key}.{name}", path))
    return cfg


def load_step_options(path: str | Path, cls) -> dict:
    """A step command's `--config FILE`: {option: value} with the keys and types of a pipeline section (a section's
    content is a valid file), the wired ones (paths, seed, device) allowed too, as the command line has them."""
    path = Path(path)
    fields = {f.name: f for f in flat_fields(cls)}
    for name in (raw := _read_yaml(path)):
        if name in SECTIONS and name not in fields:  # a whole pipeline file, or its section with the header
            raise DataError(path, None, "a pipeline section: a step's file holds a section's keys at its top", name)
        if name not in fields:
            raise _unknown(name, fields, name, path)
    return {name: _check_type(v, fields[name].type, name, path) for name, v in raw.items()}


def blame_file(error: ValueError, path: str | Path, keys) -> ValueError:
    """A step's option error said with the --config file's keys where the options came from it:
    `--batch-size must be >= 1` → `run.yaml: batch_size must be >= 1`."""
    def key(m):
        name = m[1].replace("-", "_")
        return name if name in keys else m[0]

    text = re.sub(r"--([a-z0-9-]+)", key, str(error))
    return ValueError(f"{path}: {text}") if text != str(error) else error


def dump_config(cfg: PipelineConfig, settable_only: bool = False, comments: bool = False) -> str:
    """The config as YAML (flat option names per section); with settable_only, without the wired fields (a valid
    config file); with comments, each key followed by its help text."""
    lines = []
    for f in dataclasses.fields(PipelineConfig):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            lines.append(_yaml_line(f.name, value, f.metadata.get("help", "") if comments else "", ""))
            continue
        lines.append(f"{f.name}:")
        for ff in flat_fields(type(value)):
            if settable_only and ff.wired and f.name != "data":
                continue
            lines.append(_yaml_line(ff.name, ff.get(value), ff.help if comments else "", "  "))
    return "\n".join(lines) + "\n"


def _yaml_line(key: str, value, help: str, indent: str) -> str:
    text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]
    return f"{indent}{text}" + (f"  # {help}" if help else "")


SECTION_OF = {"world": "world", "pretrained": "pretrain", "sft": "sft", "rankings": "label", "reward": "reward",
              "ppo_ptx": "ppo", "ppo_gold": "ppo", "ppo": "ppo", "ppo_beta0": "ppo", "pg": "pg", "pg_reuse": "pg",
              "grpo": "grpo", "rloo": "rloo", "dpo": "dpo"}


# stages with options set from another section: what the stage is, and the keys that set those options
DERIVED = {"pg_reuse": ("the pg section reusing each batch for ppo.ppo_epochs epochs in minibatches of "
                        "ppo.minibatch_size", {"epochs": "ppo.ppo_epochs", "minibatch_size": "ppo.minibatch_size"})}


def validate_pipeline(cfg: PipelineConfig, plan: dict) -> None:
    """Every stage's config (`plan`: pipeline.plan), the data files and the base model, before any stage runs: a
    ValueError naming the YAML key (`ppo.minibatch_size`, `data.demos`). Each section's rules are its config class's
    (`validate`: the options' declarations, then the class's `check()`)."""
    from .models import check_causal_lm, model_dir

    for f in dataclasses.fields(PipelineConfig):  # the top-level keys
        if not dataclasses.is_dataclass(getattr(cfg, f.name)):
            check_value(f.name, getattr(cfg, f.name), f.metadata.get("bounds", {}), f.metadata.get("choices"))
    for key in dataclasses.asdict(cfg.data):
        value = getattr(cfg.data, key)
        if value and not Path(value).exists():
            raise ValueError(f"data.{key}: {value}: no such file or directory")
    if cfg.base_model:
        check_causal_lm(model_dir(cfg.base_model))
    # before the section's own rule, which names ppo.ptx_data, a key the pipeline fills in
    if plan["ppo_ptx"].ptx_coef > 0 and not plan["ppo_ptx"].ptx_data:
        raise ValueError("ppo.ptx_coef > 0 needs pretraining text: set data.pretrain_text (or ppo.ptx_coef: 0)")
    for name, section in SECTION_OF.items():
        if name not in plan:
            continue
        what, keys = DERIVED.get(name, (None, None))
        try:
            plan[name].validate(section, keys)
        except ValueError as e:
            if what is None:
                raise
            raise ValueError(f"the compare stage {name} ({what}): {e}") from None
    for ecfg in plan["eval"].values():
        ecfg.validate("eval")
