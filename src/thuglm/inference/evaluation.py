"""Measure a trained ChatGLM: perplexity on a text corpus, BLEU-4 / ROUGE on instruction data.

The text corpus goes through the same pipeline as training (`thuglm.data`: `[gMASK] <sop> text <eop>` windows,
loss on the text and `<eop>`), so the evaluation loss is comparable with the training loss. The generation scores
are computed exactly as the official ChatGLM-6B p-tuning evaluation computes them (`ptuning/main.py`,
`compute_metrics`), so numbers can be compared with published ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import (
    DataError,
    GlmCollator,
    encode_text_dataset,
    guess_text_column,
    load_raw_dataset,
)
from ..data.preference import ANSWERS
from ..data.samples import DEFAULT_MAX_SEQ_LEN
from ..errors import ThuglmError
from ..models.losses import IGNORE_INDEX, perplexity
from .generate import generate_responses, prompt_row, read_prompts_as

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")


@torch.no_grad()
def summed_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of token losses, number of predicted tokens) of one batch; the model's `.loss` is their mean."""
    batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(**batch).loss
    return float(loss) * tokens, tokens


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    files: Sequence[str],
    text_column: str | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    batch_size: int = 8,
    spec=None,
) -> dict:
    """Token-weighted mean loss over every text of `files` and its exponential: {eval_loss, perplexity, tokens}.

    Texts are not packed: each window is scored alone, as it would be read at inference. With `spec` (a
    `SourceSpec`: a run's data settings) the files are read file by file as training read them.
    """
    if spec is not None:
        from ..data.processing import encode_rows, encode_samples
        from ..data.sources import load_source

        spec = dataclasses.replace(spec, files=tuple(map(str, files)))
        samples = encode_samples(load_source(spec), tokenizer, kind="text", max_seq_len=max_seq_len,
                                 source=spec.describe())
        encoded = encode_rows(samples, tokenizer, max_seq_len=max_seq_len, packing=False)
    else:
        dataset = load_raw_dataset(list(files))
        column = guess_text_column(dataset.column_names, text_column, source=", ".join(map(str, files)))
        encoded = encode_text_dataset(dataset, tokenizer, text_column=column, max_seq_len=max_seq_len, packing=False)
    encoded = encoded.select_columns(["input_ids", "labels", "attention_mask"])
    loader = DataLoader(encoded, batch_size=batch_size, collate_fn=GlmCollator(tokenizer.pad_token_id))
    total_loss, total_tokens = 0.0, 0
    for batch in loader:
        loss, tokens = summed_loss(model, batch)
        total_loss, total_tokens = total_loss + loss, total_tokens + tokens
    eval_loss = total_loss / total_tokens
    return {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss), "tokens": total_tokens}


EVAL_EXTRA_INSTALL = 'pip install -e ".[eval]"'
"""The README's command: thuglm is installed from its repository, and `thuglm[eval]` would look for it on PyPI."""


class MissingScoringPackagesError(ThuglmError, ImportError):
    """BLEU / ROUGE need the `eval` extra (jieba, nltk, rouge-chinese), which the base install leaves out."""


def require_scoring_packages() -> None:
    missing = [name for name in ("jieba", "nltk", "rouge_chinese") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingScoringPackagesError(
            f"BLEU / ROUGE scoring needs {', '.join(missing)}: install the eval extra with `{EVAL_EXTRA_INSTALL}` "
            "in the thuglm repository"
        )


def row_scores(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE F1 (×100, rounded to 4 places) of one answer, as the official `compute_metrics`.

    ROUGE is taken over jieba words, BLEU-4 over characters with smoothing method 3. rouge_chinese raises on an
    empty side; the official loop would crash there, here such a row scores 0.
    """
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, words = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if hypothesis.strip() and words.strip():
        rouge = Rouge().get_scores(hypothesis, words)[0]
        scores = {key: round(rouge[key]["f"] * 100, 4) for key in ROUGE_KEYS}
    else:
        scores = dict.fromkeys(ROUGE_KEYS, 0.0)
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(bleu * 100, 4), **scores}


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-row BLEU-4, ROUGE-1, ROUGE-2 and ROUGE-L (0-100), as the official ChatGLM-6B evaluation."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: pass one per reference")
    if not predictions:
        raise ValueError("no predictions to score")
    require_scoring_packages()
    rows = [row_scores(prediction, reference) for prediction, reference in zip(predictions, references)]
    return {key: float(np.mean([row[key] for row in rows])) for key in ("bleu-4", *ROUGE_KEYS)}


def ranking_rows_hint(files: Sequence[str]) -> str:
    """Where rows carry two answers (LLaMA-Factory's ranking data), where their measure is."""
    if not set(ANSWERS) <= set(load_raw_dataset(list(files)).column_names):
        return ""
    return ("; they hold pairs of answers (`chosen`, `rejected`) for `task: dpo`, whose reward accuracy on held-out "
            "pairs thuglm train measures: data.eval_files=FILE (or data.validation_split) puts "
            "eval_rewards/accuracies and eval_rewards/margins in the run's metrics.json")


def evaluate_alpaca(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    files: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    spec=None,
) -> dict:
    """Answer every instruction of `files` greedily and score the answers against `output`: scores plus `samples`.

    With `spec` (a run's data settings, any dialogue format) each row's last user turn is answered with the turns
    before it as history, and scored against the answer that follows it in the row.
    """
    require_scoring_packages()  # before minutes of generation, not after
    source = ", ".join(map(str, files))
    if spec is not None:
        rows = read_prompts_as(spec, list(files))
    else:
        rows = [prompt_row(row, source) for row in load_raw_dataset(list(files))]
    unscored = [index for index, row in enumerate(rows) if "reference" not in row]
    if unscored:
        raise DataError(f"{source}: rows {unscored[:5]} have no `output` to score the answers against"
                        + ranking_rows_hint(files))
    predictions = generate_responses(
        model, tokenizer, [row["prompt"] for row in rows], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    references = [row["reference"] for row in rows]
    return {**generation_scores(predictions, references), "samples": len(rows)}
