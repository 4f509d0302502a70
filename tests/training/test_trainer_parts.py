"""Each part of thuglm's Trainer (training/parts/) taken alone by a plain `transformers.Trainer`: a part works
without the others, so other trainers (TRL's, a new task's) can take the ones they need."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from thuglm.models import ChatGLMForConditionalGeneration
from thuglm.training.checkpoints import STAGING_DIR
from thuglm.training.optim import Adafactor
from thuglm.training.parts import (
    AdapterCastingOff,
    AtomicCheckpoints,
    FaithfulSaving,
    ModuleWalksOnce,
    NonFiniteGuard,
    NonFiniteLossError,
    OptimizerInBackward,
    TokenCounting,
)
from thuglm.training.parts.adapter_casting import adapter_layers


def with_part(part: type) -> type[Trainer]:
    return type(f"{part.__name__}Trainer", (part, Trainer), {})


def rows(model_config, count: int = 8, length: int = 12, padding: int = 0) -> list[dict]:
    """Rows laid out as ChatGLM trains them (prompt [gMASK] <sop> answer), `padding` zeros of mask on the left."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(20, 3000, (length,), generator=generator)
        ids[4], ids[5] = model_config.gmask_token_id, model_config.bos_token_id
        labels = ids.clone()
        labels[:6] = -100
        mask = torch.ones(length, dtype=torch.long)
        mask[:padding] = 0
        labels[:padding] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                    save_strategy="no", use_cpu=True, report_to=[], learning_rate=1e-3, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.fixture
def tiny_model(tiny_dir):
    return ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")


def test_token_counting_counts_unmasked_tokens_logs_tokens_per_s_and_the_mean_step_loss(tiny_model, tmp_path):
    trainer = with_part(TokenCounting)(model=tiny_model, args=arguments(tmp_path),
                                       train_dataset=rows(tiny_model.config, padding=3))
    result = trainer.train()
    assert trainer.state.num_input_tokens_seen == trainer.session_tokens == 3 * 2 * (12 - 3)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all("tokens_per_s" in entry for entry in trainer.state.log_history if "loss" in entry)
    assert result.training_loss == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def poison(trainer_class: type[Trainer], at_step: int) -> type[Trainer]:
    class Poisoned(trainer_class):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step == at_step else loss

    return Poisoned


def test_nonfinite_guard_stops_before_the_update_or_skips_the_step(tiny_model, tmp_path):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    stopping = poison(with_part(NonFiniteGuard), at_step=0)(model=tiny_model, args=arguments(tmp_path),
                                                            train_dataset=rows(tiny_model.config))
    with pytest.raises(NonFiniteLossError, match="step 1: the loss became nan, so the run stopped before"):
        stopping.train()
    assert all(torch.equal(before[name], p) for name, p in tiny_model.named_parameters())  # nothing applied

    skipping = poison(with_part(NonFiniteGuard), at_step=1)(model=tiny_model, args=arguments(tmp_path),
                                                            train_dataset=rows(tiny_model.config), on_nan="skip")
    skipping.train()
    assert skipping.skipped_nonfinite_steps == 1 and skipping.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())


def test_atomic_checkpoints_publish_complete_folders_and_a_failed_save_leaves_none(tiny_model, tmp_path, monkeypatch):
    args = arguments(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer = with_part(AtomicCheckpoints)(model=tiny_model, args=args, train_dataset=rows(tiny_model.config))
    trainer.train()
    out = Path(args.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # no staging folder left
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()

    shutil.rmtree(out)
    failing = with_part(AtomicCheckpoints)(model=tiny_model, args=args, train_dataset=rows(tiny_model.config))
    real_save = Trainer._save

    def full_disk(self, output_dir=None, state_dict=None):
        if self.state.global_step == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, output_dir, state_dict)

    monkeypatch.setattr(Trainer, "_save", full_disk)
    with pytest.raises(Exception, match="checkpoint-2.*checkpoint-1|checkpoint-1.*checkpoint-2"):
        failing.train()
    assert sorted(p.name for p in out.iterdir() if p.name != STAGING_DIR) == ["checkpoint-1"]


def test_adapter_casting_off_holds_through_checkpointed_recomputation(tiny_dir, tmp_path):
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["dense_h_to_4h", "dense_4h_to_h"]))
    args = arguments(tmp_path, bf16=True, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    trainer = with_part(AdapterCastingOff)(model=model, args=args, train_dataset=rows(model.config))
    trainer.train()  # a recomputation that cast where the forward had not would raise torch's CheckpointError
    assert all(layer.cast_input_dtype_enabled for layer in adapter_layers(model))  # as they were, after


def test_module_walks_once_shortcuts_train_and_zero_grad_during_training_only(tiny_model, tmp_path):
    seen = []

    class Spy(with_part(ModuleWalksOnce)):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            seen.append("train" in model.__dict__ and "zero_grad" in model.__dict__)
            return loss

    Spy(model=tiny_model, args=arguments(tmp_path), train_dataset=rows(tiny_model.config)).train()
    assert seen == [True, True, True]
    assert "train" not in tiny_model.__dict__ and "zero_grad" not in tiny_model.__dict__


def test_optimizer_in_backward_updates_in_the_backward_and_reports_the_gradient_norm(tiny_model, tmp_path):
    args = arguments(tmp_path, max_grad_norm=0.0)
    trainer = with_part(OptimizerInBackward)(
        model=tiny_model, args=args, train_dataset=rows(tiny_model.config), optimizer_in_backward=True,
        optimizer_cls_and_kwargs=(Adafactor, {"lr": 1e-3}),
    )
    before = tiny_model.transformer.layers[0].mlp.dense_h_to_4h.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, tiny_model.transformer.layers[0].mlp.dense_h_to_4h.weight)
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == 3 and all(norm > 0 for norm in norms)
    assert all(p.grad is None for p in tiny_model.parameters())  # each freed as soon as it was applied


def test_faithful_saving_writes_the_loaded_dtype_and_one_copy_of_tied_weights(tiny_dir, tmp_path):
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    trainer = with_part(FaithfulSaving)(model=model, args=arguments(tmp_path))
    upcast = {name: tensor.float() for name, tensor in model.state_dict().items()}  # as FSDP gathers them
    upcast["lm_head.weight"] = upcast["transformer.word_embeddings.weight"].clone()
    trainer._save(str(tmp_path / "saved"), state_dict=upcast)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert "lm_head.weight" not in saved
    assert {tensor.dtype for tensor in saved.values() if tensor.is_floating_point()} == {torch.bfloat16}


def test_parts_compose_with_trls_sft_trainer(tiny_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from thuglm.data.collator import GlmCollator
    from thuglm.models import ChatGLMTokenizer

    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    data = Dataset.from_list([{key: value.tolist() for key, value in row.items()}
                              for row in rows(model.config, padding=2)])

    class GuardedSFT(NonFiniteGuard, AtomicCheckpoints, TokenCounting, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, save_steps=1,
                         logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True})
    trainer = GuardedSFT(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         data_collator=GlmCollator.for_model(tokenizer.pad_token_id, model.config))
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1", "checkpoint-2"]
    assert trainer.state.num_input_tokens_seen == 2 * 2 * (12 - 2)

    poisoned = poison(GuardedSFT, at_step=1)(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                             data_collator=GlmCollator.for_model(tokenizer.pad_token_id, model.config))
    with pytest.raises(NonFiniteLossError, match="step 2: the loss became nan"):
        poisoned.train()
