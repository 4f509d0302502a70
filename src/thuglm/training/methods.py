"""Loading the base model and making the right parameters trainable: LoRA (peft), full, or the last N layers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from ..models.modeling_chatglm import ChatGLMBlock
from ..models.precision import DTYPES, auto_precision
from .config import ConfigError, TrainConfig
from .ptuning import prepare_ptuning
from .tasks import get_task

logger = logging.getLogger("thuglm.train")


def resolve_precision(precision: str) -> str:
    """`auto` becomes bf16 on a GPU that has it, fp16 (mixed, with loss scaling) on an older GPU and fp32 on CPU."""
    if precision == "fp8":  # a bf16 run whose frozen base weights multiply in FP8, or one line saying why not here
        from .fp8 import require_fp8

        return require_fp8()
    if precision != "auto":
        if precision in ("bf16", "fp16") and not torch.cuda.is_available():
            logger.warning("precision %s on CPU is slow and only partly supported by torch; fp32 is the CPU default", precision)
        return precision
    return auto_precision(without_bf16="fp16")


def fused_dropout_available() -> bool:
    """LoRA's fused dropout needs a CUDA GPU and Triton (which CUDA builds of torch bring)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def resolve_model_dir(model: str) -> Path:
    """`tiny` is the built-in demo model; anything else is a folder in the official layout or saved by thuglm."""
    if model == "tiny":
        from ..models.tiny import cached_tiny_chatglm

        return cached_tiny_chatglm()
    return Path(model).expanduser().resolve()


def weights_dtype(method: str, precision: str) -> torch.dtype:
    """The dtype the base weights are loaded in.

    bf16 trains in pure bf16. fp16 mixed precision needs fp32 master copies of whatever is trained (the gradient
    scaler refuses fp16 gradients), so full and freeze load fp32 and run under autocast; LoRA keeps a fp16 base and
    peft holds the adapter in fp32.
    """
    if precision == "fp16" and method not in ("lora", "ptuning"):  # ptuning: fp16 base, fp32 prefix
        return torch.float32
    return DTYPES[precision]


def load_base_model(model_dir: Path, dtype: torch.dtype, attn_implementation: str, **load_kwargs) -> torch.nn.Module:
    """`load_kwargs`: more `from_pretrained` arguments (a 4-/8-bit base: `quantization.quantized_load_kwargs`)."""
    from transformers import AutoModelForCausalLM

    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation,
                                                **load_kwargs)


def prepare_for_method(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Freeze what the method does not train; return the model the Trainer should see (a PeftModel for LoRA).
    A head the task adds is trained whole."""
    task = get_task(config.task)
    if config.method == "lora":
        lora = config.lora
        peft_config = LoraConfig(
            task_type=task.peft_task_type,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            # A head is new: trained whole next to the adapter, and saved with it.
            modules_to_save=[task.head] if task.head else None,
        )
        # peft keeps the adapter weights in fp32 under a bf16/fp16 base (autocast_adapter_dtype).
        model = get_peft_model(model, peft_config)
        if lora.dropout > 0 and lora.fused_dropout:
            if fused_dropout_available():
                from .lora_dropout import fuse_lora_dropout

                logger.info("LoRA dropout drawn inside %d adapters' products (lora.fused_dropout)",
                            fuse_lora_dropout(model))
            else:
                logger.warning("lora.fused_dropout needs a CUDA GPU (and Triton): this run draws LoRA's dropout with "
                               "peft's module")
    elif config.method == "ptuning":
        model = prepare_ptuning(model, config)
    elif config.method == "freeze":
        layers = model.transformer.layers
        keep = config.freeze.trainable_layers
        if not 1 <= keep <= len(layers):
            raise ConfigError(f"config key `freeze.trainable_layers` must be between 1 and {len(layers)}; got {keep}")
        model.requires_grad_(False)
        for layer in layers[-keep:]:
            layer.requires_grad_(True)
        if task.head:
            getattr(model, task.head).requires_grad_(True)
    if config.gradient_checkpointing and config.method != "full":
        # With a frozen embedding no input to the first checkpointed layer needs grad; make the inputs carry it.
        model.enable_input_require_grads()
    return model


# What compile_blocks compiles with (the tests swap in "eager": inductor's C++ build takes minutes on a CPU).
COMPILE_BACKEND = "inductor"


def compile_blocks(model: torch.nn.Module, gradient_checkpointing: bool, fixed_length: bool = True) -> int:
    """torch.compile every ChatGLMBlock in place (`Module.compile`); returns how many.

    In place rather than `torch.compile(model)`: the state dict keeps its names (no `_orig_mod.`), peft and the
    Trainer see the same modules. The layers share their code, so they share one compiled graph.

    With gradient checkpointing, each layer's attention and MLP are compiled instead of the whole layer: since
    transformers 5.2x checkpoints a layer inside its `forward`, a compiled layer would hold the checkpoint in its
    graph, and its recomputation then draws other dropout masks than the forward did (seen as diverging losses with
    LoRA dropout). Compiled parts keep the checkpoint outside, where it replays the random state as in eager mode.

    `fixed_length`: every batch has the same row length (packed rows, padded to max_seq_len), so the graph is made
    for that shape. Otherwise (each batch padded to its longest row) it is made for any length from the start:
    made for the first batch's shape, dynamo would compile again at the second length, then again for each variant
    (the first layer's input needs no gradient, the others' do; a shorter last batch; evaluation), and past its
    recompile limit (8) it runs the layer uncompiled for good.
    """
    blocks = [module for module in model.modules() if isinstance(module, ChatGLMBlock)]
    for block in blocks:
        for part in (block.attention, block.mlp) if gradient_checkpointing else (block,):
            part.compile(backend=COMPILE_BACKEND, dynamic=None if fixed_length else True)
    return len(blocks)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
