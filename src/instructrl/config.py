"""The pipeline's YAML config: sections map onto the steps' config dataclasses; unknown keys are errors."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DataError
from .evaluate import EvalConfig
from .pg import PGConfig
from .ppo import PPOConfig
from .pretrain import PretrainConfig
from .reward import RewardConfig
from .sft import SFTConfig
from .world import WorldConfig

# Fields the pipeline fills in itself (paths between stages); a config may not set them.
_WIRED = {"corpus", "val_corpus", "out", "model", "data", "demos", "policy", "reward", "prompts", "ref", "value",
          "judge", "ptx_data", "progress", "device", "dtype", "seed", "world", "reference", "pretrain_text",
          "bias_probes"}


@dataclass
class DataPaths:
    """Bring your own data instead of the embedded world (any field left empty comes from the world)."""

    demos: str | None = None
    prompts_train: str | None = None
    prompts_eval: str | None = None
    rankings: str | None = None      # human rankings (e.g. `instructrl label export`); skips simulated labelers
    pretrain_text: str | None = None  # {"text"} for PPO-ptx
    pretrain_val: str | None = None   # {"text"} held out, for the pretraining-loss metric
    bias_probes: str | None = None


@dataclass
class LabelSettings:
    k: int = 4
    n_prompts: int = 600
    temperature: float = 0.2
    labelers: int = 1
    labeler_bias_std: float = 0.0
    sample_temperature: float = 1.0


@dataclass
class PipelineConfig:
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    base_model: str | None = None     # any local HF causal-LM directory; skips the tiny model's pretraining
    compare: bool = False             # also run vanilla PG, PPO without ptx and PPO with β = 0
    data: DataPaths = field(default_factory=DataPaths)
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    label: LabelSettings = field(default_factory=LabelSettings)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(ptx_coef=0.1))  # γ tuned on the embedded world
    pg: PGConfig = field(default_factory=PGConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _check_type(value, tp, where: str, path: Path):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return value
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise DataError(path, None, f"expected {tp.__name__}, got {type(value).__name__} ({value!r})", where)
    return value


def _fill(obj, section: dict, prefix: str, path: Path, top: bool = False):
    if not isinstance(section, dict):
        raise DataError(path, None, f"expected a mapping, got {type(section).__name__}", prefix or "<root>")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)} - (set() if top or prefix == "data" else _WIRED)
    for key, value in section.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(names))}"
            raise DataError(path, None, f"unknown key{hint}", where)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, where, path)
        else:
            setattr(obj, key, _check_type(value, hints[key], where, path))
    return obj


def load_pipeline_config(path: str | Path | None) -> PipelineConfig:
    cfg = PipelineConfig()
    if path is None:
        return cfg
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"cannot read: {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise DataError(path, line + 1 if line is not None else None, f"invalid YAML: {e}") from None
    return _fill(cfg, raw, "", path, top=True)


def dump_config(cfg: PipelineConfig, settable_only: bool = False) -> str:
    """The config as YAML; with settable_only, without the fields the pipeline wires itself (a valid config file)."""
    d = dataclasses.asdict(cfg)
    if settable_only:
        for name, section in d.items():
            if isinstance(section, dict) and name != "data":
                for k in _WIRED & set(section):
                    del section[k]
    return yaml.safe_dump(d, sort_keys=False)
