"""Training rows: text windows, alpaca prompts, packing, streaming and the tokenization cache."""

from __future__ import annotations

import json
import logging
import random

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
TEXTS = [
    "春眠不觉晓，处处闻啼鸟。",
    "夜来风雨声，花落知多少。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
]
ALPACA = [
    {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"},
    {"instruction": "继续", "input": "", "output": "好的，我们接着说。", "history": [["第一个问题", "第一个回答"]]},
    {"instruction": "没有答案", "input": "", "output": ""},
    {"instruction": "写一首诗", "input": None, "output": "床前明月光，疑是地上霜。" * 6},
]


def csv_corpus(tmp_path, texts):
    path = tmp_path / "corpus.csv"
    pd.DataFrame({"content": texts, "title": [f"t{i}" for i in range(len(texts))]}).to_csv(path, index=False)
    return path


def alpaca_file(tmp_path, records=ALPACA):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def load(path, tmp_path, **kwargs):
    return load_raw_dataset(str(path), cache_dir=str(tmp_path / "cache"), **kwargs)


def layout(tokenizer):
    return tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id


# ---- text windows ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [0, 1, 4, 5, 6, 7, 8, 11, 12, 13, 50])
def test_text_windows_keep_every_id_once_and_fit(length):
    ids = list(range(100, 100 + length))
    windows = text_windows(ids, 8, GMASK, SOP, EOP)
    for window in windows:
        assert len(window["input_ids"]) <= 8
        assert window["input_ids"][:2] == [GMASK, SOP]
        assert window["labels"][:2] == [IGNORE_INDEX, IGNORE_INDEX]
        assert window["labels"][2:] == window["input_ids"][2:]  # loss on every token after <sop>
    chunks = [i for window in windows for i in window["input_ids"][2:] if i != EOP]
    assert chunks == ids
    if ids:
        assert windows[-1]["input_ids"][-1] == EOP and all(EOP not in w["input_ids"] for w in windows[:-1])
        assert all(len(w["input_ids"]) > 2 + (w is windows[-1]) for w in windows)  # <eop> never stands alone
    else:
        assert windows == []


def test_short_text_is_one_sample_and_tiny_rows_are_refused():
    assert text_windows([1, 2], 8, GMASK, SOP, EOP) == [
        {"input_ids": [GMASK, SOP, 1, 2, EOP], "labels": [IGNORE_INDEX, IGNORE_INDEX, 1, 2, EOP]}
    ]
    with pytest.raises(ValueError, match="at least 4"):
        text_windows([1], 3, GMASK, SOP, EOP)


# ---- packing ---------------------------------------------------------------------------------------------------------
def test_pack_samples_puts_each_where_it_fits_best_longest_first_and_keeps_the_samples_order():
    samples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (3, 4, 2, 5, 1, 8)]
    rows = pack_samples(samples, 8)
    # 8 fills a row; 5 opens one (3 free), 4 another (4 free); 3 fits the first exactly, 2 and 1 the second. The rows
    # come where their first samples came (3, then 4, then 8), each sample in its row in the order of the input.
    assert [r["input_ids"] for r in rows] == [[3] * 3 + [5] * 5, [4] * 4 + [2] * 2 + [1], [8] * 8]
    assert [r["attention_mask"] for r in rows] == [[1] * 3 + [2] * 5, [1] * 4 + [2] * 2 + [3], [1] * 8]
    assert [r["labels"] for r in rows] == [r["input_ids"] for r in rows]
    with pytest.raises(ValueError, match="9 tokens"):
        pack_samples([{"input_ids": [1] * 9, "labels": [1] * 9}], 8)


def test_pack_samples_keeps_every_sample_whole_and_fills_rows_closer_than_in_order():
    lengths = random.Random(0).choices(range(1, 200), k=500)
    samples = [{"input_ids": [i] * n, "labels": [-i] * n} for i, n in enumerate(lengths)]
    rows = pack_samples(samples, 512)
    found = []
    for row in rows:
        assert len(row["input_ids"]) <= 512
        for number in sorted(set(row["attention_mask"])):
            ids = [t for t, m in zip(row["input_ids"], row["attention_mask"]) if m == number]
            labels = [t for t, m in zip(row["labels"], row["attention_mask"]) if m == number]
            assert len(set(ids)) == 1 and labels == [-ids[0]] * len(ids)  # one whole sample, its own labels
            found.append((ids[0], len(ids)))
    assert sorted(found) == list(enumerate(lengths))  # every sample once, at its length
    firsts = [row["input_ids"][0] for row in rows]
    assert firsts == sorted(firsts)  # rows in the order of their first samples: long ones are not all first
    in_order = 1 + sum(1 for _ in _in_order_breaks(lengths, 512))
    assert len(rows) == -(-sum(lengths) // 512) < in_order  # as few rows as the tokens allow


def _in_order_breaks(lengths, max_seq_len):
    """Where filling rows in order would open a new row."""
    used = 0
    for length in lengths:
        if used + length > max_seq_len:
            yield length
            used = 0
        used += length


def per_sample_losses(model, batch) -> list[float]:
    """Loss of every sample (a run of one non-zero mask value) in a batch, row by row: its token losses summed, over
    its number of predicted tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )
    losses = []
    for row in range(batch["input_ids"].shape[0]):
        segment = batch["attention_mask"][row, 1:]  # the segment of the predicted token
        for number in segment.unique().tolist():
            predicted = (segment == number) & (batch["labels"][row, 1:] != IGNORE_INDEX)
            if number:
                losses.append(float(token_loss[row][predicted].sum() / predicted.sum()))
    return losses


def encode_file(fmt, tmp_path, tokenizer, *, max_seq_len, packing, streaming=False, num_proc=None):
    """The training rows of TEXTS (with an empty row) or of ALPACA, written to a file and read back."""
    if fmt == "text":
        raw = load(csv_corpus(tmp_path, [*TEXTS, None]), tmp_path, streaming=streaming)
        return encode_text_dataset(
            raw, tokenizer, text_column="content", max_seq_len=max_seq_len, packing=packing, num_proc=num_proc
        )
    raw = load(alpaca_file(tmp_path), tmp_path, streaming=streaming)
    return encode_alpaca_dataset(raw, tokenizer, max_seq_len=max_seq_len, packing=packing, num_proc=num_proc)


@pytest.mark.parametrize("fmt", ["text", "alpaca"])
def test_packed_rows_give_each_sample_the_loss_it_has_alone(tmp_path, tokenizer, model, fmt):
    packed = encode_file(fmt, tmp_path, tokenizer, max_seq_len=80, packing=True)
    alone = encode_file(fmt, tmp_path, tokenizer, max_seq_len=80, packing=False)
    assert len(packed) < len(alone)
    for row in packed:
        assert len(row["input_ids"]) <= 80
        numbers = list(dict.fromkeys(row["attention_mask"]))
        assert numbers == list(range(1, len(numbers) + 1))
    collate = GlmCollator(tokenizer.pad_token_id)
    packed_losses = per_sample_losses(model, collate(list(packed)))
    alone_losses = [per_sample_losses(model, collate([row]))[0] for row in alone]
    assert sorted(packed_losses) == pytest.approx(sorted(alone_losses), abs=1e-5)  # packing reorders samples


# ---- plain text through datasets -------------------------------------------------------------------------------------
def test_text_rows_are_gmask_sop_text_eop(tmp_path, tokenizer):
    rows = encode_text_dataset(load(csv_corpus(tmp_path, TEXTS[:2]), tmp_path), tokenizer, text_column="content",
                               max_seq_len=64, packing=False)
    assert rows.column_names == ["input_ids", "labels", "attention_mask"]
    gmask, sop, eop = layout(tokenizer)
    for row, ids in zip(rows, tokenizer.encode_text(TEXTS[:2])):
        assert row["input_ids"] == [gmask, sop, *ids, eop]
        assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, *ids, eop]
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_empty_texts_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    raw = load(csv_corpus(tmp_path, ["你好", None, "  ", "再见", 42]), tmp_path)
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        rows = encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=32, packing=False)
    assert [tokenizer.decode(r[2:-1]) for r in rows["input_ids"]] == ["你好", "再见", "42"]  # a number read as text
    assert "skipped 2 of 5 rows whose `content` is empty" in caplog.text


def test_long_text_becomes_windows_not_a_cut(tmp_path, tokenizer):
    text = "".join(TEXTS) * 4
    raw = load(csv_corpus(tmp_path, [text]), tmp_path)
    rows = encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=32, packing=False)
    assert len(rows) > 1 and all(len(r) <= 32 for r in rows["input_ids"])
    text_ids = [i for r in rows["input_ids"] for i in r[2:] if i != tokenizer.eos_token_id]
    assert text_ids == tokenizer.encode_text([text])[0]


def test_unknown_text_column_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no column 'contents'.*Did you mean 'content'"):
        encode_text_dataset(load(csv_corpus(tmp_path, TEXTS), tmp_path), tokenizer, text_column="contents",
                            max_seq_len=32, packing=False)


# ---- alpaca ----------------------------------------------------------------------------------------------------------
def context_length(sample) -> int:
    return sample["labels"].count(IGNORE_INDEX)


def test_alpaca_labels_cover_exactly_the_prompt_and_gmask_sop(tokenizer):
    sample = alpaca_sample(ALPACA[0], tokenizer, 128)
    prompt_ids = tokenizer.encode_text(["把这句话翻译成英文\n你好"])[0]
    gmask, sop, eop = layout(tokenizer)
    context = len(prompt_ids) + 2
    assert sample["input_ids"][:context] == [*prompt_ids, gmask, sop]
    assert sample["labels"] == [IGNORE_INDEX] * context + sample["input_ids"][context:]
    assert sample["input_ids"][-1] == eop and tokenizer.decode(sample["input_ids"][context:-1]) == "Hello"
    assert alpaca_sample(ALPACA[2], tokenizer, 128) is None  # no output: nothing to learn


def test_alpaca_history_is_formatted_like_the_official_chat(tokenizer):
    sample = alpaca_sample(ALPACA[1], tokenizer, 128)
    prompt = tokenizer.decode(sample["input_ids"][: context_length(sample) - 2])
    assert prompt == build_prompt("继续", [("第一个问题", "第一个回答")])
    assert prompt == "[Round 0]\n问：第一个问题\n答：第一个回答\n[Round 1]\n问：继续\n答："


def test_alpaca_truncation_drops_old_history_then_the_prompt_start_then_the_response_end(tokenizer):
    eop = tokenizer.eos_token_id
    history = [["很久以前的问题" * 5, "很久以前的回答" * 5], ["问题", "回答"]]
    row = {"instruction": "最后的问题", "output": "最后的回答", "history": history}
    assert tokenizer.decode(alpaca_sample(row, tokenizer, 512)["input_ids"]).count("Round") == 3
    # Too long: the oldest round goes, the newer one stays.
    short = alpaca_sample(row, tokenizer, 48)
    prompt = tokenizer.decode(short["input_ids"][: context_length(short) - 2])
    assert prompt == build_prompt("最后的问题", [("问题", "回答")]) and short["input_ids"][-1] == eop
    assert len(short["input_ids"]) <= 48
    # No history left to drop: the start of the prompt goes, the response stays whole.
    question = "".join(TEXTS)
    cut_prompt = alpaca_sample({"instruction": question, "output": "好"}, tokenizer, 16)
    prompt_ids = tokenizer.encode_text([question])[0]
    kept = context_length(cut_prompt) - 2
    assert len(cut_prompt["input_ids"]) <= 16 and cut_prompt["input_ids"][:kept] == prompt_ids[-kept:]
    assert cut_prompt["input_ids"][-1] == eop
    # A response longer than the row: the prompt keeps half the row, the response loses its end and its <eop>.
    long_answer = alpaca_sample({"instruction": question, "output": question * 3}, tokenizer, 40)
    assert len(long_answer["input_ids"]) == 40 and context_length(long_answer) - 2 == (40 - 3) // 2
    response = long_answer["input_ids"][context_length(long_answer):]
    assert response == tokenizer.encode_text([question * 3])[0][: len(response)]
    assert eop not in response  # a cut response does not learn to stop there


def test_alpaca_dataset_counts_skipped_and_shortened_records(tmp_path, tokenizer, caplog):
    raw = load(alpaca_file(tmp_path), tmp_path)
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        rows = encode_alpaca_dataset(raw, tokenizer, max_seq_len=64, packing=False)
    assert len(rows) == 3 and all(len(ids) <= 64 for ids in rows["input_ids"])
    expected = [alpaca_sample(record, tokenizer, 64) for record in ALPACA]
    assert rows["input_ids"] == [sample["input_ids"] for sample in expected if sample is not None]
    assert "skipped 1 of 4 rows whose `output` is empty" in caplog.text
    assert "shortened 1 of 4 alpaca records longer than max_seq_len=64" in caplog.text
    assert caplog.text.count("WARNING") == 2


def test_alpaca_errors_name_the_problem(tmp_path, tokenizer):
    wrong = datasets.Dataset.from_dict({"question": ["a"], "answer": ["b"]})
    with pytest.raises(DataError, match="missing instruction, output, found question, answer"):
        encode_alpaca_dataset(wrong, tokenizer, max_seq_len=128, packing=False)
    flat = datasets.Dataset.from_dict({"instruction": ["继续"], "output": ["好"], "history": ['[["问", "答"]]']})
    with pytest.raises(DataError, match="'继续': `history` must be a list of \\[query, response\\] pairs"):
        encode_alpaca_dataset(flat, tokenizer, max_seq_len=128, packing=False)


# ---- streaming, workers and the cache --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["text", "alpaca"])
def test_streaming_gives_the_rows_of_the_cached_path(tmp_path, tokenizer, fmt):
    streamed = encode_file(fmt, tmp_path, tokenizer, max_seq_len=40, packing=True, streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert list(streamed) == list(encode_file(fmt, tmp_path, tokenizer, max_seq_len=40, packing=True))


@pytest.mark.parametrize("fmt", ["text", "alpaca"])
def test_worker_processes_give_the_same_rows(tmp_path, tokenizer, fmt):
    # each worker packs its own share of the samples, so rows may pair them differently: the samples are the same
    workers = encode_file(fmt, tmp_path, tokenizer, max_seq_len=40, packing=True, num_proc=2)
    one = encode_file(fmt, tmp_path, tokenizer, max_seq_len=40, packing=True)
    assert sorted(packed_samples(workers)) == sorted(packed_samples(one))


def packed_samples(rows) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every sample of packed rows: its (input_ids, labels)."""
    samples = []
    for row in rows:
        for number in dict.fromkeys(row["attention_mask"]):
            at = [i for i, m in enumerate(row["attention_mask"]) if m == number]
            samples.append((tuple(row["input_ids"][i] for i in at), tuple(row["labels"][i] for i in at)))
    return samples


def test_second_run_reuses_the_tokenized_cache(tmp_path, tiny_dir, monkeypatch):
    path = csv_corpus(tmp_path, TEXTS)

    def encode(max_seq_len=40):
        tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)  # a fresh tokenizer object, as in a new process
        raw = load(path, tmp_path)
        return encode_text_dataset(raw, tokenizer, text_column="content", max_seq_len=max_seq_len, packing=True)

    first = encode()
    calls = []
    original = ChatGLMTokenizer.encode_text

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChatGLMTokenizer, "encode_text", counted)
    again = encode()
    assert calls == [] and list(again) == list(first)
    assert again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    other = encode(max_seq_len=16)  # new rows from the cached token ids: still no tokenization
    assert calls == [] and list(other) != list(first) and max(map(len, other["input_ids"])) <= 16
