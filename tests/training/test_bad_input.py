"""Every bad input to `thuglm train` gives one clear line and exit status 2, and writes nothing to output_dir.

Each test runs the command as a user does (`thuglm train CONFIG key=value ...`, through `thuglm.cli.main`), then
checks the status, that the message names the file (row, column or key) and says how to fix it, and that output_dir
was not created. One test runs it as a separate process, to see that no traceback reaches the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from thuglm.cli import main

from .test_train_e2e import OFFICIAL_TINY, base_settings, write_config


@pytest.fixture
def run(tmp_path, capsys):
    """`thuglm train` on the tiny official-layout model with `data` and overrides; returns (status, stderr, out)."""

    def run(data_files, *overrides: str, **settings):
        config = base_settings(tmp_path, max_steps=2, save_steps=100, eval_steps=100, report_to=[], **settings)
        config["data"] = {"files": [str(path) for path in data_files], "cache_dir": str(tmp_path / "hf-cache")}
        status = main(["train", str(write_config(tmp_path, **config)), *overrides])
        return status, capsys.readouterr().err, Path(config["output_dir"])

    return run


def assert_refused(result, *fragments: str) -> str:
    status, err, out = result
    assert status == 2, err[-2000:]
    message = [line for line in err.splitlines() if line.startswith("thuglm: ")]
    assert len(message) == 1, err[-2000:]
    for fragment in fragments:
        assert fragment in message[0], message[0]
    assert "Traceback" not in err
    assert not out.exists(), f"{out} was written: {list(out.rglob('*'))}"
    return message[0]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


GOOD_CSV = "id,content\n" + "".join(f"{i},春天来了，花开了，第{i}行。\n" for i in range(1, 40))


# ---- data files -------------------------------------------------------------------------------------------------------
def test_missing_path(run, tmp_path):
    assert_refused(run([tmp_path / "nope" / "data.csv"]), "nope/data.csv", "no such file or folder")


def test_empty_file(run, tmp_path):
    assert_refused(run([write(tmp_path / "empty.csv", "")]), "empty.csv", "empty (0 bytes)")


def test_header_only_file(run, tmp_path):
    assert_refused(run([write(tmp_path / "header.csv", "id,content\n")]), "header.csv", "header (id,content) but no rows")


def test_binary_file(run, tmp_path):
    binary = tmp_path / "data" / "image.csv"
    binary.parent.mkdir()
    binary.write_bytes(bytes(range(256)) * 40)
    assert_refused(run([binary]), "image.csv", "neither UTF-8 nor GBK", "data.encoding")


def test_json_lines_syntax_error_names_the_line(run, tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "一"}\n{"text": "二"}\n{"text": "三",}\n')
    assert_refused(run([bad]), "bad.jsonl", "invalid JSON at line 3")


def test_json_array_syntax_error_names_the_line(run, tmp_path):
    bad = write(tmp_path / "bad.json", '[\n  {"text": "一"},\n  {"text": "二"\n]\n')
    assert_refused(run([bad]), "bad.json", "invalid JSON at line 4")


def test_missing_text_column_lists_the_columns(run, tmp_path):
    data = write(tmp_path / "data.csv", GOOD_CSV)
    assert_refused(run([data], "data.text_column=contnet"), "data.csv", "no column 'contnet'", "id, content",
                   "Did you mean 'content'")


def test_ambiguous_text_column_asks_for_one(run, tmp_path):
    data = write(tmp_path / "data.csv", "title,body\n标题,正文很长的一段话。\n标题二,正文二。\n")
    assert_refused(run([data]), "data.csv", "title, body", "data.text_column")


def test_malformed_csv_row_is_an_error_when_asked(run, tmp_path):
    data = write(tmp_path / "data.csv", GOOD_CSV + "40,多了一个逗号,这里\n41,最后一行。\n")
    assert_refused(run([data], "data.on_bad_row=error"), "data.csv", "line 41 has 3 cells where the header has 2",
                   "on_bad_row=skip")


def test_malformed_csv_row_is_skipped_and_named_by_default(run, tmp_path, caplog):
    data = write(tmp_path / "data.csv", GOOD_CSV + "40,多了一个逗号,这里\n41,最后一行。\n")
    status, err, out = run([data])
    assert status == 0, err[-2000:]
    assert "skipped line 41" in caplog.text and "skipped 1 malformed CSV row" in caplog.text
    assert (out / "metrics.json").is_file()


def test_unclosed_quote_names_the_row(run, tmp_path):
    data = write(tmp_path / "data.csv", GOOD_CSV + '40,"没有结束的引号\n41,最后一行。\n')
    assert_refused(run([data]), "data.csv", "never closed")


def test_non_text_cell_is_an_error_when_asked(run, tmp_path):
    rows = [{"text": "第一行文字。"}, {"text": "第二行。"}, {"text": ["不是", "文字"]}, {"text": "第四行。"}]
    data = write(tmp_path / "data.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    assert_refused(run([data], "data.on_bad_row=error"), "data.jsonl", "row 3", "`text` holds", "not text")


def test_non_text_cell_is_skipped_and_counted_by_default(run, tmp_path, caplog):
    rows = [{"text": "第一行文字。"}, {"text": {"a": 1}}, {"text": "第三行。"}] * 10
    data = write(tmp_path / "data.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    status, err, _ = run([data])
    assert status == 0, err[-2000:]
    assert "skipped 10 row(s) whose `text` is a list or an object" in caplog.text


def test_no_usable_rows(run, tmp_path):
    data = write(tmp_path / "data.csv", "id,content\n1,\n2,   \n")
    assert_refused(run([data]), "data.csv", "no training rows")


# ---- the model folder -------------------------------------------------------------------------------------------------
@pytest.fixture
def model_copy(tmp_path) -> Path:
    return Path(shutil.copytree(OFFICIAL_TINY, tmp_path / "model", ignore=shutil.ignore_patterns("golden")))


def test_model_folder_without_weights(run, tmp_path, model_copy):
    (model_copy / "pytorch_model.bin").unlink()
    assert_refused(run([write(tmp_path / "d.csv", GOOD_CSV)], model=str(model_copy)), str(model_copy), "no weights")


def test_model_folder_without_tokenizer(run, tmp_path, model_copy):
    (model_copy / "ice_text.model").unlink()
    assert_refused(run([write(tmp_path / "d.csv", GOOD_CSV)], model=str(model_copy)), "no tokenizer", "ice_text.model")


def test_tokenizer_that_does_not_fit_the_model(run, tmp_path, model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["vocab_size"] = 1000  # e.g. another checkpoint's ice_text.model copied next to these weights
    (model_copy / "config.json").write_text(json.dumps(config))
    assert_refused(run([write(tmp_path / "d.csv", GOOD_CSV)], model=str(model_copy)), "do not fit",
                   "the model's embedding only 1,000")


def test_tokenizer_with_other_special_tokens(run, tmp_path, model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["gmask_token_id"] += 1
    (model_copy / "config.json").write_text(json.dumps(config))
    assert_refused(run([write(tmp_path / "d.csv", GOOD_CSV)], model=str(model_copy)), "[gMASK]", "gmask_token_id")


# ---- the config and output_dir --------------------------------------------------------------------------------------
def test_unknown_config_key(run, tmp_path):
    assert_refused(run([write(tmp_path / "d.csv", GOOD_CSV)], "lerning_rate=1e-3"), "lerning_rate",
                   "Did you mean `learning_rate`")


def test_max_seq_len_past_the_models_context_is_refused_before_the_data_is_read(run, tmp_path):
    # The official tiny model's config.json says max_sequence_length 512; the data file does not even exist.
    assert_refused(run([tmp_path / "not-read.csv"], "max_seq_len=1024"), "`max_seq_len` is 1024", "at most 512 tokens",
                   "set max_seq_len to 512 or less")


def test_bad_config_value(run, tmp_path):
    assert_refused(run([write(tmp_path / "d.csv", GOOD_CSV)], "method=lora2"), "`method` must be one of",
                   "did you mean `lora`")


def test_output_dir_that_cannot_be_created(run, tmp_path):
    blocker = write(tmp_path / "a-file", "not a folder")
    status, err, _ = run([write(tmp_path / "d.csv", GOOD_CSV)], output_dir=str(blocker / "out"))
    assert status == 2 and "cannot be created" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_output_dir_that_is_a_file(run, tmp_path):
    blocker = write(tmp_path / "out-file", "keep me")
    status, err, _ = run([write(tmp_path / "d.csv", GOOD_CSV)], output_dir=str(blocker))
    assert status == 2 and "is a file, not a folder" in err
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any folder")
def test_output_dir_without_write_permission(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status, err, _ = run([write(tmp_path / "d.csv", GOOD_CSV)], output_dir=str(locked / "out"))
    assert status == 2 and "no write permission" in err


def test_output_dir_with_an_earlier_run_is_not_overwritten(run, tmp_path):
    data = write(tmp_path / "d.csv", GOOD_CSV)
    assert run([data])[0] == 0
    out = tmp_path / "out"
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    status, err, _ = run([data])
    assert status == 2 and "already holds a run" in err and "resume_from_checkpoint=true" in err
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before
    assert run([data], "overwrite_output_dir=true")[0] == 0


# ---- as a separate process: one line on stderr, no traceback; --debug shows it ------------------------------------------
def test_the_command_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(OFFICIAL_TINY), "data": {"files": [str(tmp_path / "none.csv")]},
                                      "output_dir": str(tmp_path / "out")}))
    command = [sys.executable, "-m", "thuglm"]
    plain = subprocess.run([*command, "train", str(config)], capture_output=True, text=True, timeout=300, check=False)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines()[-1].startswith("thuglm: ") and "Traceback" not in plain.stderr
    debug = subprocess.run([*command, "--debug", "train", str(config)], capture_output=True, text=True, timeout=300, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    assert not (tmp_path / "out").exists()
