"""`method: ptuning`: P-Tuning v2 as the official `ptuning/main.py` (THUDM/ChatGLM-6B) trains it.

    method: ptuning
    ptuning: {pre_seq_len: 128, prefix_projection: false, dropout: 0.1}   # the official defaults

The base is frozen; only the prefix encoder (`thuglm.models.prefix`) trains, in fp32 over a bf16/fp16 base (the
official recipe: `model.half()`, `prefix_encoder.float()`), from torch's initialisation as the official one starts.
Checkpoints and the final output are in the official layout, `config.json` + `pytorch_model.bin` holding only
`transformer.prefix_encoder.*` in fp32, so the official loading recipe reads what thuglm trained, and thuglm reads
what the official code trained (`thuglm chat BASE --adapter DIR`). thuglm also records the base folder in
config.json (`base_model_name_or_path`; the official code ignores the key), so `thuglm chat DIR` finds it.

Packing stays exact: every sample of a packed row sees the same prefix it would see alone, its positions and mask
unchanged (tests/models/test_ptuning.py proves it on the logits).
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch

from ..models.prefix import attach_prefix_encoder, save_prefix_checkpoint
from .config import ConfigError, TrainConfig

logger = logging.getLogger("thuglm.train")

# Set on a model that `prepare_ptuning` prepared: the Trainer saves its prefix only (see `saving_prefix_only`).
PREFIX_ONLY = "_thuglm_saves_prefix_only"


def prepare_ptuning(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Give the model a fresh prefix encoder of `config.ptuning`'s shape (or keep the one of that shape it was
    loaded with), freeze everything else and keep the encoder in fp32."""
    settings = config.ptuning
    if settings.pre_seq_len < 1:
        raise ConfigError(f"config key `ptuning.pre_seq_len` must be at least 1; got {settings.pre_seq_len}")
    transformer = model.transformer
    existing = transformer.prefix_encoder
    if existing is None or (existing.pre_seq_len, existing.prefix_projection) != (
        settings.pre_seq_len, settings.prefix_projection
    ):
        attach_prefix_encoder(model, settings.pre_seq_len, settings.prefix_projection)
    else:
        logger.info("ptuning: the model's own prefix encoder (pre_seq_len %d) trains on", settings.pre_seq_len)
    if not 0.0 <= settings.dropout < 1.0:
        raise ConfigError(f"config key `ptuning.dropout` must be in [0, 1); got {settings.dropout}")
    transformer.prefix_encoder.dropout.p = settings.dropout
    model.requires_grad_(False)
    transformer.prefix_encoder.float().requires_grad_(True)
    setattr(model, PREFIX_ONLY, True)
    return model


@contextlib.contextmanager
def saving_prefix_only(model: torch.nn.Module):
    """Within, `model.save_pretrained` (what the Trainer saves with) writes the official P-Tuning layout instead of
    the whole model; outside, nothing is changed. A no-op for models that `prepare_ptuning` did not prepare."""
    if not getattr(model, PREFIX_ONLY, False):
        yield
        return

    def save(output_dir, *args, **kwargs):
        save_prefix_checkpoint(model, output_dir, base_model=model.name_or_path or None)

    model.save_pretrained = partial(save)
    try:
        yield
    finally:
        del model.save_pretrained


@contextlib.contextmanager
def prefix_counts_as_adapter(model: torch.nn.Module | None):
    """transformers' Trainer refuses a 4-/8-bit model unless trainable adapters sit on it (it looks for peft's). A
    P-Tuning prefix is such an adapter: the only trainable part, in fp32, on the frozen quantized base (the official
    recipe's `quantization_bit=4` P-Tuning). Within, the Trainer's check sees it as one; the Trainer reads the flag
    only while it is built."""
    quantized_ptuning = getattr(model, PREFIX_ONLY, False) and getattr(model, "is_quantized", False)
    if not quantized_ptuning or getattr(model, "_hf_peft_config_loaded", False):
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = False
