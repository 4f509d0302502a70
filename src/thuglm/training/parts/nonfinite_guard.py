"""A NaN / infinite loss or gradient norm stops the run before the optimizer applies it, or skips that step."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...errors import ThuglmError
from ..checkpoints import latest_complete_checkpoint
from .progress import close_progress_bar

logger = logging.getLogger("thuglm.train")

ON_NAN = ("stop", "skip")


class NonFiniteLossError(ThuglmError):
    """The loss or the gradients became NaN / infinite and `on_nan` is `stop`."""


class NonFiniteGuard:
    """Checks every optimizer step after the backward and the clipping, before the optimizer step.

    `on_nan="stop"` stops the run with one message naming the last good checkpoint, so the newest checkpoint stays a
    good one; `on_nan="skip"` drops that step's gradients (the optimizer skips parameters without one), counts it in
    `skipped_nonfinite_steps`, and goes on. With fp16 an infinite gradient norm is the loss scaler's business (it
    skips the step and lowers the scale); a non-finite loss is still caught.

    The check costs one host-device synchronisation a step, where the Trainer's loop reads the gradient norm anyway.
    """

    def __init__(self, *args, on_nan: str = "stop", **kwargs):
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan must be one of {ON_NAN}; got {on_nan!r}")
        super().__init__(*args, **kwargs)
        self.on_nan = on_nan
        self.skipped_nonfinite_steps = 0
        # A non-finite micro-batch loss since the last optimizer step (0: none; a non-finite loss is never 0), kept on
        # the device and read only by the one check each optimizer step makes (see _get_grad_norm).
        self._nonfinite_loss = torch.zeros((), device=self.args.device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        loss_value = loss.detach().float()
        self._nonfinite_loss = torch.where(torch.isfinite(loss_value), self._nonfinite_loss, loss_value)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        bad = self._nonfinite_loss != 0
        if not self.args.fp16 and grad_norm is not None:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
            bad |= ~torch.isfinite(torch.as_tensor(norm, device=self.args.device))
        # Whether to stop or skip must be known before the optimizer step. Every process decides the same, so none
        # is left waiting in a collective.
        if self.accelerator.reduce(bad.float(), reduction="sum").item():
            self._on_nonfinite(model, grad_norm)
        self._nonfinite_loss.zero_()
        return grad_norm

    def _on_nonfinite(self, model, grad_norm) -> None:
        step = self.state.global_step + 1
        loss = float(self._nonfinite_loss)
        what = f"the loss became {loss}" if loss != 0 else f"the gradient norm became {float(grad_norm)}"
        if self.on_nan == "skip":
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            self.skipped_nonfinite_steps += 1
            logger.warning("step %d: %s; skipped this optimizer step (%d skipped so far)", step, what,
                           self.skipped_nonfinite_steps)
            return
        close_progress_bar(self)
        last = latest_complete_checkpoint(Path(self.args.output_dir))
        kept = (f"{last} is the last good checkpoint: resume from it with resume_from_checkpoint=true after the fix"
                if last else "no checkpoint had been written yet")
        raise NonFiniteLossError(self.nonfinite_stop_message(step, what, kept))

    def nonfinite_stop_message(self, step: int, what: str, kept: str) -> str:
        """The message the run stops with (a part that changes when the update happens says so here)."""
        return (f"step {step}: {what}, so the run stopped before the optimizer applied it; {kept}. Lower "
                "learning_rate, use bf16 instead of fp16, or look for broken rows in the data; or set on_nan=skip to "
                "skip such steps.")
