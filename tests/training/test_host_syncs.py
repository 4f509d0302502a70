"""How often a training step reads a value back from the device (on a GPU each read stops the host until the GPU
has caught up, and under several processes the reads of collectives hold them in lockstep).

Every such read is an `aten._local_scalar_dense` call (`.item()`, `float()`, `int()`, `bool()` of a tensor), which
a dispatch mode sees on the CPU as on a GPU. Reads while collating a batch are left out: the collator works on the
data loader's CPU tensors, before anything goes to the device. Runs of 3 and 7 optimizer steps differ only by 4 steps
(`short_lora_run_config`), so their difference / 4 is the steady per-step count.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from thuglm.data import GlmCollator
from thuglm.training import recipe

from .test_train_e2e import short_lora_run_config


class CountDeviceReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0
        self.collating = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.collating:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def not_counting(self, collate):
        def collate_uncounted(collator, features):
            self.collating = True
            try:
                return collate(collator, features)
            finally:
                self.collating = False

        return collate_uncounted


def device_reads(tmp_path, steps: int, monkeypatch, **settings) -> int:
    config = short_lora_run_config(tmp_path / str(steps), steps, **settings)
    counter = CountDeviceReads()
    with monkeypatch.context() as patch, counter:
        patch.setattr(GlmCollator, "__call__", counter.not_counting(GlmCollator.__call__))
        recipe.train(config)
    return counter.reads


def test_a_step_reads_from_the_device_once_the_nan_check(tmp_path, monkeypatch):
    # One read an optimizer step: whether the loss or the gradients went non-finite, needed before the optimizer
    # applies them. The token count, the Trainer's NaN filter, the gradient norm and the forward's check of the
    # position ids (now the collator's, on the CPU) used to add five more a micro-batch.
    assert (device_reads(tmp_path, 7, monkeypatch) - device_reads(tmp_path, 3, monkeypatch)) / 4 == 1


def test_with_accumulation_a_step_still_reads_once(tmp_path, monkeypatch):
    reads = device_reads(tmp_path, 7, monkeypatch, batch_size=2, gradient_accumulation_steps=2) - device_reads(
        tmp_path, 3, monkeypatch, batch_size=2, gradient_accumulation_steps=2)
    assert reads / 4 == 1
