"""Configs are the single source: every field of every step reaches the CLI (--help), the pipeline YAML, and the
documented configs/default.yaml."""
import re
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from instructrl.cli import app
from instructrl.config import PipelineConfig, dump_config, load_pipeline_config, settable
from instructrl.evaluate import EvalConfig
from instructrl.options import flat_fields
from instructrl.pg import PGConfig
from instructrl.ppo import PPOConfig
from instructrl.pretrain import PretrainConfig
from instructrl.reward import RewardConfig
from instructrl.sft import SFTConfig
from instructrl.world import WorldConfig

COMMANDS = {"world": WorldConfig, "pretrain": PretrainConfig, "sft": SFTConfig, "rm": RewardConfig,
            "ppo": PPOConfig, "pg": PGConfig, "eval": EvalConfig}
SECTIONS = {"world": WorldConfig, "pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig,
            "ppo": PPOConfig, "pg": PGConfig, "eval": EvalConfig}
DEFAULT_YAML = Path(__file__).parent.parent / "configs" / "default.yaml"


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return re.sub(r"\x1b\[[0-9;]*m", "", result.output)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_a_cli_option_with_its_help(command):
    text = help_text(command)
    for f in flat_fields(COMMANDS[command]):
        assert f"--{f.name.replace('_', '-')}" in text, f"{command}: --{f.name} missing from --help"
        assert f.help, f"{command}.{f.name} has no help text"
        assert f.help.split()[0] in text, f"{command}: the help of --{f.name} is not shown"


def test_every_settable_field_is_a_yaml_key_documented_in_default_yaml():
    documented = yaml.safe_load(DEFAULT_YAML.read_text())
    comments = DEFAULT_YAML.read_text()
    for section, cls in SECTIONS.items():
        for name, f in settable(cls).items():
            assert name in documented[section], f"{section}.{name} missing from configs/default.yaml"
            assert f"  {name}: " in comments and f.help[:20] in comments, f"{section}.{name} has no comment"
    # and the file is exactly what the config classes generate (no hand-kept copy that can drift)
    assert comments.split("\n", 4)[4] == dump_config(PipelineConfig(), True, True)


def test_yaml_sets_every_settable_field(tmp_path):
    """Each settable field, flat names included (lora_r, save_every), lands on the config the stage receives."""
    cfg0 = PipelineConfig()
    lines, expected = [], {}
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for name, f in settable(cls).items():
            value = f.get(getattr(cfg0, section))
            change = {bool: lambda v: not v, int: lambda v: (v or 0) + 1, float: lambda v: (v or 0.0) + 0.5,
                      str: lambda v: (v or "") + "x"}
            if typing.get_origin(f.type) is list:  # a repeatable option: one more item
                new = value + [change[typing.get_args(f.type)[0]](None)]
            else:
                tp = next((a for a in typing.get_args(f.type) if a is not type(None)), f.type)  # X of `X | None`
                new = change[tp](value)
            lines.append(f"  {name}: {yaml.safe_dump(new, default_flow_style=True).strip().removesuffix('...').strip()}")
            expected[(section, name)] = new
    path = tmp_path / "all.yaml"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_pipeline_config(path)
    for (section, name), value in expected.items():
        f = settable(SECTIONS[section])[name]
        assert f.get(getattr(cfg, section)) == value, f"{section}.{name}"


def test_a_runs_config_yaml_reads_back_as_the_same_config(tmp_path):
    """The pipeline writes OUT/config.yaml with dump_config(settable_only=True): a user can rerun from it."""
    cfg = PipelineConfig(seed=3)
    cfg.ppo.lr, cfg.world.max_operand, cfg.label.k = 2e-5, 6, 5
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg, settable_only=True))
    assert dump_config(load_pipeline_config(path), settable_only=True) == path.read_text()


def test_the_pipelines_online_methods_sample_alike():
    """--compare sets the online methods side by side: they sample (and take every log-prob) at one temperature,
    length and episode count, or the table would compare settings instead of algorithms."""
    cfg = PipelineConfig()
    methods = (cfg.ppo, cfg.pg, cfg.grpo, cfg.rloo)
    for name in ("temperature", "max_new_tokens", "episodes"):
        assert len({getattr(m, name) for m in methods}) == 1, name
    assert cfg.ppo.temperature == 1.0  # [IG] samples at T = 1; the eval stays at its own 0.7
    assert cfg.eval.temperature == 0.7


def test_flat_constructor_and_replace_keep_groups_apart():
    import dataclasses

    a = SFTConfig(model="m", lora_r=8, seed=3)
    assert a.lora.r == 8 and a.run.seed == 3
    b = dataclasses.replace(a, seed=5, device="cpu")
    assert b.run.seed == 5 and a.run.seed == 3 and b.lora.r == 8 and b.run is not a.run
    with pytest.raises(TypeError, match="no option 'lora_rank'"):
        SFTConfig(lora_rank=8)


def test_yaml_list_options_are_checked_item_by_item(tmp_path):
    from instructrl.data import DataError

    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  reward_weights: [1, 0.5]\n")
    assert load_pipeline_config(f).ppo.rewards.weights == [1.0, 0.5]
    f.write_text("ppo:\n  reward_weights: 0.5\n")
    with pytest.raises(DataError, match=r"ppo.reward_weights.*expected a list, got float"):
        load_pipeline_config(f)
    f.write_text("ppo:\n  reward_weights: [1, x]\n")
    with pytest.raises(DataError, match=r"ppo.reward_weights\[1\].*expected float, got str"):
        load_pipeline_config(f)
