"""The data formats, validated once at the edge.

Formats (one record per line of JSONL, or per row of any table `datasets` loads; extra fields are ignored):
  prompts        {"prompt": P}
  demos          {"prompt": P, "completion": R}  ("response" as well), or {"messages": [message, ...]}
  rankings       {"prompt": P, "responses": [R, ...K], "ranking": [int | [int, ...], ...]}
                 ranking: indices into responses, best first, each exactly once; a nested list is a tie.
  pairs          {"prompt": P, "chosen": R, "rejected": R}   (the K = 2 case of rankings)
                 or {"chosen": T, "rejected": T}: whole transcripts whose shared beginning is the prompt
  text           {"text": str}                               (pretraining corpus)
P is a string or a list of messages {"role": "system" | "user" | "assistant", "content": str} that does not end
with the assistant's turn; R is a string or messages that begin and end with the assistant's turn; T is a
string or messages. These are TRL's standard and conversational forms.

Every problem raises DataError naming the file, the line (JSONL) or row (tables) and the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Union

from . import hub

MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer line is almost certainly not one record


class Row(int):
    """A 0-based row of a table (parquet, arrow, `datasets`); a plain int is a 1-based JSONL line. Being an int,
    it travels wherever a line number does (Ranking.line, the `lines` lists) and DataError names it right."""


class DataError(ValueError):
    """Malformed input. The CLI prints it and exits with code 2."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        at = f", row {line}" if isinstance(line, Row) else f":{line}" if line else ""
        super().__init__(f"{path}{at}" + (f": field '{field}'" if field else "") + f": {message}")


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, list]  # text, or messages that do not end with the assistant's turn
Response = Union[str, list]  # text, or messages that begin and end with the assistant's turn
ROLES = ("system", "user", "assistant")


class Demo(NamedTuple):
    """One demonstration: its loss covers the completion's assistant turns. A tuple, so `p, r = demo` works."""

    prompt: Prompt
    completion: Response


@dataclass(frozen=True)
class Columns:
    """The column holding each field: TRL's names (and our "response") unless mapped, e.g. Columns(prompt="q")."""

    prompt: str = "prompt"
    completion: str = "completion"
    response: str = "response"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    ranking: str = "ranking"
    text: str = "text"


COLUMNS = Columns()


@dataclass
class Ranking:
    """K responses to one prompt, ranked best first; each group holds indices that tie."""

    prompt: Prompt
    responses: list[Response]
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


def refuse_all_tied(rankings: list[Ranking], path) -> None:
    """An all-tied ranking has no (winner, loser) pair: nothing to learn, a NaN loss if alone in a batch (RM, DPO)."""
    for r in rankings:
        if len(r.groups) < 2:
            raise DataError(path, r.line, "every response is tied: the ranking compares nothing (rank at least two "
                                          "groups, or leave the record out)", "ranking")


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


def _transcript(value: Any, path, line, name: str, item: str | None = None) -> Prompt:
    """A non-empty string or a valid list of messages (only role and content kept: tables fill absent keys with
    None). `item` names the value when it is one item of the field, e.g. 'responses[1]'."""
    at = f"{item}: " if item else ""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, line, f"{at}must not be empty", name)
        return value
    if not isinstance(value, list):
        raise DataError(path, line, f"{at}expected a string or a list of messages, got {type(value).__name__}", name)
    if not value:
        raise DataError(path, line, f"{at}expected a non-empty list of messages", name)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(path, line, f"{at}message {i} is {type(m).__name__}, expected an object", name)
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise DataError(path, line, f"{at}message {i} has no 'role'", name)
        if role not in ROLES:
            raise DataError(path, line, f"{at}message {i} has unknown role {role!r} (expected one of "
                                        f"{', '.join(ROLES)})", name)
        if content is None or isinstance(content, str) and not content.strip():
            raise DataError(path, line, f"{at}message {i} ({role}) has no content", name)
        if not isinstance(content, str):
            raise DataError(path, line, f"{at}message {i} ({role}): content must be a string, got "
                                        f"{type(content).__name__}", name)
        out.append({"role": role, "content": content})
    return out


def _prompt(obj: dict, name: str, path, line) -> Prompt:
    if name not in obj:
        raise DataError(path, line, "missing required field", name)
    prompt = _transcript(obj[name], path, line, name)
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise DataError(path, line, "a prompt must not end with the assistant's turn (nothing is left to answer)", name)
    return prompt


def _response(value: Any, path, line, name: str, item: str | None = None) -> Response:
    response = _transcript(value, path, line, name, item)
    if isinstance(response, list):
        for end, which in ((0, "first"), (-1, "last")):
            if response[end]["role"] != "assistant":
                raise DataError(path, line, (f"{item}: " if item else "") + f"the {which} turn must be the "
                                            f"assistant's, not the {response[end]['role']}'s", name)
    return response


def parse_demo_record(obj: dict, path="<input>", line: int | None = None, columns: Columns = COLUMNS) -> Demo:
    """A demonstration: prompt and completion (or response), or a whole conversation under `messages`, split
    before its first assistant turn (every assistant turn after it is in the loss)."""
    c = columns
    if c.messages in obj:
        messages = _transcript(obj[c.messages], path, line, c.messages)
        if isinstance(messages, str):
            raise DataError(path, line, "expected a list of messages, got a string", c.messages)
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if not first:  # None: no assistant turn; 0: nothing before it
            raise DataError(path, line, "needs a user turn followed by an assistant turn", c.messages)
        return Demo(messages[:first], _response(messages[first:], path, line, c.messages))
    prompt = _prompt(obj, c.prompt, path, line)
    name = c.completion if c.completion in obj else c.response
    if name not in obj:
        raise DataError(path, line, f"missing required field (or give '{c.completion}', or '{c.messages}')", name)
    return Demo(prompt, _response(obj[name], path, line, name))


HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH's turn marker: implicit prompts end with the last shared one


def _split_turns(a: list, b: list) -> int:
    """The most whole turns both share such that both continue with an assistant turn."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and not (n < len(a) and n < len(b) and a[n]["role"] == b[n]["role"] == "assistant"):
        n -= 1
    return n


def _split_text(a: str, b: str) -> int:
    n = len(os.path.commonprefix([a, b]))
    if HH_ASSISTANT in a or HH_ASSISTANT in b:
        cut = a.rfind(HH_ASSISTANT, 0, n)
        return cut + len(HH_ASSISTANT) if cut >= 0 else 0
    # the last whitespace both texts go on with: no word is split and neither rest is empty
    i = next((i for i in range(min(n, len(a) - 1, len(b) - 1), 0, -1) if a[i].isspace() and b[i].isspace()), 0)
    return len(a[:i].rstrip())  # the rests keep the leading whitespace, as GPT-style tokens do


def split_prompt(chosen: Prompt, rejected: Prompt) -> tuple[Prompt, Response, Response]:
    """The implicit prompt of two whole transcripts (Anthropic HH): (prompt, chosen's rest, rejected's rest).

    Messages: the longest run of whole turns both share after which both continue with an assistant turn.
    Text with HH's "\n\nAssistant:" markers: up to and including the last marker both share.
    Other text: the common prefix up to its last whitespace (so no word is split and neither rest is empty);
    the rests start with that whitespace.
    Raises ValueError when the transcripts are identical or share no such prefix.
    """
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same")
    n = _split_turns(chosen, rejected) if isinstance(chosen, list) else _split_text(chosen, rejected)
    if n == 0:
        raise ValueError("chosen and rejected share no prompt (no common beginning before an assistant turn)")
    return chosen[:n], chosen[n:], rejected[n:]


def _pair(obj: dict, path, line, c: Columns) -> tuple[Prompt, list[Response]]:
    for name in (c.chosen, c.rejected):
        if name not in obj:
            raise DataError(path, line, "missing required field", name)
    explicit = c.prompt in obj
    prompt = _prompt(obj, c.prompt, path, line) if explicit else None
    check = _response if explicit else _transcript
    chosen, rejected = (check(obj[n], path, line, n) for n in (c.chosen, c.rejected))
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(path, line, f"must be the same form as '{c.chosen}' (both text or both messages)", c.rejected)
    if chosen == rejected:
        raise DataError(path, line, "chosen and rejected are the same text", c.rejected)
    if not explicit:
        try:
            prompt, chosen, rejected = split_prompt(chosen, rejected)
        except ValueError as e:
            raise DataError(path, line, str(e), c.chosen) from None
        chosen, rejected = (_response(r, path, line, n) for r, n in ((chosen, c.chosen), (rejected, c.rejected)))
    return prompt, [chosen, rejected]


def _key(response: Response) -> str:
    return json.dumps(response, sort_keys=True)


def parse_candidates(obj: dict, path="<input>", line: int | None = None,
                     columns: Columns = COLUMNS) -> tuple[Prompt, list[Response]]:
    """The prompt and its K >= 2 distinct responses of a rankings record (or of one not ranked yet)."""
    c = columns
    prompt = _prompt(obj, c.prompt, path, line)
    if c.responses not in obj:
        raise DataError(path, line, "missing required field", c.responses)
    responses = obj[c.responses]
    if not isinstance(responses, list):
        raise DataError(path, line, f"expected a list of responses, got {type(responses).__name__}", c.responses)
    if len(responses) < 2:
        raise DataError(path, line, f"need K >= 2 responses, got {len(responses)}", c.responses)
    responses = [_response(r, path, line, c.responses, f"responses[{i}]") for i, r in enumerate(responses)]
    if len({_key(r) for r in responses}) != len(responses):
        raise DataError(path, line, "duplicate responses (rank distinct texts; mark equal quality as a tie)",
                        c.responses)
    return prompt, responses


def parse_ranking_record(obj: dict, path="<input>", line: int | None = None, columns: Columns = COLUMNS) -> Ranking:
    """A rankings or pairs record → Ranking (pairs become K = 2)."""
    c = columns
    extra = {k: v for k, v in obj.items() if k not in {c.prompt, c.responses, c.ranking, c.chosen, c.rejected}}
    if c.chosen in obj or c.rejected in obj:
        prompt, responses = _pair(obj, path, line, c)
        return Ranking(prompt, responses, [[0], [1]], extra, line)
    if c.responses not in obj:
        _prompt(obj, c.prompt, path, line)
        raise DataError(path, line, f"missing required field (or give '{c.chosen}'/'{c.rejected}')", c.responses)
    prompt, responses = parse_candidates(obj, path, line, c)
    if c.ranking not in obj:
        raise DataError(path, line, "missing required field", c.ranking)
    groups = parse_ranking_groups(obj[c.ranking], len(responses), path, line)
    return Ranking(prompt, responses, groups, extra, line)


# --- sources: JSONL read here line by line, everything else through `datasets` --------------------------------
TABLE_BUILDERS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def load_table(path: str | os.PathLike, split: str | None = None):
    """One split of a .json, .parquet or .arrow file, of a `save_to_disk` directory, or of a directory of data
    files, as a `datasets.Dataset`. A file is the one split "train"; `split` None means "train" or the only one."""
    import datasets

    path = Path(path)
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        else:
            loaded = datasets.load_dataset(TABLE_BUILDERS[path.suffix], data_files=str(path))
    except Exception as e:  # any failure to read the source is the input's problem: name it
        raise DataError(path, None, f"cannot load: {type(e).__name__}: {e}") from None
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if split is None:
        split = next(iter(splits)) if len(splits) == 1 else "train"
    if split not in splits:
        raise DataError(path, None, f"no split '{split}' (splits: {', '.join(splits)})", "split")
    return splits[split]


def _check_columns(path, found: list[str], needs: list[tuple[str, ...]]) -> None:
    """A table must hold one of the column sets in `needs`; else name the first missing column of the closest."""
    if not needs or any(set(n) <= set(found) for n in needs):
        return
    missing = min(([c for c in n if c not in found] for n in needs), key=len)
    raise DataError(path, None, f"no column '{missing[0]}' (columns found: {', '.join(found)})", missing[0])


def iter_records(path: str | os.PathLike, split: str | None = None,
                 needs: list[tuple[str, ...]] = ()) -> Iterator[tuple[int, dict]]:
    """(where, record) for each record. A .json, .parquet or .arrow file or a directory is loaded with `datasets`
    (where: a Row, absent values dropped); any other file is JSONL (where: the line), read as before."""
    p = Path(hub.local(path, "dataset"))  # a Hub id: its snapshot in the Hugging Face cache
    if not (p.is_dir() or p.is_file() and p.suffix in TABLE_BUILDERS):
        if split not in (None, "train"):
            raise DataError(path, None, f"no split '{split}' (a JSONL file is the one split 'train')", "split")
        yield from iter_json_lines(path)
        return
    table = load_table(p, split)
    _check_columns(path, table.column_names, needs)
    if len(table) == 0:
        raise DataError(path, None, "no records")
    for i, row in enumerate(table):
        yield Row(i), {k: v for k, v in row.items() if v is not None}


def _records(path, lines: list[int] | None, split: str | None, needs: list[tuple[str, ...]]):
    """iter_records, also collecting each record's line (or Row) into `lines` when a list is given."""
    for n, o in iter_records(path, split, needs):
        if lines is not None:
            lines.append(n)
        yield n, o


def read_prompts(path, lines: list[int] | None = None, *, split: str | None = None,
                 columns: Columns = COLUMNS) -> list[Prompt]:
    return [_prompt(o, columns.prompt, path, n) for n, o in _records(path, lines, split, [(columns.prompt,)])]


def read_demos(path, lines: list[int] | None = None, *, split: str | None = None,
               columns: Columns = COLUMNS) -> list[Demo]:
    c = columns
    needs = [(c.prompt, c.completion), (c.prompt, c.response), (c.messages,)]
    return [parse_demo_record(o, path, n, c) for n, o in _records(path, lines, split, needs)]


def read_texts(path, lines: list[int] | None = None, *, split: str | None = None,
               columns: Columns = COLUMNS) -> list[str]:
    return [_str_field(o, columns.text, path, n) for n, o in _records(path, lines, split, [(columns.text,)])]


def read_rankings(path, *, split: str | None = None, columns: Columns = COLUMNS) -> list[Ranking]:
    c = columns
    needs = [(c.prompt, c.responses, c.ranking), (c.chosen, c.rejected)]
    return [parse_ranking_record(o, path, n, c) for n, o in _records(path, None, split, needs)]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], overwrite: bool = True) -> None:
    """Write records atomically: a temp file in the same directory, fsync, rename (see atomic_write_text)."""
    from .utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), overwrite)


# --- tokenisation and collation shared by SFT and the reward model ------------------------------------------
def left_cut(n_prompt: int, n_total: int, max_len: int, truncate: bool) -> int:
    """How many tokens to cut from the left so that n_total fit max_len; only prompt tokens may go, and at least
    one must stay (the first response token is its target)."""
    n_response = n_total - n_prompt
    if n_response >= max_len:
        raise ValueError(f"response of {n_response} tokens does not fit the context of {max_len}")
    if n_total > max_len and not truncate:
        raise ValueError(f"prompt + response is {n_total} tokens, more than the context of {max_len} "
                         "(use --truncate-prompts to cut prompts from the left)")
    return max(0, n_total - max_len)


def encode_example(tokenizer, prompt: str, response: str, max_len: int, truncate: bool) -> tuple[list[int], int]:
    """Prompt ids + response ids + EOS, and the number of prompt tokens (masked out of the loss)."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    p = p[left_cut(len(p), len(p) + len(r), max_len, truncate):]
    return p + r, len(p)


def collate_right(examples: list[tuple[list[int], int | list[int]]], pad_id: int):
    """Right-padded input ids, attention mask and the loss mask over targets. Each example's second item is its
    number of prompt tokens (the rest is the response) or a 0/1 mask per token (1: in the loss)."""
    import torch  # here, not at the top: the label commands read data files without torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width - 1))
    for i, (seq, target) in enumerate(examples):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        if isinstance(target, int):
            loss_mask[i, target - 1: len(seq) - 1] = 1.0  # target t+1 is a response token
        else:
            loss_mask[i, :len(seq) - 1] = torch.tensor(target[1:], dtype=loss_mask.dtype)
    return ids, mask, loss_mask
