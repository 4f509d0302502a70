"""Every data format through `thuglm train` on the tiny model: samples checked token by token, answers memorised.

* One run reads alpaca (with system and history), sharegpt (multi-turn, with a system column), OpenAI messages,
  Firefly rounds and plain text as `data.sources`: its rows are compared id by id with samples built here from
  `build_prompt` alone.
* A mixed run (weights) and a one-file sharegpt run memorise answers of random characters; `thuglm generate` then
  reads each training file with the run's own settings and must give back every answer (`response == reference`),
  and `thuglm eval` gives a near-zero loss on the memorised texts.
* Data that used to be dropped without a word: a misspelt column, AdvertiseGen read as text, a folder whose files name
  their text column differently, streams over files with different extra columns, bad dialogues.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from thuglm.cli import main
from thuglm.data.samples import IGNORE_INDEX
from thuglm.inference.chat import build_prompt
from thuglm.models import ChatGLMConfig, ChatGLMTokenizer
from thuglm.training import recipe
from thuglm.training.tasks.causal_lm import CausalLM


# ---- data written as users have it -----------------------------------------------------------------------------------
def write_json(path: Path, rows, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) if lines else \
        json.dumps(rows, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


POOL = "春夏秋冬山水花鸟风月天地人日云雨"


def random_answers(seed: int):
    rng = random.Random(seed)
    return lambda length=4: "".join(rng.choice(POOL) for _ in range(length))


def dataset_files(folder: Path, seed: int = 0) -> dict[str, tuple[Path, dict, list]]:
    """name -> (file, source settings, expected dialogues [(system, [(query, answer), ...])] or texts)."""
    answer = random_answers(seed)
    alpaca = [
        {"instruction": "写一句", "input": "", "output": answer(), "system": "你是诗人"},
        {"instruction": "再写", "input": "关于山", "output": answer(), "history": [["先写", answer()]]},
    ]
    advertise = [{"content": content, "summary": answer()} for content in ("类型#裙*颜色#红", "类型#上衣*风格#简约")]
    sharegpt = [
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": answer()},
                           {"from": "human", "value": "然后呢"}, {"from": "gpt", "value": answer()}],
         "system": "你是助手"},
        {"conversations": [{"from": "human", "value": "天气"}, {"from": "gpt", "value": answer()}]},
    ]
    openai = [
        {"messages": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "天空"},
                      {"role": "assistant", "content": answer()}], "url": "https://example.com/1"},
        {"messages": [{"role": "user", "content": "草"}, {"role": "assistant", "content": answer()},
                      {"role": "user", "content": "树"}, {"role": "assistant", "content": answer()}]},
    ]
    firefly = [{"conversation_id": 1, "category": "诗", "conversation": [
        {"human": "作诗", "assistant": answer()}, {"human": "再来", "assistant": answer()}]}]
    texts = [answer(8), answer(8)]
    return {
        "alpaca": (write_json(folder / "alpaca.json", alpaca), {"format": "alpaca"},
                   [("你是诗人", [("写一句", alpaca[0]["output"])]),
                    ("", [("先写", alpaca[1]["history"][0][1]), ("再写\n关于山", alpaca[1]["output"])])]),
        "advertise": (write_json(folder / "AdvertiseGen" / "train.json", advertise, lines=True),
                      {"format": "alpaca", "columns": {"prompt": "content", "response": "summary"}},
                      [("", [(row["content"], row["summary"])]) for row in advertise]),
        "sharegpt": (write_json(folder / "sharegpt.json", sharegpt), {"format": "sharegpt"},
                     [("你是助手", [("你好", sharegpt[0]["conversations"][1]["value"]),
                                   ("然后呢", sharegpt[0]["conversations"][3]["value"])]),
                      ("", [("天气", sharegpt[1]["conversations"][1]["value"])])]),
        "openai": (write_json(folder / "openai.jsonl", openai, lines=True), {"format": "sharegpt"},
                   [("简短回答", [("天空", openai[0]["messages"][2]["content"])]),
                    ("", [("草", openai[1]["messages"][1]["content"]), ("树", openai[1]["messages"][3]["content"])])]),
        "firefly": (write_json(folder / "firefly.jsonl", firefly, lines=True),
                    {"format": "sharegpt", "columns": {"messages": "conversation"}},
                    [("", [(turn["human"], turn["assistant"]) for turn in firefly[0]["conversation"]])]),
        "text": (write_csv(folder / "text.csv", "id,content", [f"{i},{text}" for i, text in enumerate(texts)]),
                 {"format": "text"}, texts),
    }


def expected_samples(tokenizer, dialogues_or_texts, fmt: str) -> list[dict]:
    """The samples of a source, built here from `build_prompt` and the tokenizer alone."""
    gmask, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    samples = []
    if fmt == "text":
        for text in dialogues_or_texts:
            (ids,) = tokenizer.encode_text([text])
            samples.append({"input_ids": [gmask, sop, *ids, eop], "labels": [IGNORE_INDEX] * 2 + [*ids, eop]})
        return samples
    for system, pairs in dialogues_or_texts:
        for index, (query, answer) in enumerate(pairs):  # every answer, after the turns before it
            (prompt,) = tokenizer.encode_text([build_prompt(query, pairs[:index], system or None)])
            (response,) = tokenizer.encode_text([answer])
            samples.append({"input_ids": [*prompt, gmask, sop, *response, eop],
                            "labels": [IGNORE_INDEX] * (len(prompt) + 2) + [*response, eop]})
    return samples


def write_config(folder: Path, tiny_dir, data: dict, **settings) -> Path:
    values = {
        "model": str(tiny_dir), "data": {"cache_dir": str(folder / "hf-cache"), **data},
        "output_dir": str(folder / "out"), "max_seq_len": 64, "max_steps": 1, "batch_size": 4,
        "logging_steps": 1, "save_steps": 0, "report_to": [], "precision": "fp32", "seed": 0,
    }
    values.update(settings)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path


def train_capturing(config: Path, *overrides: str):
    """`thuglm train CONFIG`, with the training rows it built; (status, rows)."""
    captured = {}
    original = CausalLM.build_datasets

    def spy(task, tokenizer):
        captured["train"], captured["eval"] = original(task, tokenizer)
        return captured["train"], captured["eval"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CausalLM, "build_datasets", spy)
        status = main(["train", str(config), *overrides])
    return status, captured.get("train")


@pytest.fixture(scope="module")
def tokenizer_of(tiny_dir):
    return ChatGLMTokenizer.from_pretrained(tiny_dir)


# ---- samples, token by token -----------------------------------------------------------------------------------------
def test_system_text_goes_first_on_its_own_line():
    assert build_prompt("然后呢", [("你好", "春天")], "你是助手") == \
        "你是助手\n[Round 0]\n问：你好\n答：春天\n[Round 1]\n问：然后呢\n答："
    assert build_prompt("你好", system="你是助手") == "你是助手\n你好"
    assert build_prompt("你好", system=" ") == build_prompt("你好") == "你好"


def test_every_format_gives_the_samples_built_by_hand(tmp_path, tiny_dir, tokenizer_of):
    files = dataset_files(tmp_path / "data")
    sources = [{"files": [str(path)], **settings} for path, settings, _ in files.values()]
    status, rows = train_capturing(write_config(tmp_path, tiny_dir, {"sources": sources}, max_seq_len=128))
    assert status == 0
    expected = [sample for _, settings, dialogues in files.values()
                for sample in expected_samples(tokenizer_of, dialogues, settings["format"])]
    got = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]
    assert got == expected  # one sample a row (packing is off with dialogue sources), sources in order
    for row in rows:  # labels on exactly the answer and <eop>, all after <sop>
        sop = row["input_ids"].index(tokenizer_of.bos_token_id)
        assert all(label == IGNORE_INDEX for label in row["labels"][: sop + 1])
        assert row["labels"][sop + 1 :] == row["input_ids"][sop + 1 :]
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_mask_history_trains_the_last_answer_and_train_on_prompt_moves_the_prompt_after_sop(
    tmp_path, tiny_dir, tokenizer_of
):
    path, settings, dialogues = dataset_files(tmp_path / "data")["sharegpt"]
    config = write_config(tmp_path, tiny_dir, {"files": [str(path)], **settings, "mask_history": True})
    rows, _ = CausalLM(recipe.load_config(str(config), [])).build_datasets(tokenizer_of)
    last_only = [(system, pairs) for system, pairs in dialogues]
    everything = expected_samples(tokenizer_of, last_only, "sharegpt")
    assert [row["input_ids"] for row in rows] == [everything[1]["input_ids"], everything[2]["input_ids"]]

    overrides = ["data.mask_history=false", "data.train_on_prompt=true"]
    rows, _ = CausalLM(recipe.load_config(str(config), overrides)).build_datasets(tokenizer_of)
    gmask, sop = tokenizer_of.gmask_token_id, tokenizer_of.bos_token_id
    for row, sample in zip(rows, everything, strict=True):
        context = sample["input_ids"].index(gmask)
        body = sample["input_ids"][:context] + sample["input_ids"][context + 2 :]
        assert row["input_ids"] == [gmask, sop, *body]
        assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, *body]


def test_a_folder_whose_files_name_the_text_column_differently_trains_every_row(tmp_path, tiny_dir, tokenizer_of):
    folder = tmp_path / "corpus"
    write_csv(folder / "a.csv", "id,content", ["1,春天来了", "2,夏天到了"])
    write_json(folder / "b.json", [{"sentence": "秋天的风"}, {"sentence": "冬天的雪"}, {"sentence": "山和水"}])
    config = write_config(tmp_path, tiny_dir, {"files": [str(folder)]}, packing=False)
    rows, _ = CausalLM(recipe.load_config(str(config), [])).build_datasets(tokenizer_of)
    texts = ["春天来了", "夏天到了", "秋天的风", "冬天的雪", "山和水"]
    assert [row["input_ids"] for row in rows] == [s["input_ids"] for s in expected_samples(tokenizer_of, texts, "text")]


def test_txt_units_nested_json_and_compressed_files(tmp_path, tiny_dir, tokenizer_of):
    novel = tmp_path / "novel.txt"
    novel.write_text("第1章\n春天来了。\n花开了。\n\n第2章\n夏天到了。\n", encoding="utf-8")
    nested = write_json(tmp_path / "nested.json", {"version": 1, "data": [{"text": "山和水"}, {"text": "风和月"}]})
    packed = tmp_path / "rows.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in ["春", "夏", "秋"])

    def texts(files, *overrides):
        config = write_config(tmp_path, tiny_dir, {"files": [str(file) for file in files]}, packing=False)
        rows, _ = CausalLM(recipe.load_config(str(config), list(overrides))).build_datasets(tokenizer_of)
        return [tokenizer_of.decode(row["input_ids"][2:-1]) for row in rows]

    assert texts([novel], "data.txt_unit=paragraph") == ["第1章\n春天来了。\n花开了。", "第2章\n夏天到了。"]
    assert len(texts([novel])) == 5  # lines, the default: `第1章` alone
    assert texts([novel], "data.txt_unit=document") == ["第1章\n春天来了。\n花开了。\n\n第2章\n夏天到了。"]
    assert texts([nested], "data.field=data") == ["山和水", "风和月"]
    assert texts([packed]) == ["春", "夏", "秋"]


# ---- memorised, then read back by `thuglm generate` from the same files ----------------------------------------------
def generate(run: Path, file: Path, out: Path, *overrides: str) -> list[dict]:
    assert main(["generate", str(run), "--input", str(file), "--output", str(out), "--max-new-tokens", "8",
                 *overrides]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def memorise(folder: Path, tiny_dir, data: dict, steps: int) -> Path:
    config = write_config(folder, tiny_dir, data, method="full", max_steps=steps, batch_size=16,
                          learning_rate=1e-2, lr_scheduler="linear", warmup_ratio=0.0, logging_steps=steps)
    assert main(["train", str(config)]) == 0
    return folder / "out"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("mixed")
    files = dataset_files(folder / "data", seed=1)
    sources = [{"files": [str(path)], **settings, "weight": 2.0 if name == "text" else 1.0}
               for name, (path, settings, _) in files.items()]
    return memorise(folder, tiny_dir, {"sources": sources}, steps=250), files


@pytest.mark.parametrize("name", ["alpaca", "advertise", "sharegpt", "openai", "firefly"])
def test_mixed_sources_are_memorised_and_read_back_from_the_same_file(mixed_run, name, tmp_path):
    run, files = mixed_run
    path, _, dialogues = files[name]
    rows = generate(run, path, tmp_path / "answers.jsonl")
    # The last user turn of each row is asked after the turns before it; its answer is the reference.
    assert [row["reference"] for row in rows] == [pairs[-1][1] for _, pairs in dialogues]
    assert [row["prompt"] for row in rows] == [build_prompt(pairs[-1][0], pairs[:-1], system or None)
                                               for system, pairs in dialogues]
    assert [row["response"] for row in rows] == [row["reference"] for row in rows]


def test_eval_scores_the_dialogues_with_the_run_settings(mixed_run, tmp_path):
    pytest.importorskip("rouge_chinese")
    run, files = mixed_run
    out = tmp_path / "scores.json"
    assert main(["eval", str(run), "--data", str(files["openai"][0]), "--max-new-tokens", "8", "--output",
                 str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["samples"] == 2 and scores["bleu-4"] == pytest.approx(100.0)


def test_mixed_text_source_is_memorised(mixed_run, tmp_path):
    run, files = mixed_run
    out = tmp_path / "metrics.json"
    assert main(["eval", str(run), "--data", str(files["text"][0]), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["eval_loss"] < 0.3


def test_one_sharegpt_file_every_answer_memorised(tmp_path, tiny_dir):
    answer = random_answers(2)
    rows = [{"conversations": [{"from": "human", "value": f"问{i}"}, {"from": "gpt", "value": answer()},
                               {"from": "human", "value": f"再问{i}"}, {"from": "gpt", "value": answer()}]}
            for i in range(3)]
    path = write_json(tmp_path / "dialogues.json", rows)
    run = memorise(tmp_path, tiny_dir, {"files": [str(path)], "format": "sharegpt"}, steps=100)
    # The last answers, read back from the file with the run's settings
    got = generate(run, path, tmp_path / "last.jsonl")
    assert [row["response"] for row in got] == [row["conversations"][3]["value"] for row in rows]
    # The first answers too: each was its own sample. The same file cut after the first answer asks for them.
    first = write_json(tmp_path / "first.json", [{"conversations": row["conversations"][:2]} for row in rows])
    got = generate(run, first, tmp_path / "first.jsonl")
    assert [row["response"] for row in got] == [row["conversations"][1]["value"] for row in rows]


# ---- nothing dropped without a word ----------------------------------------------------------------------------------
def refused(capsys, status: int, out: Path, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    (message,) = [line for line in err.splitlines() if line.startswith("thuglm: ")]
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    return message


def test_a_file_without_a_needed_column_stops_before_anything_is_written(tmp_path, tiny_dir, capsys):
    good = write_json(tmp_path / "data" / "good.json", [{"instruction": "问", "output": "答"}])
    bad = write_json(tmp_path / "data" / "bad.json", [{"instruction": "问", "answer": "答"}])
    config = write_config(tmp_path, tiny_dir, {"files": [str(good), str(bad)], "format": "alpaca"})
    refused(capsys, main(["train", str(config)]), tmp_path / "out", "bad.json", "instruction, answer",
            "data.columns.response=")
    config = write_config(tmp_path, tiny_dir, {"files": [str(good)], "format": "sharegpt"})
    refused(capsys, main(["train", str(config)]), tmp_path / "out", "good.json", "conversations",
            "instruction, output")


def test_unused_columns_are_named_with_the_fix(tmp_path, tiny_dir, caplog):
    misspelt = write_json(tmp_path / "alpaca.json", [{"instruction": "翻译", "inputs": "春天", "output": "spring"}] * 4)
    config = write_config(tmp_path, tiny_dir, {"files": [str(misspelt)], "format": "alpaca"})
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        status, _ = train_capturing(config)
    assert status == 0
    (warning,) = [record.message for record in caplog.records if "read by nothing" in record.message]
    assert "`inputs`" in warning and "data.columns.query=inputs" in warning

    caplog.clear()
    advertise = write_json(tmp_path / "AdvertiseGen" / "train.json",
                           [{"content": "类型#裙", "summary": "这条裙子很美"}] * 4, lines=True)
    config = write_config(tmp_path, tiny_dir, {"files": [str(advertise)], "format": "text"},
                          output_dir=str(tmp_path / "out2"))
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        assert main(["train", str(config)]) == 0
    (warning,) = [record.message for record in caplog.records if "read by nothing" in record.message]
    assert "`summary`" in warning and "data.format=alpaca data.columns.prompt=content " \
        "data.columns.response=summary" in warning


BAD_DIALOGUES = [
    {"conversations": [{"from": "human", "value": "一"}, {"from": "gpt", "value": "好"}]},
    {"conversations": [{"from": "human", "value": "一"}, {"from": "human", "value": "二"}]},
    {"conversations": [{"from": "gpt", "value": "先答"}, {"from": "human", "value": "问"}]},
    {"conversations": [{"from": "human", "value": "一"}, {"from": "gpt", "value": " "}]},
    {"conversations": [{"from": "human", "value": "一"}, {"from": "gpt", "value": "好"}]},
]


def test_bad_dialogues_are_skipped_counted_and_named_or_stop_the_run(tmp_path, tiny_dir, capsys, caplog):
    path = write_json(tmp_path / "dialogues.json", BAD_DIALOGUES)
    config = write_config(tmp_path, tiny_dir, {"files": [str(path)], "format": "sharegpt"}, packing=False)
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        status, rows = train_capturing(config)
    assert status == 0 and len(rows) == 2
    assert "skipped 1 row(s) whose `conversations` has two user turns in a row (row 2)" in caplog.text
    assert "skipped 1 row(s) whose `conversations` has an assistant turn first (row 3)" in caplog.text
    assert "skipped 1 row(s) whose `conversations` has an empty answer (row 4)" in caplog.text
    assert "skipped 3 of 5 rows in all" in caplog.text
    capsys.readouterr()
    refused(capsys, main(["train", str(config), "data.on_bad_row=error", f"output_dir={tmp_path / 'out2'}"]),
            tmp_path / "out2", "dialogues.json", "row 2", "two user turns in a row")


def test_streaming_mixes_sources_by_weight(tmp_path, tiny_dir):
    text = write_json(tmp_path / "data" / "text.jsonl", [{"text": "春天来了", "url": "u"}] * 8, lines=True)
    chat = write_json(tmp_path / "data" / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}] * 8, lines=True)
    sources = [{"files": [str(text)], "format": "text", "weight": 1, "max_samples": 4},
               {"files": [str(chat)], "format": "sharegpt", "weight": 3}]
    config = write_config(tmp_path, tiny_dir, {"sources": sources, "streaming": True}, max_steps=3, batch_size=8)
    assert main(["train", str(config)]) == 0


@pytest.mark.parametrize("fmt", ["text", "alpaca", "sharegpt"])
def test_streaming_reads_files_whose_extra_columns_differ(tmp_path, tiny_dir, fmt):
    rows = {"text": [{"text": "春天来了"}], "alpaca": [{"instruction": "问", "output": "答"}],
            "sharegpt": [{"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]}]}[fmt]
    first = write_json(tmp_path / "data" / "a.jsonl", rows * 8, lines=True)
    second = write_json(tmp_path / "data" / "b.jsonl", [{**row, "url": "https://example.com"} for row in rows] * 8,
                        lines=True)
    config = write_config(tmp_path, tiny_dir, {"files": [str(first), str(second)], "format": fmt, "streaming": True},
                          max_steps=3, batch_size=8)
    assert main(["train", str(config)]) == 0


def test_config_keys_of_the_data_formats_are_checked(tmp_path, tiny_dir, capsys):
    path = write_json(tmp_path / "a.json", [{"instruction": "问", "output": "答"}])
    config = write_config(tmp_path, tiny_dir, {"files": [str(path)], "format": "alpaca"})
    refused(capsys, main(["train", str(config), "data.columns.messages=conversation"]), tmp_path / "out",
            "data.columns.messages", "sharegpt")
    refused(capsys, main(["train", str(config), "data.tags.role_tag=role"]), tmp_path / "out", "data.tags")
    refused(capsys, main(["train", str(config), f"data.sources=[{{files: [{path}]}}]"]), tmp_path / "out",
            "not both")
    refused(capsys, main(["train", str(config), "data.colums.prompt=q"]), tmp_path / "out", "data.columns")


def test_advertisegen_as_alpaca_without_columns_names_both_keys(tmp_path, tiny_dir, capsys):
    advertise = write_json(tmp_path / "train.json", [{"content": "类型#裙", "summary": "裙子"}], lines=True)
    config = write_config(tmp_path, tiny_dir, {"files": [str(advertise)], "format": "alpaca"})
    refused(capsys, main(["train", str(config)]), tmp_path / "out", "train.json", "content, summary",
            "data.columns.prompt=NAME data.columns.response=NAME")


def test_chat_generate_and_training_put_the_system_text_in_one_place(model, tokenizer):
    from thuglm.inference.generate import generate_responses

    history = [("你好", "春天")]
    answer, _ = model.chat(tokenizer, "然后呢", history, system="你是助手", do_sample=False, max_length=None,
                           max_new_tokens=6)
    (batched,) = generate_responses(model, tokenizer, [build_prompt("然后呢", history, "你是助手")], max_new_tokens=6)
    assert answer == batched
    inputs = tokenizer([build_prompt("然后呢", history, "你是助手")])["input_ids"][0]
    assert tokenizer.decode(inputs).startswith("你是助手\n[Round 0]")


def test_sharegpt_variants_and_tool_messages(tmp_path, tiny_dir, tokenizer_of, caplog):
    rows = [
        {"conversations": [{"from": "user", "value": "问"}, {"from": "assistant", "value": "答"}]},
        {"conversations": [{"from": "human", "value": "查天气"}, {"from": "function_call", "value": "{}"},
                           {"from": "observation", "value": "晴"}, {"from": "gpt", "value": "晴天"}]},
        {"dialogue": [{"speaker": "客户", "text": "你好"}, {"speaker": "客服", "text": "您好"}]},
    ]
    path = write_json(tmp_path / "variants.json", rows[:2])
    config = write_config(tmp_path, tiny_dir, {"files": [str(path)], "format": "sharegpt"}, packing=False)
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        built, _ = CausalLM(recipe.load_config(str(config), [])).build_datasets(tokenizer_of)
    assert [row["input_ids"] for row in built] == [s["input_ids"] for s in
                                                   expected_samples(tokenizer_of, [("", [("问", "答")])], "sharegpt")]
    assert "skipped 1 row(s) whose `conversations` has a tool call or tool output" in caplog.text

    custom = write_json(tmp_path / "custom.json", rows[2:])
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "客户", "assistant_tag": "客服"}
    config = write_config(tmp_path, tiny_dir, {"files": [str(custom)], "format": "sharegpt",
                                               "columns": {"messages": "dialogue"}, "tags": tags}, packing=False)
    built, _ = CausalLM(recipe.load_config(str(config), [])).build_datasets(tokenizer_of)
    assert [row["input_ids"] for row in built] == [s["input_ids"] for s in
                                                   expected_samples(tokenizer_of, [("", [("你好", "您好")])], "sharegpt")]


def test_nested_json_without_field_names_the_key(tmp_path, tiny_dir, capsys):
    nested = write_json(tmp_path / "nested.json", {"version": 1, "data": [{"text": "山和水"}, {"text": "风和月"}]})
    config = write_config(tmp_path, tiny_dir, {"files": [str(nested)]})
    refused(capsys, main(["train", str(config)]), tmp_path / "out", "nested.json", "data.field=data")


def test_generate_reads_dialogues_for_a_model_without_run_settings(tmp_path, tiny_dir):
    rows = [{"messages": [{"role": "system", "content": "简短"}, {"role": "user", "content": "你好"},
                          {"role": "assistant", "content": "您好"}, {"role": "user", "content": "再见"}]}]
    got = generate(tiny_dir, write_json(tmp_path / "chat.jsonl", rows, lines=True), tmp_path / "out.jsonl")
    assert [row["prompt"] for row in got] == [build_prompt("再见", [("你好", "您好")], "简短")]
    assert "reference" not in got[0]


@pytest.mark.parametrize("packing", [True, False])
def test_packed_batches_take_one_shape_and_unpacked_ones_their_longest_row(tmp_path, tiny_dir, tokenizer_of, packing):
    """Packed rows are padded to max_seq_len, so a compiled layer sees one shape whatever rows a batch draws."""
    folder = tmp_path / "corpus"
    write_csv(folder / "a.csv", "content", ["春天来了", "夏天到了，天气很热", "秋天的风"])
    config = write_config(tmp_path, tiny_dir, {"files": [str(folder)]}, packing=packing, max_seq_len=48)
    task = CausalLM(recipe.load_config(str(config), []))
    rows, _ = task.build_datasets(tokenizer_of)
    model = SimpleNamespace(config=ChatGLMConfig.from_pretrained(tiny_dir))  # the collator reads the config only
    batch = task.collator(tokenizer_of, model)(list(rows))
    longest = max(len(row["input_ids"]) for row in rows)
    assert longest < 48
    assert batch["input_ids"].shape == (len(rows), 48 if packing else longest)
    assert batch["position_ids"].shape[-1] == batch["input_ids"].shape[1]
