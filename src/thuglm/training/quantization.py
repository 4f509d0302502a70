"""QLoRA: `thuglm train` with a base loaded in 4 or 8 bits by bitsandbytes, LoRA adapters trained on top.

    method: lora
    quantization: {bits: 4, type: nf4, double_quant: true, compute_dtype: auto}

The base is loaded the way transformers documents it (`from_pretrained(..., quantization_config=BitsAndBytesConfig)`):
every linear layer of the transformer becomes a bitsandbytes `Linear4bit` / `Linear8bitLt`; the word embedding (tied
to the lm_head), the LayerNorms and a classification head stay in the run's dtype. peft then wraps the quantized
linears with LoRA as it wraps plain ones. What peft's `prepare_model_for_kbit_training` does besides is done by the
recipe anyway: the base is frozen (peft), the inputs carry gradients into the first checkpointed layer
(`prepare_for_method`), gradient checkpointing without reentrance (the Trainer). Its fp32 copy of every unquantized
weight is left out: the embedding alone would grow by 1 GB on ChatGLM-6B, and bf16 trains as stably without it (fp16
runs keep a fp16 base, as plain fp16 LoRA does).

The adapter is saved and loaded as a plain LoRA adapter: `thuglm merge` merges it into the bf16/fp16 base it names,
`thuglm chat RUN_DIR --quantize 4` runs it on a 4-bit base again.
"""

from __future__ import annotations

from typing import Any

import torch

from ..inference.quantized import bitsandbytes_config, quantized_device_map
from ..models.precision import DTYPES
from .config import QuantizationSettings, TrainConfig

# Kept in the run's dtype: the tied output embedding and the classification heads (trained whole, modules_to_save).
NOT_QUANTIZED = ["lm_head", "score"]

def compute_dtype(settings: QuantizationSettings, precision: str) -> torch.dtype:
    """`auto`: the run's precision (fp32 on CPU)."""
    return DTYPES[precision if settings.compute_dtype == "auto" else settings.compute_dtype]


def quantized_load_kwargs(config: TrainConfig, precision: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for the run's base model: none without `quantization.bits`."""
    settings = config.quantization
    if settings.bits is None:
        return {}
    quantization_config = bitsandbytes_config(
        settings.bits,
        quant_type=settings.type,
        double_quant=settings.double_quant,
        compute_dtype=compute_dtype(settings, precision),
        skip_modules=NOT_QUANTIZED,
    )
    # bitsandbytes quantizes as the weights reach their device, so each process loads onto its own GPU (DDP).
    return {"quantization_config": quantization_config, "device_map": quantized_device_map()}


def describe(config: TrainConfig, precision: str) -> str:
    settings = config.quantization
    if settings.bits is None:
        return ""
    kind = f"{settings.type}{', double quant' if settings.double_quant else ''}" if settings.bits == 4 else "LLM.int8"
    return f"QLoRA on a {settings.bits}-bit base ({kind}, compute {compute_dtype(settings, precision)})"


def check_official_quantized_base(model_dir, config: TrainConfig) -> None:
    """An official int4/int8 folder (`quantization_bit` in its config.json) is already quantized, in a packed layout
    neither peft's LoRA nor full fine-tuning can train: only a prefix (P-Tuning, as the official recipe trains int4)."""
    from ..inference.quantized import check_official_quantized
    from .config import ConfigError

    bits = check_official_quantized(model_dir, None)
    if not bits:
        return
    if config.quantization.bits is not None:
        raise ConfigError(f"{model_dir} is the official int{bits} checkpoint, quantized already: remove the "
                          "`quantization` section (or point `model` at the fp16 checkpoint, THUDM/chatglm-6b)")
    if config.method != "ptuning":
        raise ConfigError(f"{model_dir} is the official int{bits} checkpoint, whose packed weights `method: "
                          f"{config.method}` cannot train: use `method: ptuning` on it (the official int4 recipe), or "
                          f"QLoRA on the fp16 checkpoint (`model: <THUDM/chatglm-6b folder>`, `quantization: {{bits: "
                          f"{bits}}}`)")
