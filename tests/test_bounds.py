"""Every numeric option of every command, with inf, nan, -1 and 0: refused with exit 2 and one line naming the option
and its bound, or accepted by the parser. The table is generated from the commands themselves (a new option is
covered without editing it); a few legal values then run end to end and give finite weights."""
import math
import typing

import pytest
import typer
from safetensors.torch import load_file

from instructrl import cli
from instructrl.options import check_value, flat_fields

VALUES = ("inf", "nan", "-1", "0")
# options for which any finite number is a setting (-1 included): the rest of the table must refuse -1
ANY_FINITE = {"--missing-eos-penalty", "--reward-weights"}  # a weight < 0: a penalty


def commands(group=None, path=()):
    """(path, click command) of every command of the `instructrl` app."""
    if group is None:
        group = typer.main.get_command(cli.app)
        for name, cmd in cli._step_commands().commands.items():  # the steps are built when named (lazy imports)
            group.add_command(cmd, name)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def kind(param):
    """int, float or None: the option's number type (typer's descriptor, or click's type on older typer)."""
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if ann is None:
        ann = {"integer": int, "float": float}.get(getattr(getattr(param, "type", None), "name", None))
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    ann = args[0] if args else ann
    return ann if ann in (int, float) else None


def cases():
    for path, cmd in commands():
        required = [a for p in cmd.params if p.required for a in (max(p.opts, key=len), "nowhere")]
        for p in cmd.params:
            if kind(p) is not None and not p.hidden:
                for value in VALUES:
                    yield path, cmd, required, max(p.opts, key=len), value


CASES = list(cases())


def parse(path, cmd, required, opt, value):
    """Parse as the CLI does, without running the command: None when accepted, else the error."""
    try:
        ctx = cmd.make_context(" ".join(path), [*required, f"{opt}={value}"])
        if path[-1] in cli.CONFIG_COMMANDS and len(path) == 1:
            cli.CONFIG_COMMANDS[path[-1]](**ctx.params).validate()
    except ValueError as e:
        return str(e)
    except Exception as e:  # click's usage error (typer's own copy of click on typer >= 0.2x)
        if hasattr(e, "format_message"):
            return e.format_message()
        raise
    return None


def test_table_covers_every_command():
    covered = {path for path, *_ in CASES}
    for name in ["world", "pretrain", "sft", "rm", "dpo", "ppo", "pg", "grpo", "rloo", "eval", "pipeline", "sample",
                 "serve-rm"]:
        assert (name,) in covered, name
    assert ("label", "simulate") in covered and ("label", "enqueue") in covered and ("label", "serve") in covered
    assert len(CASES) > 600


def test_every_numeric_option_refuses_inf_nan_and_minus_one_or_accepts_it(monkeypatch, capsys, cli_main):
    monkeypatch.setattr(cli, "app", typer.main.get_command(cli.app))  # built once, not once per call
    accepted, refused, through_main = [], 0, set()
    for path, cmd, required, opt, value in CASES:
        error = parse(path, cmd, required, opt, value)
        case = f"instructrl {' '.join(path)} {opt}={value}"
        if error is None:
            accepted.append(case)
            continue
        refused += 1
        assert "\n" not in error and (opt in error or f"'{opt}'" in error), (case, error)
        assert any(s in error for s in ("must be", "valid integer", "not a valid")), (case, error)
        if (path, value) in through_main:
            continue
        # once per command and value, through the real entry point: exit 2 and that one line
        through_main.add((path, value))
        code = cli_main(*path, *required, f"{opt}={value}")
        err = capsys.readouterr().err.strip()
        assert code == 2, (case, err)
        assert len(err.splitlines()) == 1 and err.startswith("error:") and error in err, (case, err)
    print(f"\n{len(CASES)} cases: {refused} refused, {len(accepted)} accepted; {len(through_main)} through main()")
    nonfinite = [c for c in accepted if c.endswith(("=inf", "=nan"))]
    assert not nonfinite, nonfinite
    negative = {c.split()[-1].split("=")[0] for c in accepted if c.endswith("=-1")}
    assert negative <= ANY_FINITE, negative


def test_declared_numbers_all_have_bounds():
    """A config's numeric option declares its bounds (or is a free finite number on purpose)."""
    for name, cls in cli.CONFIG_COMMANDS.items():
        for f in flat_fields(cls):
            if f.type in (int, float, float | None, int | None):
                assert f.field.metadata.get("bounds") or flag(f.name) in ANY_FINITE, f"{name} --{f.name}"


def flag(name):
    return "--" + name.replace("_", "-")


def test_check_value_messages():
    with pytest.raises(ValueError, match=r"^--lr must be a finite number > 0, not inf$"):
        check_value("--lr", math.inf, {"gt": 0})
    with pytest.raises(ValueError, match=r"^x must be a finite number >= 0 and < 1, not nan$"):
        check_value("x", math.nan, {"ge": 0, "lt": 1})
    with pytest.raises(ValueError, match=r"^w must be a finite number, not -inf$"):
        check_value("w", [1.0, -math.inf], {})
    check_value("--lr", 1e30, {"gt": 0})  # finite and > 0: the parser's part is done (exit 3 guards the rest)


def finite_weights(d):
    tensors = load_file(str(d / "model.safetensors"))
    return tensors and all(t.isfinite().all() for t in tensors.values())


@pytest.mark.parametrize("args", [
    ["sft", "--model", "{lm}", "--data", "{world}/demos.jsonl", "--epochs", "0"],          # 0 epochs: the model as is
    ["sft", "--model", "{lm}", "--data", "{world}/demos.jsonl", "--epochs", "1", "--warmup-ratio", "0",
     "--weight-decay", "0", "--val-fraction", "0", "--batch-size", "32"],
    ["ppo", "--policy", "{sft}", "--reward", "{rm}", "--prompts", "{world}/prompts_eval.jsonl", "--episodes", "8",
     "--batch-size", "8", "--minibatch-size", "8", "--ppo-epochs", "1", "--max-new-tokens", "4", "--beta", "0",
     "--missing-eos-penalty", "-1", "--vf-coef", "0", "--lam", "0", "--gamma", "0"],
    ["dpo", "--policy", "{sft}", "--data", "{rankings}", "--epochs", "0.05", "--label-smoothing", "0",
     "--warmup-ratio", "0", "--val-fraction", "0"],
], ids=["sft-0-epochs", "sft-zeros", "ppo-zeros", "dpo-zeros"])
def test_legal_edge_values_run_to_finite_weights(args, tmp_path, tiny_lm_dir, tiny_sft_dir, tiny_rm_dir, world_dir,
                                                 cli_main, capsys):
    names = {"lm": tiny_lm_dir, "sft": tiny_sft_dir, "rm": tiny_rm_dir, "world": world_dir,
             "rankings": tiny_rm_dir.parent / "rankings.jsonl"}
    out = tmp_path / "out"
    code = cli_main(*[a.format(**names) for a in args], "--out", out, "--device", "cpu", "--no-progress")
    assert code == 0, capsys.readouterr().err
    assert finite_weights(out)
