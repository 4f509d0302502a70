"""peft's casting of LoRA inputs to fp32 off where the Trainer runs the model under autocast."""

from __future__ import annotations

import contextlib

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer


class AdapterCastingOff:
    """peft copies each adapter's input to the fp32 of the adapter weights; under autocast the matmul casts it
    straight back to bf16/fp16, so for a half-precision base that is two passes over the largest activations of
    every adapted layer (for dense_4h_to_h, [tokens, 16384]) for nothing. Off only where the Trainer runs the model
    (a training step, an evaluation), and only where accelerate runs it under autocast (`native_amp`; fp16 on a CPU
    has none, and there the fp16 input would meet the fp32 adapter): a PeftModel used on its own keeps peft's
    casting.

    Over the forward and the backward of a training step alike: gradient checkpointing runs each layer's forward
    again inside the backward, and a recomputation that cast adapter inputs to fp32 where the forward had not would
    save other tensors than the forward did (torch's CheckpointError: "saved bfloat16, recomputed float32").
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adapter_layers: tuple[PeftModel, list[BaseTunerLayer]] | None = None  # (model, its adapter layers)

    def adapter_casting_off(self) -> contextlib.AbstractContextManager:
        if self.accelerator.native_amp and isinstance(self.model, PeftModel):
            return adapter_input_casting_off(self._adapter_layers_of(self.model))
        return contextlib.nullcontext()

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.adapter_casting_off():
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss_context_manager(self):
        """The Trainer's (autocast is accelerate's, around the forward), with the casting off: for the forward of an
        evaluation, which has no backward."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.adapter_casting_off())
        return stack

    def _adapter_layers_of(self, model: PeftModel) -> list[BaseTunerLayer]:
        # peft's own `disable_input_dtype_casting` finds the adapter layers with two `named_modules()` walks per
        # micro-batch; the model's adapter layers do not change in a run.
        if self._adapter_layers is None or self._adapter_layers[0] is not model:
            self._adapter_layers = (model, adapter_layers(model))
        return self._adapter_layers[1]


def adapter_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """The peft adapter layers (a LoRA-adapted Linear each) of `model`."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_input_casting_off(layers: list[BaseTunerLayer]):
    """peft's `disable_input_dtype_casting` over a list of adapter layers taken once: each layer's casting is off
    inside, and as it was after."""
    was = [layer.cast_input_dtype_enabled for layer in layers]
    try:
        for layer in layers:
            layer.cast_input_dtype_enabled = False
        yield
    finally:
        for layer, enabled in zip(layers, was):
            layer.cast_input_dtype_enabled = enabled
