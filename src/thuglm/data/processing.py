"""From rows of text or alpaca records to ChatGLM training rows: `input_ids`, `labels`, `attention_mask`.

* Text: `[gMASK] <sop> text <eop>`, loss on every text token and `<eop>`. A text longer than `max_seq_len` becomes
  several windows `[gMASK] <sop> chunk`; nothing is cut away.
* Alpaca: the official chat prompt, then `[gMASK] <sop> output <eop>`; labels -100 over the prompt.
* Packing: whole samples fill rows, each into the row it fits best; `attention_mask` numbers them 1, 2, 3, ... so
  the model gives each its own positions and a block-diagonal mask, exactly as if it were alone.

`datasets.map` does the work in two batched steps: tokenize (one row in, one row out, so skipped and shortened rows
can be counted exactly), then lay out and pack. The cache key of each step is computed here from the input's
fingerprint, the tokenizer's files and the parameters: `datasets` would otherwise hash the tokenizer object, which
is not stable between processes, and tokenize everything again on every run.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import datasets
import pyarrow.compute as pc

from ..models.prompt import build_prompt
from .loading import DataError, guess_text_column
from .samples import IGNORE_INDEX, causal_lm_sample

logger = logging.getLogger("thuglm.data")

LAYOUT_VERSION = 3  # bump when the layout of rows changes, so old cache files are not reused (3: best-fit packing)
MAP_BATCH_SIZE = 1000
COLUMNS = ["input_ids", "labels", "attention_mask"]
TOKEN_IDS = datasets.Sequence(datasets.Value("int32"))  # half the cache of the int64 that Python ints would give
ROW_FEATURES = datasets.Features({name: TOKEN_IDS for name in COLUMNS})
TOKEN_FEATURES = datasets.Features({"text_ids": TOKEN_IDS})
ALPACA_FEATURES = datasets.Features({"input_ids": TOKEN_IDS, "labels": TOKEN_IDS, "truncated": datasets.Value("bool")})


# ---- layouts of single samples ---------------------------------------------------------------------------------------
def text_windows(text_ids: Sequence[int], max_seq_len: int, gmask_id: int, sop_id: int, eop_id: int) -> list[dict]:
    """`[gMASK] <sop> chunk` windows of at most `max_seq_len` ids; the last one ends with `<eop>`.

    Concatenating the chunks gives back `text_ids`: no id is lost or repeated. The last window always holds at
    least one text id, so `<eop>` is never predicted from an empty window. An empty text gives no window.
    """
    _check_max_seq_len(max_seq_len)
    ids = list(text_ids)
    last_room = max_seq_len - 3  # [gMASK] <sop> ... <eop>
    windows, start = [], 0
    while len(ids) - start > last_room:
        stop = start + min(max_seq_len - 2, len(ids) - start - 1)
        chunk = ids[start:stop]
        windows.append({"input_ids": [gmask_id, sop_id, *chunk], "labels": [IGNORE_INDEX, IGNORE_INDEX, *chunk]})
        start = stop
    if start < len(ids):
        windows.append(causal_lm_sample(ids[start:], gmask_id, sop_id, eop_id))
    return windows


def _check_max_seq_len(max_seq_len: int) -> None:
    if max_seq_len < 4:
        raise ValueError(f"max_seq_len must be at least 4 ([gMASK] <sop> text <eop>), got {max_seq_len}")


def alpaca_query(example: dict) -> str:
    """The question of an alpaca record: `instruction`, then `input` on a new line when there is one."""
    instruction, extra = text_or_empty(example.get("instruction")).strip(), text_or_empty(example.get("input")).strip()
    return f"{instruction}\n{extra}" if instruction and extra else instruction or extra


def alpaca_sample(example: dict, tokenizer, max_seq_len: int) -> dict | None:
    """`prompt [gMASK] <sop> output <eop>` with the official chat prompt; None for a record with no output.

    Too long for `max_seq_len`: the oldest history rounds go first, then the start of the prompt (the prompt keeps
    at least half the row), and last the end of the output, which then has no `<eop>`.
    """
    fitted = _alpaca_samples([example], tokenizer, max_seq_len)[0]
    return None if fitted is None else fitted[0]


def _alpaca_samples(examples: list[dict], tokenizer, max_seq_len: int, num_threads: int = -1) -> list:
    """(sample, truncated) for every record, None for those with no output; one batched encode for all of them."""
    _check_max_seq_len(max_seq_len)
    parts = [_alpaca_parts(example) for example in examples]
    usable = [part for part in parts if part is not None]
    prompts = tokenizer.encode_text([build_prompt(query, history) for query, history, _ in usable], num_threads)
    outputs = tokenizer.encode_text([output for _, _, output in usable], num_threads)
    layout = layout_ids(tokenizer)
    fitted = iter(
        fit_dialogue_sample(query, history, prompt, response, tokenizer, max_seq_len, layout)
        for (query, history, _), prompt, response in zip(usable, prompts, outputs)
    )
    return [None if part is None else next(fitted) for part in parts]


def _alpaca_parts(example: dict) -> tuple[str, list[tuple[str, str]], str] | None:
    output = text_or_empty(example.get("output"))
    if not output.strip() or any(_is_structure(example.get(name)) for name in ("instruction", "input")):
        return None  # no answer to learn, or a question that is not text (skipped and counted)
    return alpaca_query(example), _history(example), output


def _history(example: dict) -> list[tuple[str, str]]:
    value = example.get("history")
    if value is None:
        return []
    if isinstance(value, (list, tuple)) and all(isinstance(turn, (list, tuple)) and len(turn) == 2 for turn in value):
        return [(text_or_empty(query), text_or_empty(response)) for query, response in value]
    raise DataError(
        f"alpaca record {alpaca_query(example)[:40]!r}: `history` must be a list of [query, response] pairs, got "
        f"{str(value)[:60]!r}. Write such records as JSON or JSONL (a CSV cell cannot hold a list)."
    )


def fit_dialogue_sample(query, history, prompt, response, tokenizer, max_seq_len, layout, system=None,
                        train_on_prompt=False) -> tuple[dict, bool]:
    """(the sample of one answer with the `[Round i]` prompt of its turns before it, whether anything was cut to fit
    `max_seq_len`): oldest history rounds first, then the start of the prompt, then the end of the answer."""
    prompt, response, eop, truncated = _fit_parts(query, history, prompt, response, tokenizer, max_seq_len, system)
    return dialogue_sample(prompt, response, layout, eop=eop, train_on_prompt=train_on_prompt), truncated


def _fit_parts(query, history, prompt, response, tokenizer, max_seq_len, system=None):
    """(prompt ids, response ids, whether `<eop>` fits, whether anything was cut) within `max_seq_len`."""
    room = max_seq_len - 3  # [gMASK] <sop> <eop>
    if len(prompt) + len(response) <= room:
        return prompt, response, True, False
    if history:  # drop the oldest rounds until the prompt fits; without any left it is the bare query
        shorter = [history[start:] for start in range(1, len(history) + 1)]
        for prompt in tokenizer.encode_text([build_prompt(query, rounds, system) for rounds in shorter]):  # noqa: PLR1704
            if len(prompt) + len(response) <= room:
                return prompt, response, True, True
    keep = min(len(prompt), max(room - len(response), room // 2))
    prompt = prompt[len(prompt) - keep :]  # the end of the prompt is the question being answered
    if len(prompt) + len(response) <= room:
        return prompt, response, True, True
    response = response[: max_seq_len - len(prompt) - 2]  # the slot of <eop> goes to the output it replaces
    return prompt, response, False, True


def dialogue_sample(prompt, response, layout, *, eop: bool = True, train_on_prompt: bool = False) -> dict:
    """`prompt [gMASK] <sop> response <eop>`, labels on the response and `<eop>` only.

    `train_on_prompt`: `[gMASK] <sop> prompt response <eop>` with labels on all of it. The prompt moves after
    `<sop>` because GLM attends both ways before it: a label there could be read off the input (see samples.py).
    """
    gmask, sop, eop_id = layout
    target = [*response, eop_id] if eop else list(response)
    if train_on_prompt:
        ids = [*prompt, *target]
        return {"input_ids": [gmask, sop, *ids], "labels": [IGNORE_INDEX, IGNORE_INDEX, *ids]}
    context = [*prompt, gmask, sop]
    return {"input_ids": context + target, "labels": [IGNORE_INDEX] * len(context) + target}


def layout_ids(tokenizer) -> tuple[int, int, int]:
    """The ids of `[gMASK]`, `<sop>` (the tokenizer's bos) and `<eop>` (its eos)."""
    return tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id


def text_or_empty(value) -> str:
    """A table cell as text: CSV and parquet give numbers for numeric columns and None for empty cells.

    A list or an object (JSON) is not text: it counts as no text here, and `check_text_cells` has already skipped
    (and counted) or refused it.
    """
    if value is None or _is_structure(value):
        return ""
    return str(value)


def _is_structure(value) -> bool:
    return isinstance(value, (list, tuple, dict))


def check_text_cells(dataset, columns: Sequence[str], *, bad_rows: str, source: str) -> None:
    """Cells of `columns` that hold a list or an object instead of text: refuse them, or count the skipped ones.

    Arrow gives each column one type, so only a JSON column whose type varies from row to row (`Json` in datasets)
    or one of lists / objects can hold such cells; string and number columns are checked without reading them.
    """
    if isinstance(dataset, datasets.IterableDataset):
        return  # a stream is checked as it is read: such cells count as empty rows there
    for column in columns:
        if column not in dataset.column_names or _holds_only_scalars(dataset.features[column]):
            continue
        bad = [index for index, value in enumerate(dataset[column]) if _is_structure(value)]
        if not bad:
            continue
        example = str(dataset[bad[0]][column])[:60]
        if bad_rows == "error":
            raise DataError(
                f"{source}: row {bad[0] + 1}: `{column}` holds {example!r}, not text ({len(bad)} such row(s)). Make "
                "it a string, or set data.on_bad_row=skip to skip such rows (they are counted in the log)."
            )
        rows = ", ".join(str(index + 1) for index in bad[:10]) + (", ..." if len(bad) > 10 else "")
        logger.warning("%s: skipped %d row(s) whose `%s` is a list or an object, not text (rows %s)",
                       source, len(bad), column, rows)


def _holds_only_scalars(feature) -> bool:
    return isinstance(feature, datasets.Value)


# ---- rows ------------------------------------------------------------------------------------------------------------
def pack_samples(samples: Iterable[dict], max_seq_len: int) -> list[dict]:
    """Fill rows of at most `max_seq_len` tokens with whole samples; `attention_mask` numbers them.

    Best fit, longest first: each sample, longest first, goes into the row whose free space it fills most closely,
    else a new row. Filling rows in order leaves on average half a sample empty at the end of each (~7 % of a row of
    512 on the bundled corpus); this leaves next to none, so more of each step's tokens are trained and fewer rows
    make an epoch. The rows then keep the order of the samples: a row comes where its first sample came, and holds
    its samples in their order (a stream is not shuffled again, so rows of long samples must not come first).

    Every sample starts with labels -100 (`[gMASK]` or its prompt), so the shifted loss never predicts one sample
    from the last token of the one before it.
    """
    samples = list(samples)
    lengths = [len(sample["input_ids"]) for sample in samples]
    for length in lengths:
        if length > max_seq_len:
            raise ValueError(f"a sample of {length} tokens cannot be packed into rows of max_seq_len={max_seq_len}")
    members: list[list[int]] = []  # the samples of each row
    free: list[tuple[int, int]] = []  # (free tokens, row) of every row that is not full, sorted
    for index in sorted(range(len(samples)), key=lambda i: -lengths[i]):  # stable: equal lengths in order
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            members.append([])
            room, row = max_seq_len, len(members) - 1
        else:
            room, row = free.pop(slot)
        members[row].append(index)
        if room > lengths[index]:
            bisect.insort(free, (room - lengths[index], row))
    rows = []
    for indices in sorted((sorted(indices) for indices in members), key=lambda indices: indices[0]):
        row = {"input_ids": [], "labels": [], "attention_mask": []}
        for number, index in enumerate(indices, start=1):
            row["input_ids"].extend(samples[index]["input_ids"])
            row["labels"].extend(samples[index]["labels"])
            row["attention_mask"].extend([number] * lengths[index])
        rows.append(row)
    return rows


def _rows(samples: list[dict], max_seq_len: int, packing: bool) -> dict[str, list]:
    if packing:
        samples = pack_samples(samples, max_seq_len)
    else:
        samples = [{**sample, "attention_mask": [1] * len(sample["input_ids"])} for sample in samples]
    return {name: [sample[name] for sample in samples] for name in COLUMNS}


# ---- batched map functions (module level, so that `num_proc` workers can load them) ----------------------------------
def _tokenize_texts(batch, *, tokenizer, text_column: str, num_threads: int, per_batch_log: bool) -> dict:
    texts = [text_or_empty(text) for text in batch[text_column]]
    present = [index for index, text in enumerate(texts) if text.strip()]
    text_ids: list[list[int]] = [[] for _ in texts]
    for index, ids in zip(present, tokenizer.encode_text([texts[i] for i in present], num_threads)):
        text_ids[index] = ids
    if per_batch_log:
        _warn_empty(len(texts) - len(present), len(texts), f"`{text_column}` is empty", " (in one streamed batch)")
    return {"text_ids": text_ids}


def _text_rows(batch, *, layout: tuple[int, int, int], max_seq_len: int, packing: bool) -> dict:
    gmask, sop, eop = layout
    samples = [window for ids in batch["text_ids"] for window in text_windows(ids, max_seq_len, gmask, sop, eop)]
    return _rows(samples, max_seq_len, packing)


def _tokenize_alpaca(batch, *, tokenizer, max_seq_len: int, num_threads: int, per_batch_log: bool) -> dict:
    examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
    fitted = _alpaca_samples(examples, tokenizer, max_seq_len, num_threads)
    samples = [({"input_ids": [], "labels": []}, False) if item is None else item for item in fitted]
    if per_batch_log:
        skipped, truncated = fitted.count(None), sum(cut for _, cut in samples)
        _warn_alpaca(skipped, truncated, len(examples), max_seq_len, " (in one streamed batch)")
    return {
        "input_ids": [sample["input_ids"] for sample, _ in samples],
        "labels": [sample["labels"] for sample, _ in samples],
        "truncated": [cut for _, cut in samples],
    }


def _alpaca_rows(batch, *, max_seq_len: int, packing: bool) -> dict:
    samples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"]) if ids]
    return _rows(samples, max_seq_len, packing)


def _warn_empty(skipped: int, total: int, what: str, where: str = "") -> None:
    if skipped:
        logger.warning("skipped %d of %d rows whose %s%s", skipped, total, what, where)


def _warn_alpaca(skipped: int, truncated: int, total: int, max_seq_len: int, where: str = "") -> None:
    _warn_empty(skipped, total, "`output` is empty", where)
    if truncated:
        logger.warning(
            "shortened %d of %d alpaca records longer than max_seq_len=%d%s: oldest history rounds first, then the "
            "start of the prompt, then the end of the output",
            truncated, total, max_seq_len, where,
        )


# ---- the two dataset-level entry points ------------------------------------------------------------------------------
def encode_text_dataset(
    dataset, tokenizer, *, text_column: str, max_seq_len: int, packing: bool, num_proc: int | None = None,
    bad_rows: str = "skip", source: str = "the data",
):
    """Causal-LM rows from the `text_column` of every row; empty texts are skipped (and counted in a warning).

    A cell that holds a list or an object is skipped and counted, or refused with `bad_rows="error"`; `source`
    names the data (its files) in those messages.
    """
    _check_max_seq_len(max_seq_len)
    guess_text_column(dataset_columns(dataset), text_column, source=source)
    check_text_cells(dataset, [text_column], bad_rows=bad_rows, source=source)
    streaming = isinstance(dataset, datasets.IterableDataset)
    tokens = cached_map(
        dataset, _tokenize_texts, TOKEN_FEATURES, tokenizer, num_proc, desc=f"Tokenizing `{text_column}`",
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "num_threads": sentencepiece_threads(num_proc),
                   "per_batch_log": streaming},
        key={"step": "tokenize text", "text_column": text_column},
    )
    if not streaming:
        _warn_empty(_count_empty(tokens, "text_ids"), len(tokens), f"`{text_column}` is empty or not text")
    return cached_map(
        tokens, _text_rows, ROW_FEATURES, tokenizer, num_proc,
        desc=f"{'Packing' if packing else 'Laying out'} texts in rows of {max_seq_len} tokens",
        fn_kwargs={"layout": layout_ids(tokenizer), "max_seq_len": max_seq_len, "packing": packing},
        key={"step": "text rows", "max_seq_len": max_seq_len, "packing": packing},
    )


def encode_alpaca_dataset(
    dataset, tokenizer, *, max_seq_len: int, packing: bool, num_proc: int | None = None, bad_rows: str = "skip",
    source: str = "the data",
):
    """Instruction-tuning rows from alpaca records (`instruction`, optional `input`, `output`, optional `history`)."""
    _check_max_seq_len(max_seq_len)
    columns = dataset_columns(dataset)
    missing = [name for name in ("instruction", "output") if name not in columns]
    if missing:
        raise DataError(
            f"{source}: alpaca data needs the columns instruction and output (input and history are optional); "
            f"missing {', '.join(missing)}, found {', '.join(columns) or 'none'}. "
            "For one column of text use `data.format=text`."
        )
    check_text_cells(dataset, ["instruction", "input", "output"], bad_rows=bad_rows, source=source)
    streaming = isinstance(dataset, datasets.IterableDataset)
    samples = cached_map(
        dataset, _tokenize_alpaca, ALPACA_FEATURES, tokenizer, num_proc, desc="Tokenizing alpaca records",
        fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len, "num_threads": sentencepiece_threads(num_proc),
                   "per_batch_log": streaming},
        key={"step": "tokenize alpaca", "max_seq_len": max_seq_len},
    )
    if not streaming:
        truncated = pc.sum(samples.data.column("truncated")).as_py() or 0
        _warn_alpaca(_count_empty(samples, "input_ids"), truncated, len(samples), max_seq_len)
    return cached_map(
        samples, _alpaca_rows, ROW_FEATURES, tokenizer, num_proc,
        desc=f"{'Packing' if packing else 'Laying out'} alpaca samples in rows of {max_seq_len} tokens",
        fn_kwargs={"max_seq_len": max_seq_len, "packing": packing},
        key={"step": "alpaca rows", "max_seq_len": max_seq_len, "packing": packing},
    )


# ---- canonical rows (thuglm.data.formats) to samples, samples to rows ----------------------------------------------
SAMPLE_FEATURES = ALPACA_FEATURES


def dialogue_answers(turns: Sequence[str], mask_history: bool) -> list[int]:
    """The rounds whose answer is trained: every one, or only the last with `mask_history`."""
    rounds = len(turns) // 2
    return [rounds - 1] if mask_history and rounds else list(range(rounds))


def _tokenize_dialogues(batch, *, tokenizer, max_seq_len: int, num_threads: int, mask_history: bool,
                        train_on_prompt: bool) -> dict:
    """One sample per trained answer of each dialogue: the `[Round i]` prompt of the turns before it, the answer."""
    parts = []
    for system, turns, problem in zip(batch["system"], batch["turns"], batch["problem"]):
        if problem:
            continue  # counted, named and reported when the rows were read
        pairs = list(zip(turns[0::2], turns[1::2]))
        for answer in dialogue_answers(turns, mask_history):
            query, response = pairs[answer]
            parts.append((query, pairs[:answer], system or None, response))
    prompts = tokenizer.encode_text([build_prompt(q, h, system) for q, h, system, _ in parts], num_threads)
    responses = tokenizer.encode_text([response for *_, response in parts], num_threads)
    layout = layout_ids(tokenizer)
    out = {"input_ids": [], "labels": [], "truncated": []}
    for (query, history, system, _), prompt, response in zip(parts, prompts, responses):
        sample, truncated = fit_dialogue_sample(query, history, prompt, response, tokenizer, max_seq_len, layout,
                                                system, train_on_prompt)
        out["input_ids"].append(sample["input_ids"])
        out["labels"].append(sample["labels"])
        out["truncated"].append(truncated)
    return out


def _tokenize_canonical_texts(batch, *, tokenizer, max_seq_len: int, num_threads: int) -> dict:
    """`[gMASK] <sop> chunk` windows of every text (several for a text longer than max_seq_len, nothing cut)."""
    texts = [text for text, problem in zip(batch["text"], batch["problem"]) if not problem]
    gmask, sop, eop = layout_ids(tokenizer)
    windows = [window for ids in tokenizer.encode_text(texts, num_threads)
               for window in text_windows(ids, max_seq_len, gmask, sop, eop)]
    return {"input_ids": [w["input_ids"] for w in windows], "labels": [w["labels"] for w in windows],
            "truncated": [False] * len(windows)}


def encode_samples(canonical, tokenizer, *, kind: str, max_seq_len: int, num_proc: int | None = None,
                   mask_history: bool = False, train_on_prompt: bool = False, source: str = "the data"):
    """Samples (`input_ids`, `labels`, `truncated`) from canonical text or dialogue rows; rows with a problem give none.

    A dialogue gives one sample per trained answer (`dialogue_answers`); a text one window per `max_seq_len`.
    """
    _check_max_seq_len(max_seq_len)
    threads = sentencepiece_threads(num_proc)
    if kind == "text":
        function, kwargs = _tokenize_canonical_texts, {}
        key = {"step": "canonical text samples", "max_seq_len": max_seq_len}
    else:
        function = _tokenize_dialogues
        kwargs = {"mask_history": mask_history, "train_on_prompt": train_on_prompt}
        key = {"step": "dialogue samples", "max_seq_len": max_seq_len, **kwargs}
    samples = cached_map(
        canonical, function, SAMPLE_FEATURES, tokenizer, num_proc, desc=f"Tokenizing {source}"[:80],
        fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len, "num_threads": threads, **kwargs}, key=key,
    )
    if not isinstance(samples, datasets.IterableDataset):
        truncated = pc.sum(samples.data.column("truncated")).as_py() or 0
        if truncated:
            logger.warning(
                "%s: shortened %d of %d samples longer than max_seq_len=%d: oldest history rounds first, then the "
                "start of the prompt, then the end of the answer", source, truncated, len(samples), max_seq_len,
            )
    return samples


def encode_rows(samples, tokenizer, *, max_seq_len: int, packing: bool, num_proc: int | None = None):
    """Training rows from samples: packed several a row, or one a row."""
    return cached_map(
        samples, _alpaca_rows, ROW_FEATURES, tokenizer, num_proc,
        desc=f"{'Packing' if packing else 'Laying out'} samples in rows of {max_seq_len} tokens",
        fn_kwargs={"max_seq_len": max_seq_len, "packing": packing},
        key={"step": "sample rows", "max_seq_len": max_seq_len, "packing": packing},
    )


# ---- datasets.map with a stable cache key ----------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the sentencepiece model file, the tokens added on top of it and the
    settings that change the text before sentencepiece sees it."""
    digest = hashlib.sha256(Path(tokenizer.vocab_file).read_bytes())
    settings = {
        "added": sorted(tokenizer.get_added_vocab().items()),
        "layout": layout_ids(tokenizer),
        **{name: getattr(tokenizer, name, None) for name in ("num_image_tokens", "do_lower_case", "remove_space")},
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def cached_map(dataset, function: Callable, features, tokenizer, num_proc, *, desc: str, fn_kwargs: dict, key: dict):
    """A batched `map` that replaces every column; cached under a key that a fresh process computes the same."""
    remove = dataset_columns(dataset)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(
            function, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=remove, features=features,
            fn_kwargs=fn_kwargs,
        )
    full_key = {**key, "input": dataset._fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
                "layout_version": LAYOUT_VERSION}
    fingerprint = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:32]
    return dataset.map(
        function,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        remove_columns=remove,
        features=features,
        fn_kwargs=fn_kwargs,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc=desc,
    )


def sentencepiece_threads(num_proc: int | None) -> int:
    """sentencepiece's threads: every core in one process, one per worker when datasets runs several."""
    return 1 if num_proc and num_proc > 1 else -1


def dataset_columns(dataset) -> list[str]:
    """A stream read from CSV or JSON may know its columns only once it has read a row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    return list(first) if first is not None else []


def _count_empty(dataset: datasets.Dataset, column: str) -> int:
    """Rows whose list in `column` is empty, counted on the Arrow table (a map's output has no indices mapping)."""
    return pc.sum(pc.equal(pc.list_value_length(dataset.data.column(column)), 0)).as_py() or 0
