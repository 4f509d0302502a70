"""The trained model saved as it was loaded: its dtypes, one copy of tied weights, no checkpoint wrappers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from transformers import AutoConfig

from ...models.folders import record_base_changes
from ..ptuning import saving_prefix_only


class FaithfulSaving:
    """What `save_model` writes, whatever the launcher did to the model in memory:

    * under FSDP with bf16/fp16, accelerate upcasts the trained weights to fp32 (master copies for the optimizer);
      the gathered state dict is cast back to the dtypes the weights were loaded in (as on one GPU, and as ZeRO-3
      gathers 16-bit ones), and config.json says so;
    * tied weights (ChatGLM's lm_head and word embeddings) written once, as the official checkpoint has them;
    * FSDP's activation-checkpoint wrappers stepped aside, so that peft finds the adapter's weights by name;
    * a P-Tuning model saves its prefix encoder alone;
    * a run that stretched the base's context (`rope_scaling`) records that beside the weights (BASE_CHANGES_FILE).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loaded_dtypes = {name: tensor.dtype for name, tensor in self.model.state_dict().items()}
        self._loaded_dtype = self.model.dtype
        # {lm_head.weight: transformer.word_embeddings.weight}: one tensor in the model, two in a gathered state dict.
        self._tied_weights = dict(getattr(self.model, "all_tied_weights_keys", None) or {})

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        gathered = state_dict is not None  # under FSDP / DeepSpeed: the state dict gathered from the shards
        if gathered:
            state_dict = without_tied_copies(in_loaded_dtypes(state_dict, self._loaded_dtypes), self._tied_weights)
        with without_checkpoint_wrappers(self.model), saving_prefix_only(self.model):
            super()._save(output_dir, state_dict=state_dict)
        folder = Path(output_dir or self.args.output_dir)
        record_base_changes(folder, self.model.config)  # rope_scaling's context
        # save_pretrained records the dtype of the (upcast) weights it holds in config.json, not of those it wrote.
        config_file = folder / "config.json"
        if gathered and config_file.is_file():
            config = AutoConfig.from_pretrained(config_file.parent)
            if config.dtype != self._loaded_dtype:
                config.dtype = self._loaded_dtype
                config.save_pretrained(config_file.parent)


@contextlib.contextmanager
def without_checkpoint_wrappers(model: torch.nn.Module):
    """The model with each activation-checkpoint wrapper (FSDP's `fsdp_activation_checkpointing` puts one around every
    ChatGLMBlock) replaced by the module it wraps, for the duration of a save.

    peft finds a LoRA adapter's weights by the names of its modules, which run through the wrapper
    (`layers.0._checkpoint_wrapped_module.attention...`), while the state dict's keys do not (torch strips the
    wrapper's name from them): peft 0.21 then matches no key and writes an empty adapter_model.safetensors. Nothing
    runs forward or backward during a save, so the wrappers can step aside and come back.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, CheckpointWrapper):
                swapped.append((parent, name, child))
    try:
        for parent, name, wrapper in swapped:
            parent._modules[name] = wrapper._checkpoint_wrapped_module
        yield model
    finally:
        for parent, name, wrapper in swapped:
            parent._modules[name] = wrapper


def in_loaded_dtypes(state_dict: dict[str, torch.Tensor], loaded: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """`state_dict` with each floating tensor back in the dtype its weight was loaded in (a gathered FSDP state dict
    holds the fp32 master copies of bf16 weights: twice the file, and not the model that was asked for)."""
    cast = {}
    for name, tensor in state_dict.items():
        dtype = loaded.get(name.replace("_checkpoint_wrapped_module.", ""))
        if dtype is not None and tensor.is_floating_point() and dtype.is_floating_point and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        cast[name] = tensor
    return cast


def without_tied_copies(state_dict: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """`state_dict` without the copies of tied weights (target -> source). save_pretrained drops a tied weight only
    when both names share one tensor, which those gathered from FSDP's shards do not: ChatGLM-6B's 1 GiB lm_head would
    be written twice. Loading ties it back to the embedding, as for the official checkpoint."""
    return {name: tensor for name, tensor in state_dict.items() if not (name in tied and tied[name] in state_dict)}
