"""Batching ChatGLM training rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.masking import glm_position_ids
from .samples import IGNORE_INDEX


@dataclass
class GlmCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and `attention_mask` (0) to the longest row of the batch.

    The model derives GLM positions and the mask from `input_ids` and the sample numbers in `attention_mask`, so
    padding on the right changes nothing for the real tokens (0 is padding, seen by no one). The tokenizer pads on
    the left for generation; training rows need no such care.

    With `glm_token_ids` (`<sop>`, `[MASK]`, `[gMASK]`, as in the model's config) the batch also carries the
    `position_ids` the model would derive, computed here on the CPU: the model's derivation checks every sample for
    its `<sop>` and mask token, a read from the GPU that stops the host in every forward pass.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    glm_token_ids: tuple[int, int, int] | None = None

    @classmethod
    def for_model(cls, pad_token_id: int, model_config, pad_to_multiple_of: int | None = None) -> GlmCollator:
        """The collator that gives rows the position ids of a model with this config."""
        ids = (model_config.bos_token_id, model_config.mask_token_id, model_config.gmask_token_id)
        return cls(pad_token_id, pad_to_multiple_of, ids)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        batch = {
            name: torch.tensor([list(feature[name]) + [pad] * (length - len(feature[name])) for feature in features])
            for name, pad in pads.items()
            if name in features[0]
        }
        if self.glm_token_ids is not None:
            batch["position_ids"] = glm_position_ids(
                batch["input_ids"], batch.get("attention_mask"), *self.glm_token_ids, strict=True
            )
        return batch
