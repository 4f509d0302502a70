"""The Trainer's progress bar, closed before a message that ends the run."""

from __future__ import annotations

from transformers import Trainer
from transformers.trainer_callback import ProgressCallback


def close_progress_bar(trainer: Trainer) -> None:
    """End the progress bar's line, so that the error message that follows starts on a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if isinstance(callback, ProgressCallback) and bar is not None:
            bar.close()
            callback.training_bar = None
