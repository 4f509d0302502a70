"""`task: seq_cls` and `task: token_cls`: a head on the base that labels each text, or each token.

The label set is found in the training and evaluation data and sizes the head. Metrics (in the eval logs and
metrics.json):

* seq_cls: `eval_accuracy` and `eval_macro_f1` (single-label: the F1 of each class that occurs in the labels or the
  predictions, averaged; multi-label: exact-match accuracy, F1 per label averaged, a label predicted where its
  logit > 0); regression: `eval_mse`.
* token_cls: entity-level `eval_precision`, `eval_recall`, `eval_f1` (an entity counts when its type, start and end
  all match; an `I-X` that follows no `X` starts an entity, as conlleval reads it), and `eval_accuracy` over tags.
  Computed on the tags of the pieces, which are the tokens' tags except in the rows the encoding warns about.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import TaskType

from ...data import DataError, load_raw_dataset
from ...data.classification import (
    LABEL_COLUMNS,
    REGRESSION,
    SINGLE_LABEL,
    TAGS_COLUMNS,
    TOKENS_COLUMNS,
    LabelSpace,
    check_token_rows,
    encode_sequence_dataset,
    encode_token_dataset,
    entities,
    find_column,
    sequence_label_space,
    tag_label_space,
)
from ...data.loading import guess_text_column
from ...models.losses import IGNORE_INDEX
from ..config import ConfigError, TrainConfig
from . import register_task
from .base import Task, split_off_evaluation

logger = logging.getLogger("thuglm.train")

MODEL_CLASSES = {"seq_cls": "ChatGLMForSequenceClassification", "token_cls": "ChatGLMForTokenClassification"}
# The data keys each classification task reads (and the other refuses).
DATA_COLUMNS = {"seq_cls": ("text_column", "label_column"), "token_cls": ("tokens_column", "tags_column")}
CLASSIFICATION_KEYS = ("eval_accuracy", "eval_macro_f1", "eval_mse", "eval_precision", "eval_recall", "eval_f1")


class Classification(Task):
    """What the two classification tasks share: one sample a row, a label space found in the data, a new `score`
    head trained whole, metrics instead of a perplexity."""

    head = "score"  # ChatGLMForSequenceClassification.score / ChatGLMForTokenClassification.score
    reports_perplexity = False  # the loss is not over tokens
    trains_with_prefix = False
    space: LabelSpace

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        task = config.task
        if config.data.format != "text":
            raise ConfigError(f"`task: {task}` reads texts and labels, not `data.format: {config.data.format}`; "
                              "remove it")
        if config.packing:
            raise ConfigError(f"`task: {task}` classifies one sample a row: set `packing: false` (or leave it out)")
        if config.data.streaming:
            raise ConfigError(f"`task: {task}` finds the label set in the data before training: set "
                              "`data.streaming: false`")
        if config.data.sources:
            raise ConfigError(f"`task: {task}` reads one dataset: use data.files, not data.sources")
        for other, columns in DATA_COLUMNS.items():
            if other != task and any(getattr(config.data, column) for column in columns):
                raise ConfigError(f"`data.{columns[0]}` / `data.{columns[1]}` are for `task: {other}`; {task} reads "
                                  f"`data.{DATA_COLUMNS[task][0]}` and `data.{DATA_COLUMNS[task][1]}`")

    def build_datasets(self, tokenizer):
        """Training and evaluation rows (eval_files, else a validation split), encoded with the label space found in
        both."""
        data = self.config.data

        def load(files):
            return load_raw_dataset(files, cache_dir=data.cache_dir, encoding=data.encoding, bad_rows=data.on_bad_row)

        raw, raw_eval = split_off_evaluation(load(data.files), self.config)
        if data.eval_files:
            raw_eval = load(data.eval_files)
        if len(raw) == 0:
            raise DataError(f"no training rows in {', '.join(data.files)}")
        parts = [(raw, data.files)] + ([(raw_eval, data.eval_files or data.files)] if raw_eval is not None else [])
        encoded = self.encode(parts, tokenizer)
        return encoded[0], (encoded[1] if len(encoded) > 1 else None)

    def encode(self, parts: list[tuple[Dataset, list[str]]], tokenizer) -> list[Dataset]:
        """Each (rows, their files) encoded; sets `self.space` from all of them."""
        raise NotImplementedError

    def load_model(self, model_dir: Path, dtype: torch.dtype, attn_implementation: str, **load_kwargs):
        return load_classifier(model_dir, dtype, attn_implementation, self.name, self.space, **load_kwargs)

    def save_beside_model(self, model, output_dir: Path) -> None:
        save_classifier_config(model, output_dir)  # the labels, next to a LoRA adapter too

    def final_metrics(self, metrics: dict, log_history: list[dict]) -> dict:
        return with_classification_metrics(super().final_metrics(metrics, log_history), log_history)


@register_task
class SequenceClassification(Classification):
    name = "seq_cls"
    peft_task_type = TaskType.SEQ_CLS

    def encode(self, parts, tokenizer):
        data = self.config.data
        columns = []
        for dataset, files in parts:
            source = ", ".join(files)
            text = guess_text_column(dataset.column_names, data.text_column, source=source)
            label = find_column(dataset.column_names, data.label_column, LABEL_COLUMNS, "data.label_column", source)
            columns.append((text, label))
        self.space = sequence_label_space([v for (d, _), (_, label) in zip(parts, columns) for v in d[label]],
                                          source=", ".join(data.files))
        logger.info("%s: %s", self.space.problem_type, ", ".join(self.space.names) or "one value")
        return [
            encode_sequence_dataset(d, tokenizer, text_column=text, label_column=label, space=self.space,
                                    max_seq_len=self.config.max_seq_len, num_proc=data.num_proc)
            for (d, _), (text, label) in zip(parts, columns)
        ]

    def collator(self, tokenizer, model):
        """Pads on the tokenizer's side (left, as ChatGLM is used), which also gives each row its GLM positions."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self):
        problem_type = self.space.problem_type

        def compute(prediction) -> dict[str, float]:  # the Trainer prefixes the keys with `eval_`
            return sequence_metrics(prediction.predictions, prediction.label_ids, problem_type)

        return compute


@register_task
class TokenClassification(Classification):
    name = "token_cls"
    peft_task_type = TaskType.TOKEN_CLS

    def encode(self, parts, tokenizer):
        data = self.config.data
        columns = []
        for dataset, files in parts:
            source = ", ".join(files)
            tokens = find_column(dataset.column_names, data.tokens_column, TOKENS_COLUMNS, "data.tokens_column", source)
            tags = find_column(dataset.column_names, data.tags_column, TAGS_COLUMNS, "data.tags_column", source)
            check_token_rows(dataset, tokens, tags, source)
            columns.append((tokens, tags))
        self.space = tag_label_space([row for (d, _), (_, tags) in zip(parts, columns) for row in d[tags]],
                                     source=", ".join(data.files))
        logger.info("tags: %s", ", ".join(self.space.names))
        return [
            encode_token_dataset(d, tokenizer, tokens_column=tokens, tags_column=tags, space=self.space,
                                 max_seq_len=self.config.max_seq_len, num_proc=data.num_proc, source=", ".join(files))
            for (d, files), (tokens, tags) in zip(parts, columns)
        ]

    def collator(self, tokenizer, model):
        """Pads on the tokenizer's side (left), labels with IGNORE_INDEX."""
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)

    def compute_metrics(self):
        names = self.space.names

        def compute(prediction) -> dict[str, float]:
            return token_metrics(prediction.predictions, prediction.label_ids, names)

        return compute


# ---- model -------------------------------------------------------------------------------------------------------------
def load_classifier(model_dir: Path, dtype: torch.dtype, attn_implementation: str, task: str, space: LabelSpace,
                    **load_kwargs):
    """The base model's weights under a head for `space`: fresh unless `model_dir` holds one of the same shape.
    `load_kwargs`: more `from_pretrained` arguments (a 4-/8-bit base)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForTokenClassification
    model = auto.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, ignore_mismatched_sizes=True,
        **space.config_kwargs(), **load_kwargs,
    )
    if dtype == torch.float16:
        # fp16 LoRA trains the head whole (peft's modules_to_save copies it as it is) and the fp16 gradient scaler
        # refuses fp16 gradients: keep the head in fp32, as the adapter is.
        model.score.float()
    return model


def save_classifier_config(model, output_dir: Path) -> None:
    """The config with the labels next to a LoRA adapter, so that the output folder alone predicts.

    A full model's save already wrote it; peft saves only the adapter (with the head, in modules_to_save).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        base = model.get_base_model()
        base.config.architectures = [type(base).__name__]
        config = copy.deepcopy(base.config)
        # A QLoRA run's base was loaded in 4/8 bits: that is a way of loading (`--quantize`), not the base's config.
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(output_dir)


# ---- metrics -----------------------------------------------------------------------------------------------------------
def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean()) if len(labels) else 0.0


def f1(true_positives: int, predicted: int, actual: int) -> tuple[float, float, float]:
    """(precision, recall, F1) from counts; 0 where a count is 0."""
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual if actual else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Class ids [n], or 0/1 matrices [n, classes] (multi-label): the mean F1 of the classes that occur."""
    if labels.ndim == 1:
        classes = np.union1d(np.unique(labels), np.unique(predictions))
        predictions = predictions[:, None] == classes
        labels = labels[:, None] == classes
    predictions, labels = predictions.astype(bool), labels.astype(bool)
    occurring = (predictions | labels).any(axis=0)
    scores = [
        f1(int((p & t).sum()), int(p.sum()), int(t.sum()))[2]
        for p, t, occurs in zip(predictions.T, labels.T, occurring)
        if occurs
    ]
    return float(np.mean(scores)) if scores else 0.0


def entity_scores(gold_rows: Iterable[Sequence[str]], predicted_rows: Iterable[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over rows of BIO tags."""
    hits = predicted = actual = 0
    for gold, guess in zip(gold_rows, predicted_rows, strict=True):
        gold_entities, guess_entities = entities(gold), entities(guess)
        hits += len(gold_entities & guess_entities)
        predicted += len(guess_entities)
        actual += len(gold_entities)
    precision, recall, score = f1(hits, predicted, actual)
    return {"precision": precision, "recall": recall, "f1": score}


def sequence_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> dict[str, float]:
    if problem_type == REGRESSION:
        return {"mse": float(np.mean((logits.reshape(labels.shape) - labels) ** 2))}
    if problem_type == SINGLE_LABEL:
        predictions = logits.argmax(-1)
        return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    predictions, labels = logits > 0, labels > 0.5  # multi-label
    return {"accuracy": float((predictions == labels).all(axis=1).mean()), "macro_f1": macro_f1(predictions, labels)}


def token_metrics(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    predictions = logits.argmax(-1)
    gold_rows, predicted_rows = [], []
    for guess, gold in zip(predictions, labels):
        labelled = gold != IGNORE_INDEX
        gold_rows.append([names[i] for i in gold[labelled]])
        predicted_rows.append([names[i] for i in guess[labelled]])
    tagged = labels != IGNORE_INDEX
    return {**entity_scores(gold_rows, predicted_rows), "accuracy": accuracy(predictions[tagged], labels[tagged])}


def with_classification_metrics(metrics: dict, log_history: list[dict]) -> dict:
    """metrics.json for a classifier: the last evaluation's scores."""
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if evaluations:
        scores = {key: evaluations[-1][key] for key in CLASSIFICATION_KEYS if key in evaluations[-1]}
        metrics.update(scores)
        logger.info("held-out: %s", ", ".join(f"{key}={value:.4f}" for key, value in scores.items()))
    return metrics
