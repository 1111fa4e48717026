"""The README is a test. Every command it shows, in README.md and docs/*.md:

- a fenced shell command runs here, on tiny fixtures (SUBSTITUTE says what replaces what), in its block's own
  directory holding the data files the README names, and must exit 0;
- an inline `instructrl …` command or `--option …` is parsed by the real command line (PLACEHOLDERS fill its
  metavariables): every option must exist, with a value of the right type, and nothing may be left over;
- a command CI cannot run is in NOT_RUN with the reason. A command that is none of these fails the test.

Every repository path the README names (src/…, tests/…, benchmarks/…) must exist, too.
"""
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from instructrl import cli

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# README text → what CI runs instead ({…}: a fixture's path)
SUBSTITUTE = {
    "runs/default/sft": "{sft}",                          # the default pipeline's SFT model → tests/conftest.py's
    "/models/llama-1b": "{lm}",                           # a local HF causal LM → the tiny pretrained GPT
    "--port 8000": "--port {port}",                       # a free port
    "--batch-size 64 --minibatch-size 8 --max-new-tokens 128":
        "--batch-size 4 --minibatch-size 2 --max-new-tokens 8 --episodes 4",   # 3,072 episodes → one iteration
}
# the data files a block reads, copied into its own directory: the first lines of the fixtures' files
DATA = ("prompts.jsonl", "demos.jsonl", "rankings.jsonl", "responses.parquet", "guide.md")

# a command's beginning → why CI does not run it
NOT_RUN = {
    "bash scripts/run.sh": "the whole default pipeline (8 min) after a venv setup; tests/test_pipeline.py runs it tiny",
    "bash scripts/test.sh": "the test suite itself",
    "bash .ci/run": "the CI itself",
    "torchrun --nproc_per_node 8": "8 processes, one per GPU; tests/test_distributed.py runs ppo under 2-process "
                                   "torchrun on CPU",
    "torchrun --nnodes 2": "two machines",
    "torchrun --nproc_per_node 1 benchmarks/gpu_check.py": "a CUDA GPU",
    "python benchmarks/gpu_check.py": "a CUDA GPU (tests/test_gpu_check.py runs its --tiny --device cpu smoke test)",
    "python3 -m venv /tmp/trlvenv": "installs TRL from PyPI (network)",
    ".venv/bin/python benchmarks/": "a benchmark: 30 s to minutes of a quiet machine",
    "python benchmarks/": "a benchmark: 30 s to minutes of a quiet machine",
    "pip install": "installs from PyPI (network)",
    "instructrl pipeline --float-path default:t1": "the whole default pipeline (8 min) in a child process; "
                                                   "tests/test_benchmarks.py runs float paths on configs/smoke.yaml",
    "instructrl pipeline --seeds 5 --float-paths": "ten default pipelines (80 min); tests/test_benchmarks.py runs 2 "
                                                   "seeds × 2 float paths on configs/smoke.yaml",
    "tensorboard --logdir": "TensorBoard's own viewer; tests/test_metrics.py reads the events with EventAccumulator",
}
# other programs' commands that CI runs (seconds each): test_scripts checks that their output is the README's
SCRIPTS = ["python benchmarks/memory_table.py --markdown"]
# inline spans that look like commands but are not ones
NOT_COMMANDS = {
    "instructrl COMMAND --help": "COMMAND stands for any command (each one's --help: tests/test_cli_help.py)",
    "instructrl label enqueue/serve/add-labeler/export/stats": "a list of the label commands",
    "--lr 0.001 → 0.002": "a quoted error message",
    "--flood-mb": "an option of benchmarks/label_load.py",
    "--no-heavy": "an option of benchmarks/serve_rm_load.py",
    "--smoke": "every benchmark's CI mode (tests/test_benchmarks.py runs each)",
    "eval --out": "a command's option named in prose (the output policy)",
    "--tiny --device cpu": "options of benchmarks/gpu_check.py",
}
PLACEHOLDERS = {"N": "2", "K": "4", "k": "4", "E": "1", "T": "6", "M": "2", "R": "8", "W": "1", "γ": "0.1", "ε": "0.1"}
PROGRAMS = ("instructrl", "python", "python3", ".venv/bin/python", "bash", "torchrun", "pip", "tensorboard")


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def fenced_commands() -> list[tuple[str, list[str]]]:
    """(where, commands) of every fenced shell block: continuation lines joined, comments dropped."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(bash|sh|shell|console)\n(.*?)^```", text, flags=re.S | re.M):
            joined = m[2].replace("\\\n", " ")
            commands = [" ".join(shlex.split(line, comments=True)) for line in joined.splitlines()]
            blocks.append((f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}", [c for c in commands if c]))
    return blocks


def inline_commands() -> list[str]:
    """Inline code spans that are a command line or options of one."""
    text = "\n".join(without_fences(d.read_text()) for d in DOCS)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)]  # a span may go on over a line break
    names = set(cli.STEPS) | set(typer.main.get_command(cli.app).commands)
    return [s for s in dict.fromkeys(spans)
            if s.split()[0] in PROGRAMS and len(s.split()) > 1 or s.startswith("--")
            or s.split()[0] in names and len(s.split()) > 1 and s.split()[1].startswith("--")]


def parsed_spans() -> list[str]:
    return [s for s in inline_commands() if s not in NOT_COMMANDS and s not in SCRIPTS and not not_run(s)]


def not_run(command: str) -> str | None:
    if command in SCRIPTS:
        return None
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def click_command(path: list[str]):
    command = typer.main.get_command(cli.app)
    for i, name in enumerate(path):
        command = cli._step_commands().commands[name] if i == 0 and name in cli.STEPS else command.commands[name]
    return command


def every_command() -> list:
    group = typer.main.get_command(cli.app)
    return [*cli._step_commands().commands.values(), group,
            *(c for n, c in group.commands.items() if n != "label"), *group.commands["label"].commands.values()]


def parses(command, args: list[str]) -> str | None:
    """None if `command` takes these arguments (options exist, values have their types, nothing left over), else
    the command line's complaint. Required options and arguments the span leaves out are filled with "X": an inline
    span may show a few options only."""
    for param in command.params:
        if param.required and not set(param.opts) & set(args):
            args += ["X"] if param.param_type_name == "argument" else [param.opts[0], "X"]
    try:
        command.make_context(command.name, args)
    except typer.TyperException as e:
        return e.format_message()
    return None


def inline_args(span: str) -> list[str]:
    """The span's words with its optional parts kept, the first of alternatives and placeholders filled."""
    words = shlex.split(span.replace("\\|", "|").replace("[", " ").replace("]", " "))
    return [PLACEHOLDERS.get(w, w.split("|")[0] if "|" in w and not w.startswith("-") else w) for w in words]


def check_inline(span: str) -> str | None:
    """None if the real command line takes `span`, else why not."""
    words = [w for w in inline_args(span) if w != "--help"]  # every command has --help
    if words[:1] == ["instructrl"]:
        words = words[1:]
    path = words[:2] if words[:1] == ["label"] else words[:1] if words and not words[0].startswith("-") else []
    args = words[len(path):]
    if not path and not args:  # `instructrl --help`
        return None
    if path:
        return parses(click_command(path), args)
    options = {c: [o for p in c.params for o in (*p.opts, *p.secondary_opts)] for c in every_command()}
    having = [c for c, opts in options.items() if args[0] in opts]
    if not having:
        return f"{args[0]} is an option of no command"
    if len(args) == 1:  # an option named in prose, its value elsewhere
        return None
    complaints = [parses(c, args) for c in having]
    return None if None in complaints else complaints[0]


def test_every_readme_command_is_run_parsed_or_listed(capsys):
    """The census: what runs (test_fenced_commands), what is parsed (test_inline_commands), what is listed."""
    fenced = [c for _, commands in fenced_commands() for c in commands]
    unknown = [c for c in fenced if not not_run(c) and not c.startswith("instructrl ")]
    assert not unknown, f"README commands neither run nor listed in NOT_RUN: {unknown}"
    inline = inline_commands()
    listed = [c for c in [*fenced, *inline] if not_run(c)]
    parsed = parsed_spans()
    unknown = [s for s in parsed if s.split()[0] in PROGRAMS and s.split()[0] != "instructrl"]
    assert not unknown, f"inline commands neither parsed nor listed in NOT_RUN: {unknown}"
    with capsys.disabled():
        print(f"\nREADME commands: {len(fenced) - sum(map(bool, map(not_run, fenced)))} fenced run, {len(SCRIPTS)} "
              f"scripts run, {len(parsed)} inline parsed, {len(listed)} listed as not run in CI:")
        for c in listed:
            print(f"  {c[:70]}: {not_run(c)}")


@pytest.mark.parametrize("span", parsed_spans())
def test_inline_commands(span, monkeypatch):
    monkeypatch.chdir(ROOT)  # the files a span names are the repository's (`--config configs/ppo.yaml` is read)
    assert check_inline(span) is None, f"README `{span}`: {check_inline(span)}"


def test_listed_commands_parse():
    """Commands CI does not run still parse, where they are instructrl's (torchrun … -m instructrl.cli ppo …)."""
    for _, commands in fenced_commands():
        for c in commands:
            if not_run(c) and "instructrl.cli " in c:
                args = shlex.split(c.split("instructrl.cli ", 1)[1])
                assert parses(click_command(args[:1]), args[1:]) is None, c


def test_inline_check_catches_what_the_readme_got_wrong():
    """The check is not vacuous: the README's old spelling of Dr. GRPO and misspelt options fail it."""
    assert "extra argument" in check_inline("--scale-rewards false")
    assert check_inline("--no-scale-rewards") is None
    assert check_inline("--scale-reward") == "--scale-reward is an option of no command"
    assert check_inline("instructrl ppo --episodes many")
    assert check_inline("instructrl grpo --policy A --reward B --group-size k") is None  # k is filled: 4
    assert check_inline("pg --baseline loo") is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts(script):
    """The README quotes what the script prints, line for line."""
    shown = [c for _, commands in fenced_commands() for c in commands] + inline_commands()
    assert script in shown, f"{script} is no longer in the README"
    r = subprocess.run(shlex.split(script.replace("python", sys.executable, 1)), cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    readme = (ROOT / "README.md").read_text()
    assert [line for line in r.stdout.splitlines() if line not in readme] == []


def test_repository_paths_exist():
    text = "\n".join(d.read_text() for d in DOCS)
    paths = set(re.findall(r"(?<![\w/.-])((?:src|tests|benchmarks|configs|scripts|docs)/[\w./-]*\w)", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the README names files that are not in the repository: {missing}"


@pytest.fixture(scope="module")
def fixtures(tiny_lm_dir, tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("readme-data")
    for name, source, lines in (("prompts.jsonl", world_dir / "prompts_train.jsonl", 4),
                                ("demos.jsonl", world_dir / "demos.jsonl", 24),
                                ("rankings.jsonl", tiny_rm_dir.parent / "rankings.jsonl", 16)):
        (data / name).write_text("".join(source.read_text().splitlines(True)[:lines]))  # a few lines: seconds
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([  # `label import`'s per-task layout: two models' responses to a prompt
        {"prompt": f"User: what is {i} plus 1?\nAssistant:", "responses": [f" {i + 1}.", " I don't know."],
         "models": ["model-a", "model-b"]} for i in range(3)]), data / "responses.parquet")
    (data / "guide.md").write_text("# Guidelines\n\nRank **correct** answers first.\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"sft": str(tiny_sft_dir), "lm": str(tiny_lm_dir), "port": str(port), "data": data}


def serve(args: list[str], port: str, cwd: Path) -> None:
    """A server command: it must answer GET / within a minute; then it is stopped."""
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            assert proc.poll() is None, f"{args} exited {proc.returncode}: {proc.stdout.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"{args} did not answer on port {port}")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("where,commands", [b for b in fenced_commands() if not all(map(not_run, b[1]))],
                         ids=[w for w, cs in fenced_commands() if not all(map(not_run, cs))])
def test_fenced_commands(where, commands, fixtures, tmp_path, monkeypatch):
    """A block's commands in order, in a directory of their own holding the data files they read."""
    monkeypatch.chdir(tmp_path)
    for command in commands:
        if not_run(command):
            continue
        for name in DATA:
            if re.search(rf"(--data|--prompts|--demos|--guidelines|label import) {re.escape(name)}\b", command):
                (tmp_path / name).write_bytes((fixtures["data"] / name).read_bytes())
        for text, replacement in SUBSTITUTE.items():
            command = command.replace(text, replacement.format(**fixtures))
        args = inline_args(command)[1:]
        if args[:2] == ["label", "serve"]:
            serve(args, fixtures["port"], tmp_path)
            continue
        r = CliRunner().invoke(cli.app, args)
        assert r.exit_code == 0, f"{where}: {command}\n{r.output}\n{r.exception!r}"


def test_dpo_refuses_torchrun(tiny_sft_dir, tmp_path, monkeypatch, capsys):
    """README: DPO runs in one process ("torchrun is refused"): under torchrun's WORLD_SIZE=2 it stops before
    joining a process group, exit code 2, one line, nothing written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["instructrl", "dpo", "--policy", str(tiny_sft_dir), "--data",
                                      str(tmp_path / "rankings.jsonl"), "--out", str(tmp_path / "dpo")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "single process" in err, err
    assert list(tmp_path.iterdir()) == []
