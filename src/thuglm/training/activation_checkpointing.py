"""Gradient (activation) checkpointing: which form of torch's checkpoint, and transformers' names for it.

transformers 5.2x renamed `gradient_checkpointing*` to `activation_checkpointing*` (TrainingArguments fields, the
model's enable method and flag); the old names still work there but warn on every run. thuglm takes whichever names
the installed transformers has.
"""

from __future__ import annotations

import dataclasses

import torch

from .distributed import sharding_plugin


def checkpointing_arguments() -> dict[str, bool]:
    """torch.utils.checkpoint's arguments: reentrant, except where the model is sharded.

    The reentrant form runs each layer's first forward without autograd (no graph, no saved-tensor hooks) and builds
    the graph once, in the recomputation; the non-reentrant form builds it in both. At batch 1 a step waits on the
    host, and the reentrant form's step takes a third less host time (benchmarks/README.md, issue #23). FSDP and
    DeepSpeed keep the non-reentrant form, which their sharded parameters need.
    """
    return {"use_reentrant": sharding_plugin() is None}


def training_argument_fields(enabled: bool) -> dict:
    """The TrainingArguments fields that turn checkpointing on or off, under the installed transformers' names."""
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": checkpointing_arguments()}


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Turn checkpointing on for `model` (a PreTrainedModel or a peft model around one), if it is not on yet."""
    renamed = hasattr(model, "activation_checkpointing_enable")
    if model.is_activation_checkpointing if renamed else model.is_gradient_checkpointing:
        return
    enable = model.activation_checkpointing_enable if renamed else model.gradient_checkpointing_enable
    enable(checkpointing_arguments())  # positional: the keyword was renamed with the method
