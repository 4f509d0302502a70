"""The precisions a config or a flag names (`auto`, `bf16`, `fp16`, `fp32`), and the one rule for `auto`."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_precision(*, without_bf16: str) -> str:
    """What `auto` means on this machine: bf16 on a CUDA GPU that has it, fp32 on the CPU, and `without_bf16` on an
    older GPU. Training passes "fp16" (the Trainer's mixed precision, its loss scaling watching for overflow);
    inference passes "fp32" (ChatGLM-6B run in plain fp16 can overflow)."""
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else without_bf16
