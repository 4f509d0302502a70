"""Batching ChatGLM training rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .samples import IGNORE_INDEX


@dataclass
class GlmCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and `attention_mask` (0) to the longest row of the batch.

    The model derives GLM positions and the mask from `input_ids` and the sample numbers in `attention_mask`, so
    padding on the right changes nothing for the real tokens (0 is padding, seen by no one). The tokenizer pads on
    the left for generation; training rows need no such care.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        return {
            name: torch.tensor([list(feature[name]) + [pad] * (length - len(feature[name])) for feature in features])
            for name, pad in pads.items()
            if name in features[0]
        }
