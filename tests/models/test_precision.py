"""One rule for `auto` precision, with training and inference differing only where they say so (an older GPU)."""

from __future__ import annotations

import pytest
import torch

from thuglm.inference.loading import resolve_dtype
from thuglm.models.precision import auto_precision
from thuglm.training.methods import resolve_precision


@pytest.mark.parametrize(
    ("cuda", "bf16", "training", "inference"),
    [
        (False, False, "fp32", torch.float32),  # the CPU
        (True, True, "bf16", torch.bfloat16),  # Ampere and later
        (True, False, "fp16", torch.float32),  # an older GPU: mixed fp16 for training, fp32 to answer
    ],
    ids=["cpu", "gpu-with-bf16", "gpu-without-bf16"],
)
def test_auto_means_the_same_for_training_and_inference_but_on_an_older_gpu(monkeypatch, cuda, bf16, training,
                                                                             inference):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert auto_precision(without_bf16="fp16") == resolve_precision("auto") == training
    assert resolve_dtype("auto") == inference
