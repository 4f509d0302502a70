"""Training rows: text windows, alpaca prompts, packing, streaming and the tokenization cache."""

from __future__ import annotations

import json
import logging

import datasets
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from thuglm.data import (
    IGNORE_INDEX,
    DataError,
    GlmCollator,
    alpaca_sample,
    encode_alpaca_dataset,
    encode_text_dataset,
    load_raw_dataset,
    pack_samples,
    text_windows,
)
from thuglm.inference import build_prompt
from thuglm.models import ChatGLMTokenizer

GMASK, SOP, EOP = 6, 9, 10


@pytest.mark.parametrize("length", [0, 1, 5, 6, 7, 13, 20, 50])
def test_text_windows_keep_every_id_once_and_fit(length):
    ids = list(range(100, 100 + length))
    windows = text_windows(ids, 8, GMASK, SOP, EOP)
    chunks = []
    for window in windows:
        assert len(window["input_ids"]) <= 8
        assert window["input_ids"][:2] == [GMASK, SOP]
        assert window["labels"][:2] == [IGNORE_INDEX, IGNORE_INDEX]
        assert window["labels"][2:] == window["input_ids"][2:]  # loss on every token after <sop>
        chunks.extend(i for i in window["input_ids"][2:] if i != EOP)
    assert chunks == ids
    assert windows[-1]["input_ids"][-1] == EOP
    assert all(EOP not in w["input_ids"] for w in windows[:-1])


def test_pack_samples_numbers_samples_and_fills_rows_in_order():
    samples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (3, 4, 2, 5, 1)]
    rows = pack_samples(samples, 8)
    assert [r["input_ids"] for r in rows] == [[3] * 3 + [4] * 4, [2] * 2 + [5] * 5 + [1], ]
    assert rows[0]["attention_mask"] == [1] * 3 + [2] * 4
    assert rows[1]["attention_mask"] == [1] * 2 + [2] * 5 + [3]


def per_sample_losses(model, batch) -> list[float]:
    """Mean token loss of every sample (a run of one non-zero mask value) in a batch."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    losses = []
    for row in range(batch["input_ids"].shape[0]):
        mask = batch["attention_mask"][row, 1:]
        labelled = batch["labels"][row, 1:] != IGNORE_INDEX
        for number in mask.unique().tolist():
            if number:
                selected = (mask == number) & labelled
                losses.append(float(token_loss[row][selected].mean()))
    return losses


def csv_corpus(tmp_path, texts):
    path = tmp_path / "corpus.csv"
    pd.DataFrame({"content": texts, "title": [f"t{i}" for i in range(len(texts))]}).to_csv(path, index=False)
    return path


TEXTS = ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
         "白日依山尽，黄河入海流。", "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。"]


def test_packed_rows_give_each_sample_the_loss_it_has_alone(tmp_path, tokenizer, model):
    raw = load_raw_dataset(str(csv_corpus(tmp_path, TEXTS)), cache_dir=str(tmp_path / "cache"))
    collate = GlmCollator(tokenizer.pad_token_id)
    packed = encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=64, packing=True)
    alone = encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=64, packing=False)
    assert len(packed) < len(alone) == len(TEXTS)
    assert max(max(row) for row in packed["attention_mask"]) > 1
    packed_losses = per_sample_losses(model, collate(list(packed)))
    alone_losses = [per_sample_losses(model, collate([row]))[0] for row in alone]
    assert packed_losses == pytest.approx(alone_losses, abs=1e-5)


def test_empty_texts_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    raw = load_raw_dataset(str(csv_corpus(tmp_path, ["你好", None, "  ", "再见", 42])), cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        rows = encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=32, packing=False)
    assert len(rows) == 3  # "你好", "再见" and the number 42, read as text
    assert "skipped 2 of 5 rows whose `content` is empty" in caplog.text


def test_long_text_becomes_windows_not_a_cut(tmp_path, tokenizer):
    text = "".join(TEXTS) * 4
    raw = load_raw_dataset(str(csv_corpus(tmp_path, [text])), cache_dir=str(tmp_path / "cache"))
    rows = encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=32, packing=False)
    ids = tokenizer.encode_text([text])[0]
    assert len(rows) > 1 and all(len(r) <= 32 for r in rows["input_ids"])
    assert [i for r in rows["input_ids"] for i in r[2:] if i != tokenizer.eos_token_id] == ids


ALPACA = [
    {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"},
    {"instruction": "继续", "input": "", "output": "好的，我们接着说。", "history": [["第一个问题", "第一个回答"]]},
    {"instruction": "没有答案", "input": "", "output": ""},
]


def test_alpaca_labels_cover_exactly_the_response(tokenizer):
    sample = alpaca_sample(ALPACA[0], tokenizer, 128)
    prompt_ids = tokenizer.encode_text(["把这句话翻译成英文\n你好"])[0]
    context = len(prompt_ids) + 2
    assert sample["input_ids"][:context] == [*prompt_ids, tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert sample["labels"][:context] == [IGNORE_INDEX] * context
    assert sample["labels"][context:] == sample["input_ids"][context:]
    assert sample["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample["input_ids"][context:-1]) == "Hello"


def test_alpaca_history_is_formatted_like_the_official_chat(tokenizer):
    sample = alpaca_sample(ALPACA[1], tokenizer, 128)
    context = sample["labels"].count(IGNORE_INDEX)
    prompt = tokenizer.decode(sample["input_ids"][: context - 2])
    assert prompt == build_prompt("继续", [("第一个问题", "第一个回答")])
    assert prompt == "[Round 0]\n问：第一个问题\n答：第一个回答\n[Round 1]\n问：继续\n答："
    assert alpaca_sample(ALPACA[2], tokenizer, 128) is None


def test_alpaca_truncation_drops_history_then_prompt_then_response(tokenizer):
    history = [["很久以前的问题" * 5, "很久以前的回答" * 5], ["问题", "回答"]]
    row = {"instruction": "最后的问题", "output": "最后的回答", "history": history}
    full = alpaca_sample(row, tokenizer, 512)
    assert not full["truncated"]
    short = alpaca_sample(row, tokenizer, 40)
    assert short["truncated"] and len(short["input_ids"]) <= 40
    context = short["labels"].count(IGNORE_INDEX)
    assert "很久以前" not in tokenizer.decode(short["input_ids"][:context]) and short["input_ids"][-1] == tokenizer.eos_token_id
    long_answer = alpaca_sample({"instruction": "问题" * 30, "output": "回答" * 100}, tokenizer, 40)
    assert long_answer["truncated"] and len(long_answer["input_ids"]) == 40
    assert long_answer["input_ids"][-1] != tokenizer.eos_token_id  # cut responses do not learn to stop there


def test_alpaca_dataset_and_missing_columns(tmp_path, tokenizer, caplog):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, ensure_ascii=False))
    raw = load_raw_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        rows = encode_alpaca_dataset(raw, tokenizer, max_seq_len=128, packing=False)
    assert len(rows) == 2 and "skipped 1 alpaca rows" in caplog.text
    wrong = datasets.Dataset.from_dict({"question": ["a"], "answer": ["b"]})
    with pytest.raises(DataError, match="missing instruction, output, found question, answer"):
        encode_alpaca_dataset(wrong, tokenizer, max_seq_len=128, packing=False)


def test_streaming_gives_the_rows_of_the_cached_path(tmp_path, tokenizer):
    path = csv_corpus(tmp_path, TEXTS)
    cached = encode_text_dataset(load_raw_dataset(str(path), cache_dir=str(tmp_path / "cache")), tokenizer,
                                 text_column="content", max_seq_len=40, packing=True)
    streamed = encode_text_dataset(load_raw_dataset(str(path), streaming=True), tokenizer,
                                   text_column="content", max_seq_len=40, packing=True)
    assert list(streamed) == list(cached)


def test_second_run_reuses_the_tokenized_cache(tmp_path, tiny_dir, monkeypatch):
    path = csv_corpus(tmp_path, TEXTS)

    def encode(tokenizer, packing=True):
        raw = load_raw_dataset(str(path), cache_dir=str(tmp_path / "cache"))
        return encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=40, packing=packing)

    first = encode(ChatGLMTokenizer.from_pretrained(tiny_dir))
    calls = []
    original = ChatGLMTokenizer.encode_text
    monkeypatch.setattr(ChatGLMTokenizer, "encode_text", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    again = encode(ChatGLMTokenizer.from_pretrained(tiny_dir))  # a fresh tokenizer object, as in a new process
    assert calls == [] and list(again) == list(first)
    encode(ChatGLMTokenizer.from_pretrained(tiny_dir), packing=False)  # other parameters: tokenized anew
    assert calls
