"""Preference pairs (`task: dpo`): ranking rows -> a chosen and a rejected sample each -> batches of both.

Each answer is laid out exactly as an SFT sample of the same dialogue (`processing.fit_dialogue_sample`, the code every
dialogue format trains with): `prompt [gMASK] <sop> answer <eop>`, labels on the answer and `<eop>` only, the same
shortening of long rows. So the log-probability of an answer summed over its labels is the one an SFT model was
trained to raise, and 2D positions come from the same places (`GlmCollator`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import pyarrow.compute as pc
import torch

from ..models.prompt import build_prompt
from .collator import GlmCollator
from .processing import TOKEN_IDS, cached_map, fit_dialogue_sample, layout_ids, sentencepiece_threads

logger = logging.getLogger("thuglm.data")

ANSWERS = ("chosen", "rejected")
PAIR_COLUMNS = [f"{answer}_{part}" for answer in ANSWERS for part in ("input_ids", "labels")]
PAIR_FEATURES = datasets.Features({**{name: TOKEN_IDS for name in PAIR_COLUMNS}, "truncated": datasets.Value("bool")})
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Per-pair reference log-probs, when they are computed before training (full fine-tuning; see training/tasks/dpo.py)."""


def _tokenize_pairs(batch, *, tokenizer, max_seq_len: int, num_threads: int) -> dict:
    parts = []
    for system, turns, chosen, rejected, problem in zip(batch["system"], batch["turns"], batch["chosen"],
                                                        batch["rejected"], batch["problem"]):
        if problem:
            continue  # counted, named and reported when the rows were read
        history = list(zip(turns[0:-1:2], turns[1:-1:2]))
        parts.append((turns[-1], history, system or None, chosen, rejected))
    prompts = tokenizer.encode_text([build_prompt(query, history, system) for query, history, system, *_ in parts],
                                    num_threads)
    answers = {answer: tokenizer.encode_text([part[3 + index] for part in parts], num_threads)
               for index, answer in enumerate(ANSWERS)}
    layout = layout_ids(tokenizer)
    out = {name: [] for name in PAIR_FEATURES}
    for index, ((query, history, system, *_), prompt) in enumerate(zip(parts, prompts)):
        cut = False
        for answer in ANSWERS:
            sample, truncated = fit_dialogue_sample(query, history, prompt, answers[answer][index], tokenizer,
                                                    max_seq_len, layout, system)
            out[f"{answer}_input_ids"].append(sample["input_ids"])
            out[f"{answer}_labels"].append(sample["labels"])
            cut |= truncated
        out["truncated"].append(cut)
    return out


def encode_pairs(canonical, tokenizer, *, max_seq_len: int, num_proc: int | None = None, source: str = "the data"):
    """One row a good ranking row: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`."""
    pairs = cached_map(
        canonical, _tokenize_pairs, PAIR_FEATURES, tokenizer, num_proc, desc=f"Tokenizing pairs of {source}"[:80],
        fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len, "num_threads": sentencepiece_threads(num_proc)},
        key={"step": "preference pairs", "max_seq_len": max_seq_len},
    )
    truncated = pc.sum(pairs.data.column("truncated")).as_py() or 0
    if truncated:
        logger.warning("%s: shortened %d of %d pairs longer than max_seq_len=%d (as SFT samples are: oldest history "
                       "rounds first, then the start of the prompt, then the end of the answer)", source, truncated,
                       len(pairs), max_seq_len)
    return pairs.remove_columns("truncated")


@dataclass
class PreferenceCollator:
    """A batch of B pairs as 2B rows, the B chosen then the B rejected, padded and positioned by `GlmCollator`; the
    reference log-probs, where the rows carry them, as `ref_chosen_logps` / `ref_rejected_logps` [B]."""

    rows: GlmCollator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [
            {"input_ids": feature[f"{answer}_input_ids"], "labels": feature[f"{answer}_labels"],
             "attention_mask": [1] * len(feature[f"{answer}_input_ids"])}
            for answer in ANSWERS for feature in features
        ]
        batch = self.rows(rows)
        for name in REFERENCE_COLUMNS:
            if name in features[0]:
                batch[name] = torch.tensor([feature[name] for feature in features], dtype=torch.float32)
        return batch
