"""Checkpoints and the final model written to a staging folder, and renamed into place when complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..checkpoints import (
    latest_complete_checkpoint,
    publish,
    publish_files,
    staging_root,
    write_error,
    write_failure,
)
from .progress import close_progress_bar


class AtomicCheckpoints:
    """A `checkpoint-N` folder exists only complete (`training/checkpoints.py`: staged, flushed, renamed), so a run
    killed in the middle of a save resumes from the previous one; a save that fails for want of disk space or
    permission stops with one message naming the last complete checkpoint. `save_final_model` does the same for
    the trained model's files in the output folder.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._staging: Path | None = None

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer writes it under the staging folder (see _save_checkpoint).
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = staging_root(run_dir)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if (failure := write_failure(error)) is None:
                raise
            if self.args.should_save:
                shutil.rmtree(self._staging, ignore_errors=True)
            close_progress_bar(self)
            raise write_error(name, failure, run_dir, latest_complete_checkpoint(run_dir)) from error
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its part (sharded FSDP states)
        if self.args.should_save:
            publish(staging_root(run_dir) / name, run_dir / name)
            shutil.rmtree(staging_root(run_dir), ignore_errors=True)
            # Only complete checkpoints carry the name, so the limit counts and keeps complete ones.
            rotate_checkpoints(
                output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def save_final_model(self, output_dir: Path) -> None:
        """`save_model(output_dir)`, staged like a checkpoint: each file appears whole or not at all."""
        staged = staging_root(output_dir) / "final"
        try:
            self.save_model(str(staged))
        except Exception as error:
            if (failure := write_failure(error)) is None:
                raise
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            last = latest_complete_checkpoint(output_dir)
            raise write_error("the trained model", failure, output_dir, last) from error
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_files(staged, output_dir)
            shutil.rmtree(staging_root(output_dir), ignore_errors=True)
        self.accelerator.wait_for_everyone()
