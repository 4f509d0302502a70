"""How often a training step reads a value back from the device (on a GPU each read stops the host until the GPU
has caught up, and under several processes the reads of collectives hold them in lockstep).

Every such read is an `aten._local_scalar_dense` call (`.item()`, `float()`, `int()`, `bool()` of a tensor), which
a dispatch mode sees on the CPU as on a GPU. Runs of 3 and 7 optimizer steps differ only by 4 steps (the loss is
logged at step 1 only, no checkpoint, no evaluation), so their difference / 4 is the steady per-step count.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from thuglm.training import recipe

from .test_train_e2e import base_settings, write_config


class CountDeviceReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def device_reads(tmp_path, steps: int, **settings) -> int:
    values = base_settings(tmp_path / str(steps), method="lora", max_steps=steps, logging_steps=1000, save_steps=0,
                           report_to=[], **settings)
    values.pop("eval_steps")
    values["data"]["validation_split"] = 0.0
    (tmp_path / str(steps)).mkdir()
    config = recipe.load_config(str(write_config(tmp_path / str(steps), **values)), [])
    with CountDeviceReads() as counter:
        recipe.train(config)
    return counter.reads


def test_a_step_reads_from_the_device_twice_the_position_check_and_the_nan_check(tmp_path):
    # One read a forward (the strict <sop>/[gMASK] check of the position ids), one an optimizer step (whether the
    # loss or the gradients went non-finite, needed before the optimizer applies them). The token count, the
    # Trainer's NaN filter and the gradient norm used to add four more a micro-batch.
    assert (device_reads(tmp_path, 7) - device_reads(tmp_path, 3)) / 4 == 2


def test_with_accumulation_the_forward_reads_once_a_micro_batch_and_the_nan_check_once_a_step(tmp_path):
    reads = device_reads(tmp_path, 7, batch_size=2, gradient_accumulation_steps=2) - device_reads(
        tmp_path, 3, batch_size=2, gradient_accumulation_steps=2)
    assert reads / 4 == 2 + 1
