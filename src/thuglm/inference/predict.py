"""`thuglm predict MODEL FILE`: labels or BIO tags for every row of a data file, into a JSONL file.

MODEL is a classifier `thuglm train` wrote with `task: seq_cls` or `task: token_cls`: a full model folder, or a LoRA
output folder (adapter + head in adapter_model.safetensors, the labels in its config.json, the base named in
adapter_config.json). The task and the label names come from that config; nothing else is needed.

Rows are laid out exactly as in training (`text [gMASK] <sop>`; tokens joined and aligned with their pieces as in
`thuglm.data.classification`), batched by length and padded on the left. Each output line is the input row with
the prediction added:

* seq_cls: `predicted_label` and its `probability` (softmax); multi-label: `predicted_labels` (sigmoid > 0.5) and
  `probabilities` of every label; regression: `predicted_value`.
* token_cls: `predicted_tags` (one per token) and `entities` ({type, start, end, text}, end exclusive). A row gives
  its tokens in a list column (default `tokens`), or a text column whose characters are the tokens (added to the
  output as `tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from ..data import DataError, load_raw_dataset
from ..data.classification import (
    MULTI_LABEL,
    REGRESSION,
    TOKENS_COLUMNS,
    align_tokens,
    entities,
    sequence_ids,
    token_tags,
)
from ..data.loading import guess_text_column
from ..data.processing import layout_ids
from ..data.samples import DEFAULT_MAX_SEQ_LEN
from ..models.folders import ModelLoadError, check_model_folder, tokenizer_folder
from .generate import write_jsonl
from .loading import (
    CLASSIFIER_TASKS,
    adapter_base_folder,
    default_device,
    is_adapter_folder,
    resolve_dtype,
    row_length,
)
from .quantized import quantize_kwargs

AUTO_CLASSES = {"seq_cls": AutoModelForSequenceClassification, "token_cls": AutoModelForTokenClassification}


def load_classifier_for_inference(model_path: str | Path, dtype: str | torch.dtype = "auto", device=None,
                                  quantize: int | None = None):
    """(tokenizer, model in eval mode, task) from a full classifier folder or a LoRA classifier output folder."""
    model_path = Path(model_path)
    adapter = None
    if is_adapter_folder(model_path):
        # No way to name another base here: a wrong recorded base is corrected in the adapter's config.
        adapter, base = model_path, adapter_base_folder(model_path, how_to_name_base=None)
        if not (adapter / "config.json").is_file():
            raise ModelLoadError(
                f"{adapter} is a LoRA adapter without a config.json holding its labels: it is not the output of "
                "`thuglm train` with `task: seq_cls` or `token_cls` (for chat, use `thuglm chat`)"
            )
    else:
        check_model_folder(model_path)
        base = model_path
    config = AutoConfig.from_pretrained(adapter or base)
    task = CLASSIFIER_TASKS.get((config.architectures or [None])[0])
    if task is None:
        raise ModelLoadError(
            f"{adapter or base} holds a {', '.join(config.architectures or ['model without architectures'])}, not a "
            "classifier: `thuglm predict` takes the output of `thuglm train` with `task: seq_cls` or `task: token_cls`"
        )
    check_model_folder(base)
    load = partial(
        AUTO_CLASSES[task].from_pretrained,
        base, config=config, dtype=resolve_dtype(dtype), device_map=str(device or default_device()),
        **quantize_kwargs(quantize, resolve_dtype(dtype), skip_modules=["lm_head", "score"]),  # the head stays whole
    )
    if adapter is None:
        model = load()
    else:
        from peft import PeftModel

        # The base of a LoRA classifier is the language model, without the head: transformers would report the head
        # as MISSING and "newly initialized", although the adapter brings the trained one. Its report is held back
        # here, and what the adapter does not bring is refused below instead.
        with _transformers_warnings_held_back():
            model, loading_info = load(output_loading_info=True)
        model = PeftModel.from_pretrained(model, adapter)
        _check_adapter_brings_the_missing(loading_info["missing_keys"], model, base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(adapter, base))
    return tokenizer, model.eval(), task


@contextmanager
def _transformers_warnings_held_back():
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _check_adapter_brings_the_missing(missing_keys, model, base: Path, adapter: Path) -> None:
    """The weights the base folder lacks must all come from the adapter's `modules_to_save` (the trained head)."""
    saved_modules = model.peft_config[model.active_adapter].modules_to_save or []
    missing_modules = {key.rpartition(".")[0] for key in missing_keys}
    untrained = sorted(
        module for module in missing_modules
        if not any(module == saved or module.endswith("." + saved) for saved in saved_modules)
    )
    if untrained:
        raise ModelLoadError(
            f"{base} lacks the weights of {', '.join(untrained[:5])}, and the adapter in {adapter} does not bring them "
            "either: they would predict with random values. Check that the adapter's base folder "
            "(base_model_name_or_path in adapter_config.json) is the model it was trained on."
        )


@torch.no_grad()
def _batched_logits(model, tokenizer, rows: Sequence[list[int]], batch_size: int) -> list[torch.Tensor]:
    """Logits of every row of ids (batched by length, left-padded), in float32 on the CPU, in the input order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    results: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [rows[i] for i in indices]}, return_tensors="pt").to(model.device)
        logits = model(**batch).logits.float().cpu()
        for row, index in enumerate(indices):
            # Token logits: the row's own positions, without the left padding.
            results[index] = logits[row] if logits.dim() == 2 else logits[row, logits.shape[1] - len(rows[index]) :]
    return [results[i] for i in range(len(rows))]


def predict_sequences(model, tokenizer, texts: Sequence[str], batch_size: int = 16,
                      max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> list:
    """One prediction dict per text (see the module docstring for its keys)."""
    gmask, sop, _ = layout_ids(tokenizer)
    rows = [sequence_ids(ids, max_seq_len, gmask, sop) for ids in tokenizer.encode_text(list(texts))]
    config = model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    predictions = []
    for logits in _batched_logits(model, tokenizer, rows, batch_size):
        if config.problem_type == REGRESSION:
            predictions.append({"predicted_value": float(logits[0])})
        elif config.problem_type == MULTI_LABEL:
            probabilities = torch.sigmoid(logits).tolist()
            predictions.append({
                "predicted_labels": [name for name, p in zip(names, probabilities) if p > 0.5],
                "probabilities": dict(zip(names, probabilities)),
            })
        else:
            probabilities = torch.softmax(logits, dim=-1)
            best = int(probabilities.argmax())
            predictions.append({"predicted_label": names[best], "probability": float(probabilities[best])})
    return predictions


def predict_tags(model, tokenizer, token_rows: Sequence[Sequence[str]], batch_size: int = 16,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> list[list[str]]:
    """One BIO tag per token of every row (tokens cut off by `max_seq_len` get `O`)."""
    alignments = [align_tokens(tokenizer, tokens, max_seq_len) for tokens in token_rows]
    names = model.config.id2label
    tags = []
    for alignment, logits in zip(alignments, _batched_logits(model, tokenizer, [a.input_ids for a in alignments],
                                                             batch_size)):
        pieces = [names[int(i)] for i in logits.argmax(-1)[: len(alignment.piece_token)]]
        tags.append(token_tags(alignment, [tag if token is not None else None
                                           for tag, token in zip(pieces, alignment.piece_token)]))
    return tags


def entity_list(tokens: Sequence[str], tags: Sequence[str]) -> list[dict]:
    joined = "" if all(len(token) == 1 for token in tokens) else " "
    return [
        {"type": kind, "start": start, "end": end, "text": joined.join(tokens[start:end])}
        for kind, start, end in sorted(entities(tags), key=lambda entity: entity[1])
    ]


def predict_file(
    model_path: str | Path,
    data_file: str | Path,
    output: str | Path | None = None,
    batch_size: int = 16,
    max_seq_len: int | None = None,
    text_column: str | None = None,
    tokens_column: str | None = None,
    dtype: str = "auto",
    log: Callable[[str], None] = print,
    quantize: int | None = None,
) -> Path:
    """Predict every row of `data_file` and write them to `output` (default: next to it, `NAME.predictions.jsonl`)."""
    data_file = Path(data_file)
    rows = load_raw_dataset(data_file).to_list()
    if not rows:
        raise DataError(f"{data_file} has no rows to predict")
    columns = list(rows[0])
    tokenizer, model, task = load_classifier_for_inference(model_path, dtype=dtype, quantize=quantize)
    max_seq_len = row_length(max_seq_len, model)  # None: the default, within the model's context
    if task == "seq_cls":
        column = guess_text_column(columns, text_column, source=str(data_file))
        predictions = predict_sequences(
            model, tokenizer, [str(row[column] or "") for row in rows], batch_size, max_seq_len
        )
        results = [{**row, **prediction} for row, prediction in zip(rows, predictions)]
    else:
        if tokens_column is not None and tokens_column not in columns:
            raise DataError(f"{data_file}: no column {tokens_column!r} (columns: {', '.join(columns)})")
        column = tokens_column or next((name for name in TOKENS_COLUMNS if name in columns), None)
        if column is not None:
            token_rows = [[str(token) for token in row[column] or []] for row in rows]
        else:  # a text column: its characters are the tokens, as for Chinese
            text = guess_text_column(columns, text_column, source=str(data_file))
            token_rows = [list(str(row[text] or "")) for row in rows]
        tags = predict_tags(model, tokenizer, token_rows, batch_size, max_seq_len)
        results = [
            {**row, **({} if column else {"tokens": tokens}), "predicted_tags": row_tags,
             "entities": entity_list(tokens, row_tags)}
            for row, tokens, row_tags in zip(rows, token_rows, tags)
        ]
    output = Path(output) if output else data_file.with_name(data_file.stem + ".predictions.jsonl")
    write_jsonl(results, output)
    log(f"{len(results)} predictions ({task}) written to {output}")
    return output
