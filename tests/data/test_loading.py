"""Reading data files through `datasets`: every format, folders, globs, columns, and errors that name the file."""

from __future__ import annotations

import gc
import json
import logging
import warnings

import datasets
import pandas as pd
import pytest

from thuglm.data import DataError, guess_text_column, load_raw_dataset, resolve_data_files
from thuglm.data.loading import DataSettingNames, data_settings_named

ROWS = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少"]


def write_all_formats(folder):
    """One row in each format, all with the columns content and title."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"content": ROWS[:1], "title": ["a"]}).to_csv(folder / "a.csv", index=False)
    (folder / "b.json").write_text(json.dumps([{"content": ROWS[1], "title": "b"}], ensure_ascii=False))
    (folder / "c.jsonl").write_text(json.dumps({"content": ROWS[2], "title": "c"}, ensure_ascii=False) + "\n")
    pd.DataFrame({"content": ROWS[3:], "title": ["d"]}).to_parquet(folder / "d.parquet")
    return folder


def load(pattern, tmp_path, **kwargs):
    return load_raw_dataset(pattern, cache_dir=str(tmp_path / "cache"), **kwargs)


@pytest.mark.parametrize(("name", "row"), [("a.csv", 0), ("b.json", 1), ("c.jsonl", 2), ("d.parquet", 3)])
def test_each_format_loads(tmp_path, name, row):
    dataset = load(str(write_all_formats(tmp_path / "data") / name), tmp_path)
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["content", "title"] and dataset["content"] == [ROWS[row]]


def test_txt_is_one_row_a_line_and_tsv_splits_on_tabs(tmp_path):
    (tmp_path / "lines.txt").write_text("第一行\n第二行\n", encoding="utf-8")
    (tmp_path / "table.tsv").write_text("text\tlabel\n你好，世界\t1\n", encoding="utf-8")
    assert load(str(tmp_path / "lines.txt"), tmp_path)["text"] == ["第一行", "第二行"]
    table = load(str(tmp_path / "table.tsv"), tmp_path)
    assert table.column_names == ["text", "label"] and table["text"] == ["你好，世界"]


def test_folder_mixes_formats_and_skips_hidden_and_foreign_files(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.csv").write_text("content\n隐藏\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "x.json").write_text("[]")
    (folder / "sub").mkdir()
    (folder / "sub" / "e.CSV").write_text("content,title\n深处,e\n", encoding="utf-8")
    files = resolve_data_files(str(folder))
    assert [f.name for f in files] == ["a.csv", "b.json", "c.jsonl", "d.parquet", "e.CSV"]
    assert all(f.is_absolute() for f in files)
    # csv and parquet written by pandas hold large_string, JSON string: they still concatenate.
    dataset = load(str(folder), tmp_path)
    assert dataset.column_names == ["content", "title"]
    assert sorted(dataset["content"]) == sorted([*ROWS, "深处"])


def test_columns_let_files_with_other_columns_combine(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "一", "id": 1}\n{"text": "二", "id": 2}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "三", "source": "web"}\n', encoding="utf-8")
    (tmp_path / "c.csv").write_text("text,id\n四,x\n", encoding="utf-8")  # id: a string here, a number above
    dataset = load(str(tmp_path), tmp_path, columns=["text"])
    assert dataset.column_names == ["text"] and sorted(dataset["text"]) == sorted("一二三四")
    union = load([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path)
    assert union.column_names == ["text", "id", "source"] and union["source"] == [None, None, "web"]


def test_a_file_without_a_selected_column_is_named(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    with pytest.raises(DataError, match=r"a\.csv: no column 'sentence' \(columns found: content, title\)"):
        load(str(folder / "a.csv"), tmp_path, columns=["sentence"])


def test_globs_recurse_and_repeats_are_dropped(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    (folder / "sub").mkdir()
    (folder / "sub" / "e.json").write_text("[]")
    files = resolve_data_files([str(folder / "*.json*"), str(folder / "b.json"), str(folder / "**" / "*.json")])
    assert [f.relative_to(folder).as_posix() for f in files] == ["b.json", "c.jsonl", "sub/e.json"]


def test_unsupported_files_in_a_folder_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    write_all_formats(tmp_path / "data")
    (tmp_path / "data" / "notes.md").write_text("x")
    (tmp_path / "data" / "more").mkdir()
    (tmp_path / "data" / "more" / "sales.xlsx").write_bytes(b"PK\x03\x04")
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        files = resolve_data_files(str(tmp_path / "data"))
    assert [file.name for file in files] == ["a.csv", "b.json", "c.jsonl", "d.parquet"]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "skipping 2 file(s) of a type thuglm does not read: more/sales.xlsx, notes.md" in record.getMessage()
    assert "save a spreadsheet as CSV" in record.getMessage()


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("missing.csv", "no such file or folder"),
        ("*.nothing", "the glob matches no files"),
        ("notes.md", r"unsupported file type '\.md'; supported: \.csv, \.tsv, \.json, \.jsonl, \.parquet, \.txt"),
        ("empty", "the folder matches no files"),
        ("docs", "the folder matches only unsupported files such as readme.md"),
    ],
)
def test_bad_patterns_are_named(tmp_path, pattern, message):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=message) as error:
        resolve_data_files(str(tmp_path / pattern))
    assert str(error.value).startswith(str(tmp_path / pattern))


def test_unreadable_file_is_named_among_others(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "好"}]', encoding="utf-8")
    (tmp_path / "broken.json").write_text('{"text": "没有结尾"', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 1, column \d+") as error:
        load(str(tmp_path / "*.json"), tmp_path)
    assert "a.json" not in str(error.value)


def test_columns_of_different_kinds_are_an_error_not_a_crash(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "一", "id": 1}\n', encoding="utf-8")
    (folder / "b.jsonl").write_text('{"text": "二", "id": [1, 2]}\n', encoding="utf-8")
    with pytest.raises(DataError, match="cannot be combined"):
        load(str(folder), tmp_path)
    assert load(str(folder), tmp_path, columns=["text"])["text"] == ["一", "二"]


def test_csv_cells_stay_text(tmp_path):
    (tmp_path / "a.csv").write_text("text\nNA\nnull\n\"\"\n", encoding="utf-8")
    assert load(str(tmp_path / "a.csv"), tmp_path)["text"] == ["NA", "null", ""]


def test_streaming_gives_the_same_rows(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    stream = load(str(folder), tmp_path, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert stream.column_names == ["content", "title"]  # known before iterating, even for csv
    assert list(stream) == list(load(str(folder), tmp_path))
    csv_only = load(str(folder / "a.csv"), tmp_path, streaming=True, columns=["content"])
    assert list(csv_only) == [{"content": ROWS[0]}]


def test_guess_text_column():
    assert guess_text_column(["title", "content", "text"], None, "f.csv") == "content"
    assert guess_text_column(["title", "text", "sentence"], None, "f.csv") == "text"
    assert guess_text_column(["id", "sentence"], None, "f.csv") == "sentence"
    assert guess_text_column(["body"], None, "f.csv") == "body"
    assert guess_text_column(["a", "b"], "b", "f.csv") == "b"
    with pytest.raises(DataError, match=r"f\.csv: no column 'contnet' \(columns: title, content\)\. Did you mean"):
        guess_text_column(["title", "content"], "contnet", "f.csv")
    with pytest.raises(DataError, match=r"cannot tell which column.*title, body.*data\.text_column=NAME"):
        guess_text_column(["title", "body"], None, "f.csv")


# ---- encodings: Excel's Chinese CSVs are GBK; UTF-8 may carry a BOM ---------------------------------------------------
ENCODED_ROWS = ["春眠不觉晓", "处处闻啼鸟，夜来风雨声"]


@pytest.mark.parametrize(("encoding", "detected"), [("utf-8-sig", "utf-8-sig"), ("gbk", "gb18030"),
                                                    ("gb18030", "gb18030"), ("utf-8", "utf-8")])
def test_csv_in_utf8_bom_or_gbk_is_detected_and_read(tmp_path, encoding, detected, caplog):
    from thuglm.data.loading import detect_encoding

    path = tmp_path / "excel.csv"
    path.write_bytes(("content,title\n" + "".join(f"{row},t\n" for row in ENCODED_ROWS)).encode(encoding))
    assert detect_encoding(path) == detected
    with caplog.at_level(logging.INFO, logger="thuglm.data"):
        dataset = load_raw_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["content", "title"]  # no BOM glued to the first column's name
    assert dataset["content"] == ENCODED_ROWS
    assert ("GBK/GB18030" in caplog.text) == (detected == "gb18030")


def test_gbk_txt_is_read_and_gbk_json_is_refused_with_the_fix(tmp_path):
    (tmp_path / "b.txt").write_bytes((ENCODED_ROWS[1] + "\n").encode("gbk"))
    assert load_raw_dataset(str(tmp_path / "b.txt"), cache_dir=str(tmp_path / "c"))["text"] == ENCODED_ROWS[1:]
    (tmp_path / "a.json").write_bytes(json.dumps([{"content": ENCODED_ROWS[0]}], ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataError, match=r"a.json: JSON must be UTF-8 \(RFC 8259\).*iconv -f gbk -t utf-8"):
        load_raw_dataset(str(tmp_path / "a.json"), cache_dir=str(tmp_path / "c"))


def test_named_encoding_wins_and_binary_files_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "big5.csv"
    path.write_bytes("content\n春眠不覺曉\n".encode("big5"))
    dataset = load_raw_dataset(str(path), cache_dir=str(tmp_path / "cache"), encoding="big5")
    assert dataset["content"] == ["春眠不覺曉"]
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"image.csv: this is neither UTF-8 nor GBK/GB18030.*data.encoding=NAME"):
        load_raw_dataset(str(binary), cache_dir=str(tmp_path / "cache"))


EVAL_FLAGS = DataSettingNames(files="--data", encoding=None, on_bad_row=None, text_column="--text-column NAME")


def test_messages_name_the_options_as_the_running_command_does(tmp_path, caplog):
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3,4,5\n6,7\n", encoding="utf-8")
    with data_settings_named(EVAL_FLAGS):
        with pytest.raises(DataError, match=r"image\.csv: .*Remove it from --data, or convert it to UTF-8") as error:
            load(str(binary), tmp_path)
        assert "data." not in str(error.value)  # eval has no encoding flag: no key it would not read
        with pytest.raises(DataError, match=r"empty\.csv: the file is empty.*Remove it from --data"):
            load(str(empty), tmp_path)
        with pytest.raises(DataError, match=r"cannot tell which column.*Name one of them with `--text-column NAME`"):
            guess_text_column(["title", "body"], None, "f.csv")
        with caplog.at_level(logging.WARNING, logger="thuglm.data"):
            assert list(load(str(ragged), tmp_path)["a"]) == [1, 6]
    assert "skipped 1 malformed CSV row(s) in all" in caplog.text and "on_bad_row" not in caplog.text
    # Outside the block the messages are `thuglm train`'s again: its config keys.
    with pytest.raises(DataError, match=r"Remove it from data\.files, or name its encoding with `data\.encoding=NAME`"):
        load(str(binary), tmp_path)


def test_a_streamed_csv_leaves_no_file_open(tmp_path):
    """Streaming learns a CSV's columns from its first rows; the file must not stay open behind that read."""
    path = tmp_path / "a.csv"
    texts = ROWS * 20  # more rows than the head that is read to learn the columns
    pd.DataFrame({"content": texts, "n": range(len(texts))}).to_csv(path, index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        streamed = load(str(path), tmp_path, streaming=True)
        assert streamed.column_names == ["content", "n"]
        assert [row["n"] for row in streamed] == list(range(len(texts)))
        del streamed
        gc.collect()  # an unclosed file warns when it is collected
    assert [str(warning.message) for warning in caught if warning.category is ResourceWarning] == []


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        # The comma is the mistake, not the bracket that Python's parser stops at (a line further down here).
        ("array.json", '[\n  {"text": "春眠"},\n  {"text": "不觉晓"}, \n]\n',
         r"line 3, column 18: a trailing comma before '\]'"),
        ("rows.jsonl", '{"text": "春眠"}\n{"text": "不觉晓",}\n', r"line 2, column 15: a trailing comma before '\}'"),
    ],
)
def test_a_trailing_comma_is_named_at_its_place(tmp_path, name, content, where):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{name}: invalid JSON at {where} \(JSON allows no comma after the last item"):
        load(str(tmp_path / name), tmp_path)
