"""Reading data files through `datasets`: every format, folders, globs, columns, and errors that name the file."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest

from thuglm.data import (
    DataError,
    guess_text_column,
    load_raw_dataset,
    resolve_data_files,
)

ROWS = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声"]


def write_all_formats(folder):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"content": ROWS[:1], "title": ["a"]}).to_csv(folder / "a.csv", index=False)
    (folder / "b.json").write_text(json.dumps([{"content": ROWS[1], "title": "b"}], ensure_ascii=False))
    (folder / "c.jsonl").write_text(json.dumps({"content": ROWS[2], "title": "c"}, ensure_ascii=False) + "\n")
    pd.DataFrame({"content": ["花落知多少"], "title": ["d"]}).to_parquet(folder / "d.parquet")
    return folder


@pytest.mark.parametrize("name", ["a.csv", "b.json", "c.jsonl", "d.parquet"])
def test_each_format_loads(tmp_path, name):
    folder = write_all_formats(tmp_path / "data")
    dataset = load_raw_dataset(str(folder / name), cache_dir=str(tmp_path / "cache"))
    assert "content" in dataset.column_names and len(dataset) == 1


def test_txt_is_one_row_a_line_and_tsv_splits_on_tabs(tmp_path):
    (tmp_path / "lines.txt").write_text("第一行\n第二行\n", encoding="utf-8")
    (tmp_path / "table.tsv").write_text("text\tlabel\n你好\t1\n", encoding="utf-8")
    lines = load_raw_dataset(str(tmp_path / "lines.txt"), cache_dir=str(tmp_path / "cache"))
    assert lines["text"] == ["第一行", "第二行"]
    table = load_raw_dataset(str(tmp_path / "table.tsv"), cache_dir=str(tmp_path / "cache"))
    assert table.column_names == ["text", "label"]


def test_folder_mixes_formats_and_skips_hidden_and_foreign_files(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.csv").write_text("content\n隐藏\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "e.csv").write_text("content,title\n深处,e\n", encoding="utf-8")
    files = resolve_data_files(str(folder))
    assert [f.name for f in files] == ["a.csv", "b.json", "c.jsonl", "d.parquet", "e.csv"]
    dataset = load_raw_dataset(str(folder), cache_dir=str(tmp_path / "cache"), columns=["content"])
    assert sorted(dataset["content"]) == sorted([*ROWS, "花落知多少", "深处"])


def test_globs_and_repeats(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    files = resolve_data_files([str(folder / "*.json*"), str(folder / "b.json")])
    assert [f.name for f in files] == ["b.json", "c.jsonl"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("missing.csv", "does not exist"), ("*.nothing", "matches no data files"), ("notes.md", "are not read")],
)
def test_bad_paths_are_named(tmp_path, pattern, message):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=message) as error:
        resolve_data_files(str(tmp_path / pattern))
    assert pattern.split("*")[-1] in str(error.value)
    with pytest.raises(DataError, match="holds no data files"):
        resolve_data_files(str(tmp_path / "empty"))


def test_missing_selected_column_lists_the_columns(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    with pytest.raises(DataError, match="no column sentence; the columns are content, title"):
        load_raw_dataset(str(folder / "a.csv"), cache_dir=str(tmp_path / "cache"), columns=["sentence"])


def test_streaming_gives_the_same_rows(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    stream = load_raw_dataset(str(folder / "a.csv"), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["content"] for row in stream] == ROWS[:1]


def test_guess_text_column():
    assert guess_text_column(["title", "content"], None, "f.csv") == "content"
    assert guess_text_column(["id", "sentence"], None, "f.csv") == "sentence"
    assert guess_text_column(["body"], None, "f.csv") == "body"
    assert guess_text_column(["a", "b"], "b", "f.csv") == "b"
    with pytest.raises(DataError, match=r"f.csv: no column `contnet`; the columns are title, content. Did you mean"):
        guess_text_column(["title", "content"], "contnet", "f.csv")
    with pytest.raises(DataError, match="cannot tell which column.*title, body.*data.text_column=NAME"):
        guess_text_column(["title", "body"], None, "f.csv")
