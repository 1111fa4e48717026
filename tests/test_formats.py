"""TRL's dataset formats (standard and conversational) from JSONL, JSON, parquet, arrow and `datasets` directories:
each form parsed, the implicit prompt split, round trips, and every malformed case a DataError naming file,
line or row, and field."""
import json

import pytest

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

from instructrl.data import (COLUMNS, Columns, DataError, Demo, Row, read_demos, read_prompts,  # noqa: E402
                             read_rankings, read_texts, split_prompt, write_jsonl)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


def test_conversational_forms(tmp_path):
    conv = [SYSTEM, user("Hi"), assistant("Hello."), user("Capital of France?"), assistant("Paris.")]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}, {"prompt": [SYSTEM, user("q")]}])
    assert read_prompts(tmp_path / "p.jsonl") == ["q", [SYSTEM, user("q")]]
    write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "q", "completion": " a"},                                   # TRL prompt-completion
        {"prompt": "q", "response": " a"},                                     # ours
        {"prompt": [user("q")], "completion": [assistant("a")]},               # conversational
        {"messages": conv},                                                    # a whole conversation
        {"prompt": conv[:4], "completion": [assistant("Paris.")]},            # multi-turn prompt
    ])
    assert read_demos(tmp_path / "d.jsonl") == [
        Demo("q", " a"), ("q", " a"), Demo([user("q")], [assistant("a")]), Demo(conv[:2], conv[2:]),
        Demo(conv[:4], [assistant("Paris.")])]
    write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": [user("q")], "responses": [[assistant("a")], "b", [assistant("c")]], "ranking": [[1], [0, 2]]},
        {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},  # explicit prompt
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},  # implicit prompt
        {"chosen": "\n\nHuman: q\n\nAssistant: Paris is nice.", "rejected": "\n\nHuman: q\n\nAssistant: Paris."},
    ])
    r = read_rankings(tmp_path / "r.jsonl")
    assert (r[0].responses, r[0].groups) == ([[assistant("a")], "b", [assistant("c")]], [[1], [0, 2]])
    assert [(x.prompt, x.responses) for x in r[1:]] == [
        ([user("q")], [[assistant("a")], [assistant("b")]]),
        ([user("q")], [[assistant("a")], [assistant("b")]]),
        ("\n\nHuman: q\n\nAssistant:", [" Paris is nice.", " Paris."])]
    assert [x.line for x in r] == [1, 2, 3, 4]


HH = "\n\nHuman: {}\n\nAssistant: {}"
SPLITS = {  # name: (chosen, rejected, expected (prompt, chosen rest, rejected rest))
    "hh_shared_first_words": (HH.format("Capital?", "Paris is the capital."), HH.format("Capital?", "Paris, I think."),
                              ("\n\nHuman: Capital?\n\nAssistant:", " Paris is the capital.", " Paris, I think.")),
    "hh_multi_turn": (HH.format("a", "b") + HH.format("c", "d is it"), HH.format("a", "b") + HH.format("c", "d"),
                      (HH.format("a", "b") + "\n\nHuman: c\n\nAssistant:", " d is it", " d")),
    "hh_differs_in_a_later_human_turn": (HH.format("a", "b") + HH.format("c", "d"), HH.format("a", "b") + HH.format(
        "e", "d"), ("\n\nHuman: a\n\nAssistant:", " b" + HH.format("c", "d"), " b" + HH.format("e", "d"))),
    "text_mid_word": ("The answer is cat.", "The answer is car.", ("The answer is", " cat.", " car.")),
    "text_one_extends_the_other": ("Say yes please", "Say yes", ("Say", " yes please", " yes")),
    "world_layout": ("User: hi\nAssistant: Sure! Hello.", "User: hi\nAssistant: Sure thing.",
                     ("User: hi\nAssistant:", " Sure! Hello.", " Sure thing.")),
    "turns_last_answer": ([SYSTEM, user("q"), assistant("Paris is nice.")], [SYSTEM, user("q"), assistant("Paris.")],
                          ([SYSTEM, user("q")], [assistant("Paris is nice.")], [assistant("Paris.")])),
    "turns_multi_turn": ([user("a"), assistant("b"), user("c"), assistant("d1")],
                         [user("a"), assistant("b"), user("c"), assistant("d2")],
                         ([user("a"), assistant("b"), user("c")], [assistant("d1")], [assistant("d2")])),
    "turns_differ_in_a_user_turn": ([user("a"), assistant("b"), user("c"), assistant("d")],
                                    [user("a"), assistant("b"), user("x"), assistant("d")],
                                    ([user("a")], [assistant("b"), user("c"), assistant("d")],
                                     [assistant("b"), user("x"), assistant("d")])),
    "turns_one_extends_the_other": ([user("a"), assistant("b")], [user("a"), assistant("b"), user("c"), assistant("d")],
                                    ([user("a")], [assistant("b")], [assistant("b"), user("c"), assistant("d")])),
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_implicit_prompt_split(name):
    chosen, rejected, expected = SPLITS[name]
    assert split_prompt(chosen, rejected) == expected


@pytest.mark.parametrize("chosen, rejected, match", [
    ("same", "same", "the same"),
    ([user("a"), assistant("b")], [user("a"), assistant("b")], "the same"),
    ("Yes.", "Yeah.", "share no prompt"),
    ("Nothing alike", "Completely different", "share no prompt"),
    (HH.format("a", "b"), HH.format("c", "b"), "share no prompt"),
    ([user("a"), assistant("b")], [user("c"), assistant("b")], "share no prompt"),
    ([SYSTEM, user("a"), assistant("b")], [SYSTEM, user("c"), assistant("b")], "share no prompt"),
])
def test_implicit_prompt_errors(chosen, rejected, match):
    with pytest.raises(ValueError, match=match):
        split_prompt(chosen, rejected)


DEMOS = [{"prompt": [SYSTEM, user("q")], "completion": [assistant("a")]},
         {"prompt": [user("r")], "completion": [assistant("b")], "extra": 1}]
RANKINGS = [{"prompt": [user("q")], "responses": [[assistant("a")], [assistant("b")], [assistant("c")]],
             "ranking": [[2], [0, 1]]},
            {"prompt": [user("q")], "responses": [[assistant("x")], [assistant("y")]], "ranking": [[1], [0]]}]


def write_table(rows, kind, base):
    """rows as a `kind` source under base; returns the path to read."""
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(base / "t.parquet")
        return base / "t.parquet"
    if kind == "json":
        (base / "t.json").write_text(json.dumps(rows))  # a JSON array, not JSON lines
        return base / "t.json"
    ds.save_to_disk(base / "disk")
    if kind == "arrow":
        return next((base / "disk").glob("*.arrow"))
    if kind == "save_to_disk":
        return base / "disk"
    (base / "dir" / "data").mkdir(parents=True)  # a local dataset repository of data files
    ds.to_parquet(base / "dir" / "data" / "train-00000-of-00001.parquet")
    return base / "dir"


@pytest.mark.parametrize("kind", ["parquet", "json", "arrow", "save_to_disk", "data_dir"])
def test_round_trips_through_tables(tmp_path, kind):
    for name, rows in (("d", DEMOS), ("r", RANKINGS)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "ref.jsonl", rows)
    lines = []
    assert read_demos(write_table(DEMOS, kind, tmp_path / "d"), lines) == read_demos(tmp_path / "d" / "ref.jsonl")
    assert lines == [0, 1] and all(isinstance(n, Row) for n in lines)
    got, want = (read_rankings(p) for p in (write_table(RANKINGS, kind, tmp_path / "r"), tmp_path / "r" / "ref.jsonl"))
    assert [(r.prompt, r.responses, r.groups, r.extra) for r in got] == \
           [(r.prompt, r.responses, r.groups, r.extra) for r in want]
    assert [r.line for r in got] == [0, 1] and isinstance(got[1].line, Row)


def test_splits_and_column_mapping(tmp_path):
    rows = [{"question": "q", "answer": " a"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list([{"question": "t", "answer": " b"}])}
                         ).save_to_disk(tmp_path / "dd")
    cols = Columns(prompt="question", completion="answer")
    assert read_demos(tmp_path / "dd", columns=cols) == [("q", " a")]
    assert read_demos(tmp_path / "dd", split="test", columns=cols) == [("t", " b")]
    assert read_prompts(tmp_path / "dd", split="test", columns=cols) == ["t"]
    write_jsonl(tmp_path / "m.jsonl", [{"body": "hello"}])
    assert read_texts(tmp_path / "m.jsonl", columns=Columns(text="body")) == ["hello"]
    with pytest.raises(DataError, match=r"no split 'valid' \(splits: train, test\)") as e:
        read_demos(tmp_path / "dd", split="valid", columns=cols)
    assert e.value.field == "split"
    with pytest.raises(DataError, match="one split 'train'"):
        read_texts(tmp_path / "m.jsonl", split="test", columns=Columns(text="body"))
    assert COLUMNS == Columns()


def test_parquet_missing_mapped_column_names_it_and_the_columns_found(tmp_path):
    datasets.Dataset.from_list([{"q": "x", "completion": "y"}]).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError) as e:
        read_demos(tmp_path / "d.parquet", columns=Columns(prompt="question"))
    assert (e.value.path, e.value.line, e.value.field) == (str(tmp_path / "d.parquet"), None, "question")
    assert "columns found: q, completion" in str(e.value)


def test_unloadable_table_is_a_data_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: cannot load"):
        read_prompts(tmp_path / "bad.parquet")


CONV = [user("q"), assistant("a")]
BAD = {  # name: (reader, record, field); the record is line 2 of a JSONL after a good one, row 1 of a parquet
    "message_without_role": (read_demos, {"messages": [{"content": "q"}, assistant("a")]}, "messages"),
    "unknown_role": (read_prompts, {"prompt": [{"role": "robot", "content": "q"}]}, "prompt"),
    "empty_content": (read_demos, {"prompt": [user("q")], "completion": [assistant(" ")]}, "completion"),
    "content_not_a_string": (read_prompts, {"prompt": [{"role": "user", "content": ["q"]}]}, "prompt"),
    "completion_ends_with_user": (read_demos, {"prompt": [user("q")], "completion": [assistant("a"), user("b")]},
                                  "completion"),
    "conversation_ends_with_user": (read_demos, {"messages": CONV + [user("b")]}, "messages"),
    "conversation_without_assistant": (read_demos, {"messages": [user("q")]}, "messages"),
    "prompt_ends_with_assistant": (read_prompts, {"prompt": CONV}, "prompt"),
    "identical_transcripts": (read_rankings, {"chosen": CONV, "rejected": CONV}, "rejected"),
    "no_common_prefix": (read_rankings, {"chosen": CONV, "rejected": [user("x"), assistant("a")]}, "chosen"),
    "mixed_forms": (read_rankings, {"chosen": CONV, "rejected": "q a"}, "rejected"),
    "response_message_not_assistant": (read_rankings, {"prompt": "q", "responses": [[user("a")], "b"],
                                                       "ranking": [0, 1]}, "responses"),
    "duplicate_message_responses": (read_rankings, {"prompt": "q", "responses": [CONV[1:], CONV[1:]],
                                                    "ranking": [0, 1]}, "responses"),
}
GOOD = {read_demos: {"messages": CONV}, read_prompts: {"prompt": "q"},
        read_rankings: {"chosen": CONV, "rejected": [user("q"), assistant("b")]}}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_names_file_line_and_field(tmp_path, name):
    read, record, field = BAD[name]
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, [GOOD[read], record])
    with pytest.raises(DataError) as e:
        read(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, field)
    assert f"{name}.jsonl:2: field '{field}'" in str(e.value)


@pytest.mark.parametrize("name", ["message_without_role", "completion_ends_with_user", "no_common_prefix"])
def test_bad_table_row_names_the_row(tmp_path, name):
    read, record, field = BAD[name]
    keys = list({**GOOD[read], **record})  # from_list takes its columns from the first row
    datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in (GOOD[read], record)]).to_parquet(
        tmp_path / "t.parquet")
    with pytest.raises(DataError) as e:
        read(tmp_path / "t.parquet")
    assert (e.value.line, isinstance(e.value.line, Row), e.value.field) == (1, True, field)
    assert f"t.parquet, row 1: field '{field}'" in str(e.value)
