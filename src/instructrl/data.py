"""The JSONL data formats, validated once at the edge.

Formats (one JSON object per line; extra fields are allowed and ignored):
  prompts        {"prompt": str}
  demos          {"prompt": str, "response": str}
  rankings       {"prompt": str, "responses": [str, ...K], "ranking": [int | [int, ...], ...]}
                 ranking: indices into responses, best first, each exactly once; a nested list is a tie.
  pairs          {"prompt": str, "chosen": str, "rejected": str}   (the K = 2 case of rankings)
  text           {"text": str}                                     (pretraining corpus)

Every problem raises DataError naming the file, the line and the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer line is almost certainly not one record


class DataError(ValueError):
    """Malformed input. The CLI prints it and exits with code 2."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}" + (f":{line}" if line else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


@dataclass
class Ranking:
    """K responses to one prompt, ranked best first; each group holds indices that tie."""

    prompt: str
    responses: list[str]
    groups: list[list[int]]
    extra: dict = field(default_factory=dict)
    line: int | None = None  # where it came from, for error messages

    def pairs(self) -> list[tuple[int, int]]:
        """All (winner, loser) index pairs implied by the ranking; tied pairs are skipped [IG Eq. 1]."""
        out = []
        for i, better in enumerate(self.groups):
            for worse in self.groups[i + 1:]:
                out.extend((w, l) for w in better for l in worse)
        return out

    def to_json(self) -> dict:
        ranking = [g[0] if len(g) == 1 else list(g) for g in self.groups]
        return {"prompt": self.prompt, "responses": self.responses, "ranking": ranking, **self.extra}


def _str_field(obj: dict, name: str, path, line: int, allow_empty: bool = False) -> str:
    if name not in obj:
        raise DataError(path, line, "missing required field", name)
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(path, line, f"expected a string, got {type(value).__name__}", name)
    if not allow_empty and not value.strip():
        raise DataError(path, line, "must not be empty", name)
    return value


def iter_json_lines(path: str | os.PathLike) -> Iterable[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise DataError on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    n_records = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(path, line_no, f"line longer than {MAX_LINE_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, f"not valid UTF-8 (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            n_records += 1
            yield line_no, obj
    if n_records == 0:
        raise DataError(path, None, "file is empty (no records)")


def parse_ranking_groups(ranking: Any, k: int, path="<input>", line: int | None = None) -> list[list[int]]:
    """Validate a ranking against K responses and return it as groups of tied indices, best first."""
    if not isinstance(ranking, list) or not ranking:
        raise DataError(path, line, "expected a non-empty list of indices", "ranking")
    groups, seen = [], []
    for item in ranking:
        group = item if isinstance(item, list) else [item]
        if not group:
            raise DataError(path, line, "a tie group must not be empty", "ranking")
        for idx in group:
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise DataError(path, line, f"indices must be integers, got {idx!r}", "ranking")
            if not 0 <= idx < k:
                raise DataError(path, line, f"index {idx} out of range for {k} responses", "ranking")
        groups.append(list(group))
        seen.extend(group)
    if sorted(seen) != list(range(k)):
        dup = sorted({i for i in seen if seen.count(i) > 1})
        missing = sorted(set(range(k)) - set(seen))
        detail = (f"repeated {dup}" if dup else "") + ("; " if dup and missing else "") + (f"missing {missing}" if missing else "")
        raise DataError(path, line, f"not a permutation of 0..{k - 1}: {detail}", "ranking")
    return groups


def parse_ranking_record(obj: dict, path="<input>", line: int | None = None) -> Ranking:
    """A rankings or pairs record → Ranking (pairs become K = 2)."""
    prompt = _str_field(obj, "prompt", path, line)
    known = {"prompt", "responses", "ranking", "chosen", "rejected"}
    extra = {k: v for k, v in obj.items() if k not in known}
    if "chosen" in obj or "rejected" in obj:
        chosen = _str_field(obj, "chosen", path, line)
        rejected = _str_field(obj, "rejected", path, line)
        if chosen == rejected:
            raise DataError(path, line, "chosen and rejected are the same text", "rejected")
        return Ranking(prompt, [chosen, rejected], [[0], [1]], extra, line)
    if "responses" not in obj:
        raise DataError(path, line, "missing required field (or give 'chosen'/'rejected')", "responses")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise DataError(path, line, f"expected a list of strings, got {type(responses).__name__}", "responses")
    if len(responses) < 2:
        raise DataError(path, line, f"need K >= 2 responses, got {len(responses)}", "responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(path, line, f"responses[{i}] is {type(r).__name__}, expected a string", "responses")
        if not r.strip():
            raise DataError(path, line, f"responses[{i}] is empty", "responses")
    if len(set(responses)) != len(responses):
        raise DataError(path, line, "duplicate responses (rank distinct texts; mark equal quality as a tie)", "responses")
    if "ranking" not in obj:
        raise DataError(path, line, "missing required field", "ranking")
    groups = parse_ranking_groups(obj["ranking"], len(responses), path, line)
    return Ranking(prompt, list(responses), groups, extra, line)


def _records(path, lines: list[int] | None):
    """iter_json_lines, also collecting each record's line number into `lines` when a list is given."""
    for n, o in iter_json_lines(path):
        if lines is not None:
            lines.append(n)
        yield n, o


def read_prompts(path, lines: list[int] | None = None) -> list[str]:
    return [_str_field(o, "prompt", path, n) for n, o in _records(path, lines)]


def read_demos(path, lines: list[int] | None = None) -> list[tuple[str, str]]:
    return [(_str_field(o, "prompt", path, n), _str_field(o, "response", path, n)) for n, o in _records(path, lines)]


def read_texts(path, lines: list[int] | None = None) -> list[str]:
    return [_str_field(o, "text", path, n) for n, o in _records(path, lines)]


def read_rankings(path) -> list[Ranking]:
    return [parse_ranking_record(o, path, n) for n, o in iter_json_lines(path)]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], overwrite: bool = True) -> None:
    """Write records atomically: a temp file in the same directory, fsync, rename (see atomic_write_text)."""
    from .utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), overwrite)


# --- tokenisation and collation shared by SFT and the reward model ------------------------------------------
def encode_example(tokenizer, prompt: str, response: str, max_len: int, truncate: bool) -> tuple[list[int], int]:
    """Prompt ids + response ids + EOS, and the number of prompt tokens (masked out of the loss)."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(r) >= max_len:
        raise ValueError(f"response of {len(r)} tokens does not fit the context of {max_len}")
    if len(p) + len(r) > max_len:
        if not truncate:
            raise ValueError(f"prompt + response is {len(p) + len(r)} tokens, more than the context of {max_len} "
                                "(use --truncate-prompts to cut prompts from the left)")
        p = p[len(p) + len(r) - max_len:]
    return p + r, len(p)


def collate_right(examples: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input ids, attention mask and the loss mask over targets (response tokens only)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width - 1))
    for i, (seq, n_prompt) in enumerate(examples):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        loss_mask[i, n_prompt - 1: len(seq) - 1] = 1.0  # target t+1 is a response token
    return ids, mask, loss_mask


