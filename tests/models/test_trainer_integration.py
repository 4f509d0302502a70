"""ChatGLM under the transformers Trainer, with and without a peft LoRA adapter."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from thuglm.data import causal_lm_sample

TEXTS = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]


def collate(tokenizer):
    def pad(samples):
        features = [{"input_ids": s["input_ids"]} for s in samples]
        batch = tokenizer.pad(features, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.tensor([[-100] * (width - len(s["labels"])) + s["labels"] for s in samples])
        return batch

    return pad


@pytest.mark.parametrize("use_lora", [False, True])
def test_trainer_lowers_the_loss_and_saves(tiny_dir, tokenizer, tmp_path, use_lora):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if use_lora:
        from peft import LoraConfig, get_peft_model

        targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    ids = tokenizer.encode_text(TEXTS)
    samples = [causal_lm_sample(t, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
               for t in ids] * 8
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=30,
        learning_rate=3e-2 if use_lora else 1e-2,
        logging_steps=1,
        save_steps=30,
        gradient_checkpointing=True,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate(tokenizer))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.3  # nats; a random tiny model starts near ln(vocab) = 8.2
    assert (tmp_path / "run" / "checkpoint-30").is_dir()
    saved = tmp_path / "run" / "checkpoint-30"
    assert (saved / ("adapter_model.safetensors" if use_lora else "model.safetensors")).is_file()
