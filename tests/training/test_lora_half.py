"""LoRA on a bf16 base: inside the Trainer's forward (autocast) peft's fp32 copies of adapter inputs are skipped."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import TrainingArguments

from thuglm.models import ChatGLMForConditionalGeneration
from thuglm.training.trainer import GlmTrainer


def lora_model(tiny_dir):
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["dense", "dense_h_to_4h", "dense_4h_to_h"],
                        init_lora_weights=False)
    return get_peft_model(base, config)


def casting(model) -> set[bool]:
    return {module.cast_input_dtype_enabled for module in model.modules() if isinstance(module, BaseTunerLayer)}


def sample(model):
    ids = torch.randint(20, 3000, (2, 16))
    ids[:, 6], ids[:, 7] = model.config.gmask_token_id, model.config.bos_token_id
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "labels": labels}


def test_adapter_inputs_stay_bf16_under_the_trainers_autocast_only(tiny_dir, tmp_path):
    model = lora_model(tiny_dir)
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
    trainer = GlmTrainer(model=model, args=args)
    assert trainer.accelerator.mixed_precision == "bf16"
    batch = sample(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_copies = model(**batch).loss
    seen = []
    real_forward = model.base_model.model.transformer.layers[0].attention.dense.lora_A["default"].forward

    def spy(x):
        seen.append(x.dtype)
        return real_forward(x)

    model.base_model.model.transformer.layers[0].attention.dense.lora_A["default"].forward = spy
    with trainer.compute_loss_context_manager():
        assert casting(model) == {False}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            without = model(**batch).loss
    assert casting(model) == {True}  # a PeftModel used outside the Trainer keeps peft's casting
    assert seen == [torch.bfloat16]  # no fp32 copy of the adapter's input
    torch.testing.assert_close(without, with_copies, rtol=1e-2, atol=1e-2)
    without.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)  # fp32 adapters, fp32 grads


def test_fp32_runs_keep_peft_casting(tiny_dir, tmp_path):
    model = lora_model(tiny_dir).float()
    trainer = GlmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with trainer.compute_loss_context_manager():
        assert casting(model) == {True}
