"""Read responses a team already has (from several models, a dataset, another tool) into ranking tasks.

Two layouts, in any file `instructrl.data.iter_records` reads (JSONL, .json/.parquet/.arrow, `datasets` dirs):
  wide   {"prompt": P, "responses": [R, ...K], "models": [name, ...K]?}       one task per record
  long   {"prompt": P, "response" | "completion": R, "model": name?}            one response per record,
         or {"messages": [... conversation ending with the assistant's answer], "model": name?}
         records with the same prompt become one task, in the order the prompts first appear.
P is a string or a conversation (messages), R a string or assistant messages, as everywhere in instructrl.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..data import COLUMNS, Columns, DataError, Row, _key, iter_records, parse_candidates, parse_demo_record

MAX_K = 64  # the app's limit on responses per task


@dataclass
class Candidates:
    prompt: object
    responses: list = field(default_factory=list)
    models: list = field(default_factory=list)
    lines: list = field(default_factory=list)


def _model(obj: dict, name: str, path, line) -> str | None:
    value = obj.get(name)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise DataError(path, line, "must be a non-empty string", name)
    return value


def read_candidates(path: str | os.PathLike, split: str | None = None,
                    columns: Columns = COLUMNS) -> list[Candidates]:
    """Each prompt with its K >= 2 distinct responses and (when the file names them) their models."""
    c = columns
    needs = [(c.prompt, c.responses), (c.prompt, c.completion), (c.prompt, c.response), (c.messages,)]
    tasks: dict[str, Candidates] = {}
    for line, obj in iter_records(path, split, needs):
        if c.responses in obj:
            prompt, responses = parse_candidates(obj, path, line, c)
            models = obj.get("models", [None] * len(responses))
            if not isinstance(models, list) or len(models) != len(responses):
                raise DataError(path, line, f"expected a list of {len(responses)} model names", "models")
            models = [_model({"models": m}, "models", path, line) for m in models]
            key = f"{line}"  # a wide record is its own task
        else:
            prompt, response = parse_demo_record(obj, path, line, c)
            responses, models, key = [response], [_model(obj, "model", path, line)], _key(prompt)
        task = tasks.setdefault(key, Candidates(prompt))
        for r, m in zip(responses, models):
            keys = [_key(x) for x in task.responses]
            if _key(r) in keys:
                j = keys.index(_key(r))
                raise DataError(path, line, f"the same response as at {_where(task.lines[j])}"
                                + (f" (models {task.models[j]!r} and {m!r})" if m else "")
                                + ": ranking equal texts compares nothing; keep one",
                                c.responses if c.responses in obj else None)
            task.responses.append(r)
            task.models.append(m)
            task.lines.append(line)
    out = list(tasks.values())
    named = {m is not None for t in out for m in t.models}
    if len(named) > 1:
        t = next(t for t in out if None in t.models)
        raise DataError(path, t.lines[t.models.index(None)], "has no model name, but other records have one", "model")
    for t in out:
        if len(t.responses) < 2:
            raise DataError(path, t.lines[0], "this prompt has only one response; a task ranks K >= 2", c.prompt)
        if len(t.responses) > MAX_K:
            raise DataError(path, t.lines[0], f"this prompt has {len(t.responses)} responses; at most {MAX_K}",
                            c.prompt)
    return out


def _where(line) -> str:
    return f"row {line}" if isinstance(line, Row) else f"line {line}"
