"""`precision: fp8`: LoRA whose frozen base weights multiply in FP8, through torchao's float8 training.

    method: lora
    precision: fp8
    compile: true

The run is a bf16 run (bf16 weights, autocast, the adapters as in bf16 LoRA) in which every `nn.Linear` of the
transformer's layers that LoRA does not train — the base layer under each adapter, and any layer no adapter targets —
becomes torchao's `Float8Linear` with its "rowwise_with_gw_hp" recipe: in the forward the weight is cast to float8
(e4m3) with one scale a row and the activations with one a token, both computed from each step's values (dynamic
scaling), then multiplied by `torch._scaled_mm`, the tensor cores' FP8 product; in the backward the output gradient
(a scale a token) multiplies the weight (one scale) in FP8 for the input gradient. The weight gradient stays in
bf16: a frozen weight needs none, and the compiled backward leaves that product out altogether (an FP8 one would be
traced first, and FP8's rule that its inner size — there the batch's token count — be a multiple of 16 stops
batches whose length compiles as a dynamic shape). The layer keeps its bf16 weight (read and cast each step); nothing
else about the model changes: the adapter saves, merges and loads as any LoRA adapter.

Kept in bf16:
* the adapters (`lora_A` / `lora_B`): what trains keeps the precision of bf16 LoRA; at rank 8 their matmuls are a
  small share of the step and too narrow for FP8's tile shapes to pay;
* the output layer (130,528 words, tied to the word embedding): the chunked loss (models/losses.py) multiplies its
  weight directly, and its logits feed the softmax over the whole vocabulary, where FP8's 3-bit mantissa would show
  in the loss; a classification head (`score`) is trained whole and stays bf16 too.

FP8 needs the matrix units of compute capability 8.9 and later (Ada, Hopper, Blackwell): elsewhere, and on a CPU, the
run is refused before anything is written (`require_fp8`). torchao's casts are separate kernels unless torch.compile
fuses them into the neighbouring work (eager they make a step slower than bf16), and its backward computes each
frozen weight's gradient only to have autograd drop it unless compiled code leaves it out: so `precision: fp8` needs
`compile: true` (config.py checks it). torchao is an extra: `pip install "thuglm[fp8]"`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import torch

from .config import ConfigError

logger = logging.getLogger("thuglm.train")

INSTALL = 'pip install "thuglm[fp8]"'
FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.x / 12.x
RECIPE = "rowwise_with_gw_hp"  # torchao's: rowwise FP8 forward and input gradient, the weight gradient in bf16
# torchao's emulation of the FP8 product in higher precision: the tests set it to run the conversion on a CPU (which
# `require_fp8` refuses for real runs).
EMULATE = False


def fp8_unavailable_reason() -> str | None:
    """Why this machine cannot train in FP8, or None when it can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU, and FP8 matmuls need one of compute capability 8.9 or newer"
    capability = torch.cuda.get_device_capability()
    if capability < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}, and FP8 "
                "matrix units start at 8.9 (Ada, Hopper, Blackwell)")
    if importlib.util.find_spec("torchao") is None:
        return f"torchao, which provides the FP8 layers, is not installed: {INSTALL}"
    return None


def require_fp8() -> str:
    """The precision the rest of an FP8 run takes (bf16), or a ConfigError saying why FP8 cannot run here."""
    reason = fp8_unavailable_reason()
    if reason:
        raise ConfigError(f"precision fp8 cannot run here: {reason}; use precision bf16 (or auto)")
    return "bf16"


def trains_in_fp8(module: torch.nn.Module, name: str) -> bool:
    """A linear layer of the transformer's layers that LoRA does not train, whose shape FP8's product takes (both
    sizes multiples of 16)."""
    parts = name.split(".")
    return ("layers" in parts and not any(part.startswith("lora_") for part in parts)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_base_to_fp8(model: torch.nn.Module) -> list[str]:
    """Swap the base's linear layers (`trains_in_fp8`) for torchao's Float8Linear in place; return their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(RECIPE)
    if EMULATE:
        config = dataclasses.replace(config, emulate=True)
    converted: list[str] = []

    def keep(module: torch.nn.Module, name: str) -> bool:
        if trains_in_fp8(module, name):
            converted.append(name)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    logger.info("precision fp8: %d linear layers of the base multiply in FP8 (torchao float8, recipe %s); the "
                "adapters and the output layer stay bf16", len(converted), RECIPE)
    return converted
