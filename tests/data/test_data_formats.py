"""Loading every format from jsonl / json / parquet / datasets dirs; malformed rows."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data import (
    ChatRecord,
    DataError,
    Message,
    PreferenceRecord,
    PromptCompletionRecord,
    RLRecord,
    load_records,
    validate_file,
)

CHAT_MSGS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2="},
    {"role": "assistant", "content": "4"},
]

# format -> (rows, expected records). Rows of one file share a schema (parquet needs it).
CASES = {
    "prompt_completion": (
        [{"prompt": "1+1=", "completion": "2", "id": 7}, {"prompt": "9-3=", "completion": "6", "id": 8}],
        [PromptCompletionRecord("1+1=", "2", {"id": 7}), PromptCompletionRecord("9-3=", "6", {"id": 8})],
    ),
    "chat": (
        [{"messages": CHAT_MSGS}, {"messages": CHAT_MSGS[1:]}],
        [
            ChatRecord((Message("system", "be brief"), Message("user", "2+2="), Message("assistant", "4"))),
            ChatRecord((Message("user", "2+2="), Message("assistant", "4"))),
        ],
    ),
    "preference": (
        [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "3+3=", "chosen": "6", "rejected": "7"}],
        [PreferenceRecord("2+2=", "4", "5"), PreferenceRecord("3+3=", "6", "7")],
    ),
    "rl": (
        [{"prompt": "2+2=", "answer": "4", "length": 128}, {"prompt": "3+3=", "answer": "6", "length": 256}],
        [RLRecord("2+2=", "4", {"length": 128}), RLRecord("3+3=", "6", {"length": 256})],
    ),
}


def write_rows(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "datasets":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "datasets"])
@pytest.mark.parametrize("fmt", sorted(CASES))
def test_every_format_loads_from_every_container(tmp_path, fmt, kind):
    rows, expected = CASES[fmt]
    path = write_rows(tmp_path / (f"train.{kind}" if kind != "datasets" else "train_ds"), rows, kind)
    res = load_records(path, fmt)
    assert res.records == expected
    assert [r.meta for r in res.records] == [r.meta for r in expected]
    assert (res.n_skipped, res.errors) == (0, [])
    assert validate_file(path, fmt) == len(rows)


def test_preference_with_message_lists(tmp_path):
    rows = [{
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }]
    for kind in ("jsonl", "parquet"):
        rec = load_records(write_rows(tmp_path / f"p.{kind}", rows, kind), "preference").records[0]
        assert rec == PreferenceRecord(
            (Message("user", "hi"),), (Message("assistant", "hello"),), (Message("assistant", "go away"),)
        )


def test_datasetdict_needs_split(tmp_path):
    import datasets

    rows = CASES["rl"][0]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"split= one of \['train'\]"):
        load_records(tmp_path / "dd", "rl")
    assert len(load_records(tmp_path / "dd", "rl", split="train").records) == 2


GOOD = '{"prompt": "1+1=", "completion": "2"}'
BAD_ROWS = [
    ('{"prompt": "1+1="}', "prompt_completion", 'key "completion" missing'),
    ('{"prompt": "1+1=", "completion": 2}', "prompt_completion", '"completion": expected a string, got int'),
    ('{"prompt": "  ", "completion": "2"}', "prompt_completion", '"prompt": empty string'),
    ('{"prompt": "1+1=", "completion": null}', "prompt_completion", 'key "completion" is null'),
    ('{"prompt": "1+1=", "completion": "2"', "prompt_completion", "invalid JSON"),
    ('["1+1=", "2"]', "prompt_completion", "expected a JSON object, got list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "chat", "unknown role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "chat", '"messages"[0]: key "content" missing'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "chat", "no assistant message"),
    ('{"messages": []}', "chat", "empty message list"),
    ('{"prompt": "q", "chosen": "a"}', "preference", 'key "rejected" missing'),
    ('{"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]}', "preference",
     '"rejected": no assistant message'),
    ('{"prompt": "q", "answer": 4}', "rl", '"answer": expected a string, got int'),
]


@pytest.mark.parametrize("line,fmt,problem", BAD_ROWS)
def test_bad_row_error_names_file_row_and_problem(tmp_path, line, fmt, problem):
    good = {"prompt_completion": GOOD, "chat": json.dumps({"messages": CHAT_MSGS}),
            "preference": '{"prompt": "q", "chosen": "a", "rejected": "b"}', "rl": '{"prompt": "q", "answer": "4"}'}[fmt]
    # a blank line counts as a line: the bad row is on line 4 of the file
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        load_records(path, fmt)
    assert str(e.value).startswith(f"{path}:4: ")
    assert problem in str(e.value)
    res = load_records(path, fmt, on_bad_row="skip")
    assert (len(res.records), res.n_skipped) == (3, 1)
    assert res.errors == [str(e.value)]


def test_bad_row_numbers_in_json_and_parquet(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}] * 16 + [{"prompt": "a", "completion": ""}] + [{"prompt": "c", "completion": "d"}]
    for kind in ("json", "parquet"):
        path = write_rows(tmp_path / f"train.{kind}", rows, kind)
        with pytest.raises(DataError, match=rf"train\.{kind}:17: \"completion\": empty string"):
            load_records(path, "prompt_completion")


def test_parquet_missing_column_value_is_null(tmp_path):
    path = write_rows(tmp_path / "t.parquet", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}], "parquet")
    res = load_records(path, "rl", on_bad_row="skip")
    assert res.n_skipped == 1 and ':2: key "answer" is null' in res.errors[0]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_records(tmp_path / "missing.jsonl", "rl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "x.csv", "rl")
    (tmp_path / "obj.json").write_text('{"prompt": "q"}')
    with pytest.raises(DataError, match="obj.json: expected a JSON list"):
        load_records(tmp_path / "obj.json", "rl")
    (tmp_path / "broken.json").write_text('[{"prompt": ')
    with pytest.raises(DataError, match="broken.json: invalid JSON"):
        load_records(tmp_path / "broken.json", "rl")
    (tmp_path / "ok.jsonl").write_text(GOOD + "\n")
    with pytest.raises(DataError, match="unknown data format 'sft'"):
        load_records(tmp_path / "ok.jsonl", "sft")
    (tmp_path / "allbad.jsonl").write_text('{"prompt": "q"}\n')
    with pytest.raises(DataError, match="allbad.jsonl: no valid prompt_completion rows"):
        load_records(tmp_path / "allbad.jsonl", "prompt_completion", on_bad_row="skip")


def test_records_are_frozen():
    rec = PromptCompletionRecord("a", "b")
    with pytest.raises(AttributeError):
        rec.prompt = "c"
