"""From rows of text or alpaca records to ChatGLM training rows: `input_ids`, `labels`, `attention_mask`.

* Text: `[gMASK] <sop> text <eop>`, loss on every text token and `<eop>`. A text longer than `max_seq_len` becomes
  several windows `[gMASK] <sop> chunk`; nothing is cut away.
* Alpaca: the official chat prompt, then `[gMASK] <sop> output <eop>`; labels -100 over the prompt.
* Packing: whole samples fill each row in order; `attention_mask` numbers them 1, 2, 3, ... so the model gives each
  its own positions and a block-diagonal mask, exactly as if it were alone.

Work is done by `datasets.map` (batched, `num_proc` workers, Arrow cache). The cache key is computed here from the
input's fingerprint, the tokenizer's files and the parameters: `datasets` would otherwise hash the tokenizer object,
which is not stable between processes, and tokenize everything again on every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import datasets

from ..inference.chat import build_prompt
from .loading import DataError
from .samples import IGNORE_INDEX, causal_lm_sample, prompt_response_sample

logger = logging.getLogger("thuglm.data")

LAYOUT_VERSION = 1
MAP_BATCH_SIZE = 1000
COLUMNS = ["input_ids", "labels", "attention_mask"]


def text_windows(text_ids: Sequence[int], max_seq_len: int, gmask_id: int, sop_id: int, eop_id: int) -> list[dict]:
    """`[gMASK] <sop> chunk` windows of at most `max_seq_len` ids; the last ends with `<eop>`.

    Concatenating the chunks gives back `text_ids`: no id is lost or repeated.
    """
    room = max_seq_len - 2
    windows, start = [], 0
    while len(text_ids) - start >= room:  # the last window needs one slot for <eop>
        chunk = list(text_ids[start : start + room])
        windows.append({"input_ids": [gmask_id, sop_id, *chunk], "labels": [IGNORE_INDEX, IGNORE_INDEX, *chunk]})
        start += room
    windows.append(causal_lm_sample(text_ids[start:], gmask_id, sop_id, eop_id))
    return windows


def pack_samples(samples: Iterable[dict], max_seq_len: int) -> list[dict]:
    """Fill rows of at most `max_seq_len` tokens with whole samples, in order; `attention_mask` numbers them."""
    rows: list[dict] = []
    for sample in samples:
        length = len(sample["input_ids"])
        if not rows or len(rows[-1]["input_ids"]) + length > max_seq_len:
            rows.append({"input_ids": [], "labels": [], "attention_mask": []})
        row = rows[-1]
        number = row["attention_mask"][-1] + 1 if row["attention_mask"] else 1
        row["input_ids"].extend(sample["input_ids"])
        row["labels"].extend(sample["labels"])
        row["attention_mask"].extend([number] * length)
    return rows


def _rows(samples: list[dict], max_seq_len: int, packing: bool) -> dict[str, list]:
    if packing:
        samples = pack_samples(samples, max_seq_len)
    else:
        samples = [{**s, "attention_mask": [1] * len(s["input_ids"])} for s in samples]
    return {name: [s[name] for s in samples] for name in COLUMNS}


def _is_text(value) -> bool:
    return value is not None and bool(str(value).strip())


# ---- plain text -----------------------------------------------------------------------------------------------------
def encode_text_dataset(
    dataset, tokenizer, *, text_column: str, max_seq_len: int, packing: bool, num_proc: int | None = None
):
    """Causal-LM rows from the `text_column` of every row; empty texts are skipped (and counted)."""
    gmask, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    threads = -1 if not num_proc else 1  # sentencepiece's own threads, unless datasets runs several workers

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [str(text) for text in batch[text_column] if _is_text(text)]
        samples = [w for ids in tokenizer.encode_text(texts, num_threads=threads) for w in text_windows(
            ids, max_seq_len, gmask, sop, eop)]
        return _rows(samples, max_seq_len, packing)

    params = {"format": "text", "text_column": text_column, "max_seq_len": max_seq_len, "packing": packing}
    dataset = _skip_empty(dataset, text_column, num_proc)
    return _map(dataset, encode, tokenizer, params, num_proc, desc=f"tokenizing `{text_column}`")


def _skip_empty(dataset, column: str, num_proc: int | None):
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(lambda row: _is_text(row[column]))
    before = len(dataset)
    kept = dataset.filter(
        lambda batch: [_is_text(t) for t in batch[column]], batched=True, num_proc=num_proc,
        desc="skipping empty texts",
    )
    if len(kept) < before:
        logger.warning("skipped %d of %d rows whose `%s` is empty", before - len(kept), before, column)
    return kept


# ---- alpaca ---------------------------------------------------------------------------------------------------------
def alpaca_query(example: dict) -> str:
    instruction = str(example.get("instruction") or "").strip()
    extra = str(example.get("input") or "").strip()
    return f"{instruction}\n{extra}" if instruction and extra else instruction or extra


def alpaca_sample(example: dict, tokenizer, max_seq_len: int) -> dict | None:
    """`prompt [gMASK] <sop> output <eop>` with the official chat prompt; None for a row with no output.

    Too long for `max_seq_len`: the oldest history rounds go first, then the start of the prompt, and last the end
    of the output (which then has no `<eop>`). The sample says whether it was cut in `truncated`.
    """
    output = example.get("output")
    if not _is_text(output):
        return None
    gmask, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    query = alpaca_query(example)
    history = [(str(q), str(r)) for q, r in (example.get("history") or [])]
    response = tokenizer.encode_text([str(output)])[0]
    room = max_seq_len - 3  # [gMASK] <sop> <eop>
    prompt = tokenizer.encode_text([build_prompt(query, history)])[0]
    rounds = len(history)
    while history and len(prompt) + len(response) > room:
        history = history[1:]
        prompt = tokenizer.encode_text([build_prompt(query, history)])[0]
    truncated = len(history) < rounds or len(prompt) + len(response) > room
    if len(prompt) + len(response) > room:  # keep the end of the prompt (the question), at least half the row when the output is long
        keep = min(len(prompt), max(room - len(response), room // 2))
        prompt = prompt[len(prompt) - keep :]
    if len(prompt) + len(response) <= room:
        return {**prompt_response_sample(prompt, response, gmask, sop, eop), "truncated": truncated}
    response = response[: room + 1 - len(prompt)]  # the slot of <eop> goes to the output it replaces
    context = [*prompt, gmask, sop]
    return {"input_ids": context + response, "labels": [IGNORE_INDEX] * len(context) + response, "truncated": True}


def encode_alpaca_dataset(dataset, tokenizer, *, max_seq_len: int, packing: bool, num_proc: int | None = None):
    """Instruction-tuning rows from alpaca records (`instruction`, optional `input`, `output`, optional `history`)."""
    columns = dataset.column_names or _peek_columns(dataset)
    missing = [name for name in ("instruction", "output") if name not in columns]
    if columns and missing:
        raise DataError(
            f"alpaca data needs the columns instruction and output (input and history are optional); "
            f"missing {', '.join(missing)}, found {', '.join(columns)}. For one text column use `data.format=text`"
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
        samples = [alpaca_sample(example, tokenizer, max_seq_len) for example in examples]
        usable = [s for s in samples if s is not None]
        if len(usable) < len(samples):
            logger.warning("skipped %d alpaca rows with an empty output", len(samples) - len(usable))
        truncated = sum(s.pop("truncated") for s in usable)
        if truncated:
            logger.warning("%d alpaca samples were longer than max_seq_len=%d and were shortened", truncated, max_seq_len)
        return _rows(usable, max_seq_len, packing)

    params = {"format": "alpaca", "max_seq_len": max_seq_len, "packing": packing}
    return _map(dataset, encode, tokenizer, params, num_proc, desc="tokenizing alpaca records")


# ---- datasets.map with a stable cache key ---------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the sentencepiece model file and the tokens added on top of it."""
    digest = hashlib.sha256(Path(tokenizer.vocab_file).read_bytes())
    digest.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "num_image_tokens", 0)).encode())
    return digest.hexdigest()


def _peek_columns(dataset) -> list[str]:
    """A stream read from CSV or JSON knows its columns only once it has read a row."""
    first = next(iter(dataset.take(1)), None)
    return list(first) if first is not None else []


def _map(dataset, function: Callable, tokenizer, params: dict, num_proc: int | None, desc: str):
    remove = dataset.column_names or _peek_columns(dataset)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(function, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=remove)
    key = json.dumps({**params, "layout": LAYOUT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    fingerprint = hashlib.sha256(f"{dataset._fingerprint}:{key}".encode()).hexdigest()[:32]
    return dataset.map(
        function,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        remove_columns=remove,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc=desc,
    )
