"""The trained model is saved in the dtypes it was loaded in, also when FSDP trained fp32 master copies of it.

accelerate shards with FSDP only on GPUs; these tests do to the model what it does there (upcast the trained weights
to fp32 before sharding) and hand the Trainer's `_save` the gathered fp32 state dict, as `save_model` does under FSDP.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from transformers import TrainingArguments

from thuglm.models import ChatGLMForConditionalGeneration
from thuglm.training.parts.saving import in_loaded_dtypes
from thuglm.training.trainer import GlmTrainer


def upcast_trained_weights(model) -> None:
    """What accelerate's FSDP preparation does under bf16/fp16 mixed precision."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def test_full_fine_tuning_under_fsdp_saves_bf16_weights_not_their_fp32_master_copies(tiny_dir, tmp_path):
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    trainer = GlmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    upcast_trained_weights(model)
    with torch.no_grad():
        model.transformer.layers[0].mlp.dense_4h_to_h.weight.add_(1e-3)  # an update bf16 could not hold exactly
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert {tensor.dtype for tensor in gathered.values()} == {torch.float32}

    trainer._save(str(tmp_path / "final"), state_dict=gathered)

    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in saved  # gathered as a second copy of the tied embedding, written once
    name = "transformer.layers.0.mlp.dense_4h_to_h.weight"
    torch.testing.assert_close(saved[name], gathered[name].to(torch.bfloat16), rtol=0, atol=0)
    reloaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "final", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.word_embeddings.weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, gathered["lm_head.weight"].to(torch.bfloat16))


def test_lora_adapters_stay_fp32_and_checkpoint_wrapper_names_are_matched(tiny_dir, tmp_path):
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["dense"]))
    trainer = GlmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    trainer._save(str(tmp_path / "adapter"), state_dict={k: v.float() for k, v in model.state_dict().items()})

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and {tensor.dtype for tensor in adapter.values()} == {torch.float32}  # peft keeps adapters fp32

    loaded = {"layers.0.weight": torch.bfloat16, "layers.0.bias": torch.bfloat16}
    wrapped = {"layers.0._checkpoint_wrapped_module.weight": torch.ones(2), "layers.0.bias": torch.ones(2),
               "step": torch.tensor(3)}
    cast = in_loaded_dtypes(wrapped, loaded)
    assert [tensor.dtype for tensor in cast.values()] == [torch.bfloat16, torch.bfloat16, torch.int64]


def test_a_lora_adapter_inside_fsdps_checkpoint_wrappers_is_saved_whole(tiny_dir, tmp_path):
    """fsdp_activation_checkpointing wraps every ChatGLMBlock; peft alone would write an empty adapter file."""
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["dense"], init_lora_weights=False))
    expected = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    layers = model.base_model.model.transformer.layers
    for index, block in enumerate(layers):
        layers[index] = checkpoint_wrapper(block)
    trainer = GlmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))

    trainer._save(str(tmp_path / "given"), state_dict=model.state_dict())  # as under FSDP: the gathered state dict
    trainer._save(str(tmp_path / "own"))  # as without FSDP: the model's own

    assert all(isinstance(layer, CheckpointWrapper) for layer in layers)  # the wrappers are back after the save
    for folder in ("given", "own"):
        saved = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert len(saved) == len(expected) == 4
        reloaded = PeftModel.from_pretrained(ChatGLMForConditionalGeneration.from_pretrained(tiny_dir),
                                             tmp_path / folder)
        for name, param in reloaded.named_parameters():
            if "lora_" in name:
                torch.testing.assert_close(param, expected[name], rtol=0, atol=0)
