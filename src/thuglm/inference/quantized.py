"""bitsandbytes 4-bit / 8-bit loading, shared by `thuglm train` (QLoRA) and the inference commands (`--quantize`).

bitsandbytes is an extra (`pip install "thuglm[quant]"`). Since 0.46 it runs 4-bit (NF4 / FP4) and 8-bit linears on
the CPU too, forward and backward (tests/training/test_qlora.py trains the tiny model with it); on a GPU it needs its
CUDA library for that card. Both conditions are checked here, before a model is loaded, each ending in one line.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ThuglmError

INSTALL = 'pip install "thuglm[quant]"'


class QuantizationUnavailable(ThuglmError, RuntimeError):
    """4-bit / 8-bit loading was asked for and bitsandbytes cannot provide it here; the message says what to do."""


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes() -> None:
    """bitsandbytes importable and, on a CUDA machine, able to quantize on this GPU: else one line saying why."""
    if not bitsandbytes_installed():
        raise QuantizationUnavailable(f"4-bit / 8-bit models need bitsandbytes, which is not installed: {INSTALL}")
    if not torch.cuda.is_available():
        return
    try:
        import bitsandbytes.functional as F

        F.quantize_4bit(torch.ones(64, dtype=torch.float16, device="cuda"))
    except Exception as error:  # noqa: BLE001 -- no build for this card / CUDA, or the card lacks an instruction
        name = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizationUnavailable(
            f"bitsandbytes cannot quantize on this GPU ({name}, compute capability {capability}): {reason[:200]}. "
            "Load the model without quantization (bf16/fp16), or run it on a GPU bitsandbytes supports."
        ) from None


def bitsandbytes_config(
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: list[str] | None = None,
):
    """The `BitsAndBytesConfig` for `bits` (4: NF4/FP4 with `compute_dtype`; 8: LLM.int8)."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    if bits not in (4, 8):
        raise QuantizationUnavailable(f"bitsandbytes quantizes to 4 or 8 bits, not {bits}")
    # Never quantized: the tied lm_head (a quantized copy would untie it) and the classification heads.
    skip = list(skip_modules) if skip_modules is not None else ["lm_head"]
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def quantized_device_map() -> Any:
    """Where a bitsandbytes model loads: this process's GPU (its own one under DDP), else the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def is_bitsandbytes_model(model: torch.nn.Module) -> bool:
    return getattr(model, "quantization_method", None) == "bitsandbytes" or bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def trained_base_bits(run_dir: str | Path) -> int | None:
    """The bits of the base a `thuglm train` run's adapter was trained on (QLoRA), from its thuglm_train.yaml."""
    resolved = Path(run_dir) / "thuglm_train.yaml"
    if not resolved.is_file():
        return None
    import yaml

    settings = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    return ((settings.get("quantization") or {}).get("bits")) if isinstance(settings, dict) else None


def quantize_kwargs(bits: int | None, dtype: torch.dtype, skip_modules: list[str] | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments of `--quantize BITS` (none for None): the linears of the transformer in 4 bits
    (NF4, double quantization) or 8 bits (LLM.int8), computing in `dtype`; the tied lm_head (and a classifier's head)
    stays in `dtype`."""
    if bits is None:
        return {}
    if bits == 8 and dtype == torch.float32:
        import warnings

        # On the CPU in fp32, every 8-bit matmul warns that it casts its input to fp16 (as it must to quantize it).
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    return {"quantization_config": bitsandbytes_config(bits, compute_dtype=dtype, skip_modules=skip_modules)}


def check_official_quantized(model_dir: str | Path, quantize: int | None) -> int:
    """The `quantization_bit` of an official int4/int8 folder (0 for others); `--quantize` on one is refused."""
    import json

    config_file = Path(model_dir) / "config.json"
    bits = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_bit", 0) if config_file.is_file() else 0
    if bits and quantize is not None:
        raise QuantizationUnavailable(
            f"{model_dir} is already an int{bits} checkpoint (quantization_bit {bits} in its config.json), which thuglm "
            f"runs as it is: drop --quantize {quantize}, or pass the fp16 checkpoint (THUDM/chatglm-6b) to quantize it"
        )
    return bits or 0
