"""Batching ChatGLM training rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .samples import IGNORE_INDEX


@dataclass
class GlmCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and `attention_mask` (0) to the longest row of the batch.

    The model derives GLM positions and the mask from `input_ids` and the sample numbers in `attention_mask`, so
    padding on the right changes nothing for the real tokens (0 is padding, seen by no one).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        batch = {}
        for name, pad in pads.items():
            rows = [list(f[name]) + [pad] * (length - len(f[name])) for f in features if name in f]
            if rows:
                batch[name] = torch.tensor(rows, dtype=torch.long)
        return batch
