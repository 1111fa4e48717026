"""`instructrl label ...`: fill the task queue (sample from a policy, or import responses you have), serve the app,
manage labelers (add, revoke, exclude from exports), export (per labeler or consensus; K-way or pairs), stats.

`--db` takes any SQLAlchemy URL, or a SQLite file path; only add-labeler, enqueue and `serve --create` start a new
database, so a mistyped path is an error. Bad input prints one clear line and exits with code 2.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from ..data import DataError
from . import store

label_app = typer.Typer(help="Human feedback: rank sampled responses in a web app backed by a database.",
                        rich_markup_mode=None,  # click's help: long option names whole (instructrl.cli says why)
                        no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)  # one message, one line: greppable, never wrapped
out = Console()

Db = Annotated[str, typer.Option("--db", help="SQLAlchemy URL, or the path of an existing SQLite file")]
NewDb = Annotated[str, typer.Option("--db", help="SQLAlchemy URL, or a SQLite file path (created if missing)")]


@contextlib.contextmanager
def clean_errors():
    """Expected failures become one red line and exit code 2, not a traceback."""
    try:
        yield
    except (DataError, store.StoreError, ValueError, FileNotFoundError, SQLAlchemyError) as e:
        message = str(getattr(e, "orig", None) or e)  # the driver's own words, without SQLAlchemy's links
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        raise typer.Exit(2) from None


def sample_candidates(model, tokenizer, prompts: list[str], k: int, *, max_new_tokens: int, temperature: float,
                      seed: int, batch_size: int = 64, rounds: int = 2) -> list[list[str]]:
    """Up to k distinct non-empty responses per prompt; each round samples 2k per prompt still short of k."""
    import torch

    from ..models import context_length
    from ..chat import stop_token_id
    from ..sampling import decode_responses, encode_prompts, sample

    ids = encode_prompts(tokenizer, prompts, context_length(model) - max_new_tokens)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    found: list[list[str]] = [[] for _ in prompts]
    for _ in range(rounds):
        rows = [i for i in range(len(prompts)) if len(found[i]) < k for _ in range(2 * k)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = sample(model, [ids[i] for i in chunk], eos_id=stop_token_id(tokenizer),
                           pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
                           generator=gen)
            for i, text in zip(chunk, decode_responses(tokenizer, batch)):
                if text.strip() and text not in found[i] and len(found[i]) < k:
                    found[i].append(text)
    return found


@label_app.command()
def enqueue(policy: Annotated[Path, typer.Option(help="policy model directory")],
            prompts: Annotated[Path, typer.Option(help="prompts JSONL: {\"prompt\": str} per line")],
            db: NewDb,
            k: Annotated[int, typer.Option("--k", help="responses per task")] = 4,
            max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
            device: str = "auto"):
    """Sample K distinct responses per prompt from a policy and store them as ranking tasks."""
    with clean_errors():
        if k < 2:
            raise DataError("--k", None, f"need K >= 2 responses to rank, got {k}")
        if temperature <= 0:
            raise DataError("--temperature", None, "must be > 0: greedy decoding gives K copies of one response")
        from ..data import read_prompts
        from ..models import load_causal_lm, load_tokenizer
        from ..utils import resolve_device

        texts = read_prompts(prompts)
        model = load_causal_lm(policy, device=resolve_device(device))
        tokenizer = load_tokenizer(policy)
        found = sample_candidates(model, tokenizer, texts, k, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, batch_size=batch_size)
        keep = [i for i, rs in enumerate(found) if len(rs) >= 2]
        ids = store.enqueue_tasks(db, [texts[i] for i in keep], [found[i] for i in keep])
        short = sum(1 for i in keep if len(found[i]) < k)
        err.print(f"enqueued {len(ids)} tasks; skipped {len(texts) - len(keep)} prompts with < 2 distinct responses; "
                  f"{short} tasks have fewer than {k} responses")


@label_app.command("import")
def import_(file: Annotated[Path, typer.Argument(help="JSONL, .json/.parquet/.arrow, or a `datasets` directory")],
            db: NewDb, split: Annotated[str | None, typer.Option(help="split of a `datasets` source")] = None,
            shuffle: Annotated[bool, typer.Option(help="show each labeler the responses in their own random "
                                                       "order")] = True):
    """Import responses you already have as ranking tasks: {prompt, responses, models?} per task, or {prompt,
    response|completion, model?} / {messages, model?} per response (grouped by prompt). Prompts may be
    conversations. Model names are kept for export and stats, never shown to labelers."""
    from .importer import read_candidates

    with clean_errors():
        found = read_candidates(file, split)
        named = found[0].models[0] is not None
        ids = store.enqueue_tasks(db, [t.prompt for t in found], [t.responses for t in found],
                                  [t.models for t in found] if named else None, shuffle=shuffle)
    models = sorted({m for t in found for m in t.models if m})
    err.print(f"imported {len(ids)} tasks ({sum(len(t.responses) for t in found)} responses)"
              + (f" from models {', '.join(map(escape, models))}" if models else ""))


@label_app.command()
def serve(db: Db, host: str = "127.0.0.1", port: int = 8000,
          max_labelers_per_task: Annotated[int, typer.Option(help="rankings collected per task")] = 3,
          lease_seconds: Annotated[float, typer.Option(help="how long a shown task is held for its labeler")] = 600,
          max_body_bytes: Annotated[int, typer.Option(help="larger request bodies are refused with 413")]
          = store.MAX_BODY_BYTES,
          create: Annotated[bool, typer.Option("--create", help="start a new database if none is at --db")] = False,
          guidelines: Annotated[Path | None, typer.Option(help="labeling guidelines (Markdown), shown at "
                                                              "/guidelines and linked from the ranking page")] = None,
          access_log: bool = True):
    """Serve the ranking page at /, the review page at /review, and the JSON API under /api/ (OpenAPI at
    /openapi.json)."""
    import uvicorn

    from .app import create_app

    with clean_errors():
        text = None
        if guidelines is not None:
            try:
                text = guidelines.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(guidelines, None, f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
        app = create_app(db, max_labelers_per_task, lease_seconds, create=create, max_body_bytes=max_body_bytes,
                         guidelines=text)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] serving on {host} over plain HTTP: tokens travel in the clear; "
                  "put an HTTPS reverse proxy in front")
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")


@label_app.command("add-labeler")
def add_labeler(name: str, db: NewDb,
                reviewer: Annotated[bool, typer.Option("--reviewer", help="may also open the review page (every "
                                                                         "labeler's rankings)")] = False):
    """Create a labeler and print its token (shown this once; only its SHA-256 hash is stored)."""
    with clean_errors():
        token = store.add_labeler(db, name, reviewer)
    print(token)
    err.print(f"labeler {escape(repr(name))} created; give them the token above (it cannot be shown again)")


@label_app.command()
def revoke(labeler: Annotated[str, typer.Argument(help="the labeler's name, or id")], db: Db):
    """Revoke a labeler's token: it stops working at once (their rankings stay, and are exported)."""
    with clean_errors():
        name, labeler_id, already = store.revoke_labeler(db, labeler)
    err.print(f"labeler {escape(repr(name))} (id {labeler_id}) " + ("was already revoked" if already else "revoked"))


def _set_excluded(labeler: str, db: str, excluded: bool) -> None:
    with clean_errors():
        name, labeler_id, already = store.exclude_labeler(db, labeler, excluded)
    state = "excluded from exports" if excluded else "included in exports"
    err.print(f"labeler {escape(repr(name))} (id {labeler_id}) " + ("was already " if already else "is now ") + state)


@label_app.command()
def exclude(labeler: Annotated[str, typer.Argument(help="the labeler's name, or id")], db: Db):
    """Leave a labeler's rankings out of every export and consensus (nothing is deleted; `include` undoes it)."""
    _set_excluded(labeler, db, True)


@label_app.command()
def include(labeler: Annotated[str, typer.Argument(help="the labeler's name, or id")], db: Db):
    """Put an excluded labeler's rankings back into the exports."""
    _set_excluded(labeler, db, False)


@label_app.command()
def export(db: Db, out_path: Annotated[Path, typer.Option("--out", help="file to write")],
           fmt: Annotated[str, typer.Option("--format", help="jsonl: K-way rankings; parquet: the same as a "
                                                               "table; pairs: prompt/chosen/rejected (parquet when "
                                                               "--out ends in .parquet)")] = "jsonl",
           consensus: Annotated[bool, typer.Option("--consensus", help="one record per task: its labelers' "
                                                                         "rankings by mean rank (Borda)")] = False,
           implicit_prompt: Annotated[bool, typer.Option("--implicit-prompt", help="pairs as whole transcripts "
                                                                                     "{chosen, rejected}")] = False,
           overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False):
    """Write the rankings for `instructrl rm`/`dpo` or TRL (atomically; never over an existing file by default).
    Excluded labelers are left out."""
    from .export import export_rankings

    with clean_errors():
        n, all_tied = export_rankings(db, out_path, overwrite=overwrite, fmt=fmt, use_consensus=consensus,
                                      implicit_prompt=implicit_prompt)
    what = ("pairs" if fmt == "pairs" else "consensus rankings" if consensus else "rankings")
    err.print(f"wrote {n} {what} to {out_path}" + ("" if n else " [yellow](none yet: the file is empty)[/yellow]"))
    if all_tied:
        err.print(f"[yellow]left out {all_tied} rankings that tie all responses (no comparison to learn from)[/yellow]")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


@label_app.command()
def stats(db: Db, as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False):
    """Tasks done, rankings per labeler, and inter-labeler agreement on shared tasks."""
    from .export import compute_stats

    with clean_errors():
        s = compute_stats(db)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    summary = Table(title="labeling progress")
    for col in ("tasks", "ranked ≥1", "shared ≥2", "rankings", "skips", "pair agreement", "Kendall τ"):
        summary.add_column(col, justify="right")
    a = s["agreement"]
    summary.add_row(*map(str, (s["tasks"], s["tasks_ranked"], s["tasks_shared"], s["rankings"], s["skips"])),
                    _fmt(a["pairwise_agreement"]), _fmt(a["kendall_tau"]))
    out.print(summary)
    per = Table(title="labelers (agreement with the others on shared tasks)")
    for col in ("labeler", "rankings", "skips", "flags", "comparisons", "pair agreement", "Kendall τ"):
        per.add_column(col, justify="left" if col == "labeler" else "right")
    for l in s["labelers"]:
        per.add_row(Text(l["name"] + (" (excluded)" if l["excluded"] else "")), str(l["rankings"]), str(l["skips"]),
                    str(l["flags"]), str(l["comparisons"]),
                    _fmt(l["pairwise_agreement"]), _fmt(l["kendall_tau"]))
    out.print(per)
    if s["models"]:
        models = Table(title="models (pairs of responses by two models, in the included labelers' rankings)")
        for col in ("model", "wins", "losses", "ties", "win rate"):
            models.add_column(col, justify="left" if col == "model" else "right")
        for name, m in s["models"].items():
            models.add_row(Text(name), str(m["wins"]), str(m["losses"]), str(m["ties"]), _fmt(m["win_rate"]))
        out.print(models)
    if s["flags"]:
        out.print("flags: " + ", ".join(f"{k} {v}" for k, v in sorted(s["flags"].items())))


if __name__ == "__main__":
    label_app()
