"""Sample layouts that keep the loss honest under GLM's prefix-LM attention.

Everything before `<sop>` is attended both ways. A token there can see the token it is asked to predict, so a loss
taken on it measures copying, not language modelling (the popular tutorial's `text [gMASK] <sop>` with
labels = inputs does exactly this). In thuglm's layouts every predicted token comes after `<sop>`, where attention is
causal:

    plain text:        [gMASK] <sop> text <eop>            loss on text and <eop>
    prompt, response:  prompt [gMASK] <sop> response <eop>  loss on response and <eop>
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.losses import IGNORE_INDEX

DEFAULT_MAX_SEQ_LEN = 512
"""Tokens a row when no `max_seq_len` (config key) or `--max-seq-len` (eval, predict) is given: ChatGLM-6B's
fine-tuning default; the model takes up to its `max_sequence_length` (2048)."""


def prompt_response_sample(
    prompt_ids: Sequence[int], response_ids: Sequence[int], gmask_id: int, sop_id: int, eop_id: int
) -> dict[str, list[int]]:
    """`prompt [gMASK] <sop> response <eop>`, labels -100 up to and including `<sop>`.

    The model shifts labels inside (the logits at `<sop>` predict the first response token), so labels line up
    with input_ids.
    """
    context = list(prompt_ids) + [gmask_id, sop_id]
    target = list(response_ids) + [eop_id]
    return {"input_ids": context + target, "labels": [IGNORE_INDEX] * len(context) + target}


def causal_lm_sample(text_ids: Sequence[int], gmask_id: int, sop_id: int, eop_id: int) -> dict[str, list[int]]:
    """`[gMASK] <sop> text <eop>`: plain text for causal language modelling, loss on every text token."""
    return prompt_response_sample([], text_ids, gmask_id, sop_id, eop_id)
