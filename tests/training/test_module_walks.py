"""The training loop's walks over the module tree.

The Trainer calls `model.train()` and `model.zero_grad()` every step, counts the parameters for its FLOP estimate and
collects them to clip the gradients; each walks all modules (~1,400 for LoRA on ChatGLM-6B, ~5 ms of Python), on a
host that a LoRA step on a GPU keeps busy. GlmTrainer does each walk once per run, and must still behave as torch's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from thuglm.training import recipe
from thuglm.training import trainer as trainer_module
from thuglm.training.parts.module_walks import WalkShortcuts

from .test_train_e2e import short_lora_run_config


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(4, 2)))


def test_shortcut_train_and_eval_set_every_module_as_torch_does():
    model = small_model()
    walks = WalkShortcuts(model)
    assert model.eval() is model
    assert not any(module.training for module in model.modules())
    model[2].train()  # one module switched on its own: train() must still reach the others
    assert model.train() is model
    assert all(module.training for module in model.modules())
    model.train()
    assert all(module.training for module in model.modules())
    walks.remove()
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__
    assert model.train.__func__ is torch.nn.Module.train


@pytest.mark.parametrize("set_to_none", [True, False])
def test_shortcut_zero_grad_clears_every_gradient(set_to_none):
    model = small_model()
    WalkShortcuts(model)
    model(torch.ones(3, 4)).sum().backward()
    model.zero_grad(set_to_none=set_to_none)
    for parameter in model.parameters():
        assert parameter.grad is None if set_to_none else not parameter.grad.any()


def walks_and_trainer(tmp_path, steps: int, monkeypatch, precision: str = "fp32") -> tuple[int, object]:
    walks = {"count": 0}
    named_modules = torch.nn.Module.named_modules

    def counted(self, memo=None, prefix="", remove_duplicate=True):
        if memo is None:  # a walk starts here; the recursion passes its memo on
            walks["count"] += 1
        return named_modules(self, memo, prefix, remove_duplicate)

    config = short_lora_run_config(tmp_path / f"{precision}-{steps}", steps, precision=precision)
    trainers = []
    monkeypatch.setattr(trainer_module, "GlmTrainer", _recording(trainer_module.GlmTrainer, trainers))
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "named_modules", counted)
        recipe.train(config)
    return walks["count"], trainers[0]


def _recording(cls, trainers: list):
    class Recorded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    return Recorded


# bf16: the forward also turns peft's casting of adapter inputs off and on each micro-batch (two walks with peft's
# helper, none over the adapter layers GlmTrainer lists once).
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_walks_no_module_tree_and_the_trainer_estimates_flops_as_before(tmp_path, monkeypatch,
                                                                                        precision):
    few, _ = walks_and_trainer(tmp_path, 3, monkeypatch, precision)
    more, trainer = walks_and_trainer(tmp_path, 7, monkeypatch, precision)
    assert (more - few) / 4 == 0  # before: train(), zero_grad(), the clipping and the FLOP count, each a walk a step
    assert trainer.accelerator.mixed_precision == ("no" if precision == "fp32" else precision)
    model = trainer.model
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__
    batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
