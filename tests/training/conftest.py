"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from thuglm.training.trainer import GlmTrainer


@pytest.fixture
def nan_at_step_7(monkeypatch):
    """The loss of the 7th optimizer step becomes NaN, as a bad batch or an fp16 overflow makes it."""
    original = GlmTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step != 6:
            return result
        if isinstance(result, tuple):
            return (result[0] * float("nan"), *result[1:])
        return result * float("nan")

    monkeypatch.setattr(GlmTrainer, "compute_loss", poisoned)
