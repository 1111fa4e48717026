"""`instructrl STEP --config FILE`: a step's options as YAML (a pipeline section's keys, paths included). The file
trains what the same flags train; flags given on the command line override it; a key or value it gets wrong stops
with one line naming the file and the key, exit code 2, nothing written."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from instructrl import cli
from instructrl.options import flat_fields
from instructrl.sft import SFTConfig


def flags(options: dict) -> list[str]:
    """The command line that gives `options` (a list: the option repeated; a bool: --name / --no-name)."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            args += [a for v in (value if isinstance(value, list) else [value]) for a in (flag, str(v))]
    return args


def write_yaml(path, options: dict):
    path.write_text(yaml.safe_dump(options))
    return path


def test_ppo_from_a_config_file_equals_the_same_run_from_flags(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path,
                                                               cli_main):
    """The acceptance test: the same final weights, bitwise. The options differ from the defaults (a file that was
    not read would train other weights, or miss the required paths)."""
    options = {"policy": str(tiny_sft_dir), "reward": [str(tiny_rm_dir)], "prompts": str(world_dir / "prompts_train.jsonl"),
               "episodes": 16, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8,
               "lr": 3e-5, "beta": 0.02, "seed": 5, "whiten_rewards": True, "device": "cpu", "progress": False}
    assert cli_main("ppo", *flags(options), "--out", tmp_path / "flags") == 0
    run = write_yaml(tmp_path / "run.yaml", {**options, "out": str(tmp_path / "file")})
    assert cli_main("ppo", "--config", run) == 0
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("flags", "file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sft = load_file(tiny_sft_dir / "model.safetensors")
    assert any(not torch.equal(a[k], sft[k]) for k in a)  # and it did train
    configs = [json.loads((tmp_path / d / "summary.json").read_text())["config"] for d in ("flags", "file")]
    assert {**configs[0], "out": None} == {**configs[1], "out": None}


def test_flags_given_override_the_file_and_the_file_the_defaults(tiny_lm_dir, world_dir, tmp_path, cli_main):
    """SFT with 0 epochs (the model saved as is): the run's summary holds the options it ran with. `--seed 0` is
    the default, given: it still wins over the file (the command line's parameter source, not a default compare)."""
    run = write_yaml(tmp_path / "sft.yaml", {"model": str(tiny_lm_dir), "data": str(world_dir / "demos.jsonl"),
                                             "epochs": 0, "lr": 0.002, "batch_size": 4, "seed": 3,
                                             "warmup_ratio": 0.2, "device": "cpu", "progress": False})
    assert cli_main("sft", "--config", run, "--lr", "0.0005", "--seed", "0", "--out", tmp_path / "sft") == 0
    config = json.loads((tmp_path / "sft" / "summary.json").read_text())["config"]
    assert (config["lr"], config["seed"]) == (0.0005, 0)                              # the flags
    assert (config["batch_size"], config["warmup_ratio"], config["epochs"]) == (4, 0.2, 0)  # the file
    assert config["weight_decay"] == SFTConfig().weight_decay                        # the default


@pytest.mark.parametrize("command", sorted(cli.STEPS))
def test_every_step_refuses_an_unknown_key_with_a_suggestion(command, tmp_path, cli_main, capsys):
    cli._step_commands()  # built: CONFIG_COMMANDS filled
    known = next(f.name for f in flat_fields(cli.CONFIG_COMMANDS[command]) if len(f.name) > 3)
    run = write_yaml(tmp_path / "run.yaml", {"out": str(tmp_path / "out"), known + "x": 1})
    assert cli_main(command, "--config", run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{run}: field '{known}x': unknown key; did you mean '{known}'?" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written


SFT = {"model": "{lm}", "data": "{world}/demos.jsonl", "out": "{tmp}/sft", "device": "cpu"}


@pytest.mark.parametrize("file,args,said", [
    ({"lr": -1}, [], "sft.yaml: lr must be > 0, not -1"),                       # a bound
    ({"lr": float("nan")}, [], "sft.yaml: lr must be a finite number > 0, not nan"),
    ({"lr": "fast"}, [], "sft.yaml: field 'lr': expected float, got str ('fast')"),  # a type
    ({"batch_size": 2.5}, [], "sft.yaml: field 'batch_size': expected int"),
    ({"sft": {"lr": 1}}, [], "sft.yaml: field 'sft': a pipeline section"),          # a pipeline file's section
    ({"lr": 0.001}, ["--lr", "-2"], "error: --lr must be > 0, not -2"),            # a flag's error names the flag
])
def test_a_bad_value_in_the_file_names_the_file_and_key(file, args, said, tiny_lm_dir, world_dir, tmp_path, cli_main,
                                                         capsys):
    where = {"lm": tiny_lm_dir, "world": world_dir, "tmp": tmp_path}
    run = write_yaml(tmp_path / "sft.yaml", {**{k: v.format(**where) for k, v in SFT.items()}, **file})
    assert cli_main("sft", "--config", run, *args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert said in err and err.count("error:") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.yaml"]  # nothing written


def test_a_rule_between_options_names_the_files_keys(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path, cli_main, capsys):
    """A config class's check() naming one option from the file and one from the command line."""
    run = write_yaml(tmp_path / "ppo.yaml", {"policy": str(tiny_sft_dir), "reward": [str(tiny_rm_dir)],
                                             "prompts": str(world_dir / "prompts_train.jsonl"), "episodes": 4})
    assert cli_main("ppo", "--config", run, "--batch-size", "8", "--out", tmp_path / "ppo") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{run}: episodes (4) must be at least --batch-size (8)" in err, err
    assert not (tmp_path / "ppo").exists()
