"""The command line answers at once and reads at 80 columns: `instructrl --help` and the label commands that need no
model never import torch, and every command's --help shows every option name whole, within 80 columns."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from instructrl import cli
from instructrl.rl import algorithms

SRC = str(Path(cli.__file__).parents[1])


def test_help_and_label_commands_do_not_import_torch(tmp_path):
    """A fresh interpreter runs `instructrl --help` and the model-free label commands through the entry point."""
    script = textwrap.dedent("""
        import sys
        import instructrl.cli
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import instructrl.cli"
        for argv in (["--help"], ["label", "--help"], ["label", "add-labeler", "alice", "--db", "l.db"],
                     ["label", "stats", "--db", "l.db"], ["label", "export", "--db", "l.db", "--out", "r.jsonl"],
                     ["label", "revoke", "alice", "--db", "l.db"], ["label", "serve", "--db", "missing.db"]):
            sys.argv = ["instructrl", *argv]
            try:
                instructrl.cli.main()
            except SystemExit as e:
                assert e.code in (0, 2, None), (argv, e.code)
            loaded = [m for m in ("torch", "transformers") if m in sys.modules]
            assert not loaded, f"instructrl {' '.join(argv)} imported {loaded}"
        import instructrl.label.app  # what `label serve` serves (it stopped above: no database)
        assert "torch" not in sys.modules, "instructrl.label.app"
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.jsonl").exists() and "no database" in r.stderr  # the commands ran, not only imported


def test_the_listed_steps_are_the_step_commands():
    """`instructrl --help` lists the steps from cli.STEPS without building them: every registered RL algorithm
    must be there, with the help its built command has."""
    built = cli._step_commands().commands
    assert set(algorithms()) <= set(cli.STEPS) and set(built) == set(cli.STEPS)
    assert all(built[name].help == cli.STEPS[name] for name in built)


def every_command():
    """(argv prefix, command) of every command and group, the step commands built."""
    def walk(path, group):
        yield path, group
        for name in group.list_commands(None):
            command = cli._step_commands().commands[name] if not path and name in cli.STEPS else group.commands[name]
            if hasattr(command, "commands"):  # a group (typer's own click has no click.Group)
                yield from walk([*path, name], command)
            else:
                yield [*path, name], command
    return list(walk([], typer.main.get_command(cli.app)))


@pytest.mark.parametrize("path,command", every_command(), ids=lambda p: " ".join(p) if isinstance(p, list) else "")
def test_help_at_80_columns_shows_every_option_name_whole(path, command):
    r = CliRunner().invoke(cli.app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert r.exit_code == 0, r.output
    assert max(map(len, r.output.splitlines())) <= 80, r.output
    for param in command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", r.output), f"{name} not whole:\n{r.output}"


@pytest.mark.parametrize("error,code", [("nonfinite", 3), ("data", 2), ("other", None)])
def test_entry_point_exit_codes(error, code, monkeypatch, capsys):
    """main() maps a run's errors to exit codes (README): non-finite 3, bad input 2; any other error propagates."""
    from instructrl.data import DataError
    from instructrl.optim import NonFiniteError

    raised = {"nonfinite": NonFiniteError("loss is nan at step 3"), "data": DataError("d.jsonl", 4, "no prompt"),
              "other": RuntimeError("a bug")}[error]

    def app():
        raise raised

    monkeypatch.setattr(cli, "app", app)
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main()
        return
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == code and capsys.readouterr().err.count("\n") == 1
