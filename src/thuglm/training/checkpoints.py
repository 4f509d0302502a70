"""Checkpoints that are never half-written, and an output_dir checked before anything is written to it.

A checkpoint is what a user keeps after a crash, so it must be either complete or absent:

* every save goes to a hidden staging folder (`output_dir/.saving/checkpoint-N`), its files are flushed to disk,
  and only then is it renamed to `output_dir/checkpoint-N`, one atomic rename on a POSIX file system. A run killed
  while saving (kill -9, OOM killer, preemption, power loss) leaves the previous checkpoint as the newest;
* `save_total_limit` then deletes the oldest complete checkpoints beyond the limit, never the one just written;
* a save that fails (a full disk, a quota) removes its staging folder and stops the run with a message that names
  the checkpoint to resume from.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import ThuglmError
from ..files import give_files_the_folder_mode

logger = logging.getLogger("thuglm.train")

STAGING_DIR = ".saving"
"""Hidden, so that the Trainer's checkpoint sorting, `save_total_limit` and resume never take it for a checkpoint."""
RUN_MARKERS = ("trainer_state.json", "metrics.json", "adapter_config.json", "model.safetensors")


class CheckpointWriteError(ThuglmError):
    """A checkpoint or the final model could not be written (disk full, no permission)."""


class OutputDirError(ThuglmError):
    """output_dir cannot be written, or holds an earlier run that this one would overwrite."""


def check_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse an output_dir that cannot be written or that holds another run, before any work is done.

    Nothing is created here: a run that stops on bad input leaves no folder behind.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} is a file, not a folder: choose another output_dir")
    existing = output_dir if output_dir.is_dir() else _nearest_existing_parent(output_dir)
    if existing is None or not existing.is_dir():
        raise OutputDirError(
            f"output_dir {output_dir} cannot be created: {existing} is not a folder. Choose another output_dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(
            f"output_dir {output_dir} cannot be written: no write permission in {existing}. Choose a folder you "
            "can write to, or change its permissions."
        )
    if output_dir.is_dir() and not resuming and not overwrite:
        earlier = sorted(path.name for path in output_dir.iterdir()
                         if path.name.startswith("checkpoint-") or path.name in RUN_MARKERS)
        if earlier:
            raise OutputDirError(
                f"output_dir {output_dir} already holds a run ({', '.join(earlier[:4])}"
                f"{', ...' if len(earlier) > 4 else ''}). Continue it with resume_from_checkpoint=true, choose "
                "another output_dir, or set overwrite_output_dir=true to start afresh there."
            )


def start_afresh(output_dir: Path) -> None:
    """`overwrite_output_dir=true`: delete the earlier run's checkpoints, so that no later resume takes one."""
    for path in sorted(output_dir.glob("checkpoint-*")):
        if path.is_dir():
            logger.warning("overwrite_output_dir: deleting %s of an earlier run", path)
            shutil.rmtree(path)


def _nearest_existing_parent(path: Path) -> Path | None:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return None


def latest_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N folder that was fully written.

    Checkpoints appear by an atomic rename, so every checkpoint-N is complete; a folder without trainer_state.json
    (which the Trainer writes last) can only come from a version of thuglm that wrote checkpoints in place, killed
    while saving. It is skipped: resuming from it would fail, while the one before it is intact.
    """
    from transformers.trainer_utils import sort_checkpoints

    if not output_dir.is_dir():
        return None
    for folder in reversed(sort_checkpoints(str(output_dir))):
        if (Path(folder) / "trainer_state.json").is_file():
            return folder
        logger.warning("skipping %s: it was not completely written (the run stopped while saving it)", folder)
    return None


def staging_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / STAGING_DIR


def remove_stale_staging(output_dir: str | os.PathLike) -> None:
    """What a run killed while saving left behind: never a checkpoint, so it goes."""
    stale = staging_root(output_dir)
    if stale.is_dir():
        logger.warning("removing %s: a save that a killed run did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Flush the files of `staged` to disk, then rename it to `final` in one step (replacing an older `final`)."""
    give_files_the_folder_mode(staged)
    for path in staged.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(staged)
    if final.exists():  # a re-save of the same step (after a resume): move the old one out of the way first
        old = staged.parent / f"{final.name}.old"
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync(final.parent)


def publish_files(staged: Path, final_dir: Path) -> None:
    """Move every file of `staged` into `final_dir`, each replaced in one step (for the final model's files)."""
    final_dir.mkdir(parents=True, exist_ok=True)
    give_files_the_folder_mode(staged)
    for path in sorted(staged.rglob("*")):
        target = final_dir / path.relative_to(staged)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            _fsync(path)
            os.replace(path, target)
    _fsync(final_dir)
    shutil.rmtree(staged, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot fsync a folder; the rename is still atomic there
        if error.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_failure(error: Exception) -> OSError | None:
    """The OS error behind a failed write, or None if `error` is not one.

    safetensors reports I/O errors as its own `SafetensorError` ("... I/O error: File too large (os error 27)").
    """
    if isinstance(error, OSError):
        return error
    if type(error).__name__ == "SafetensorError" and (code := re.search(r"os error (\d+)", str(error))):
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    return None


def write_error(what: str, error: OSError, output_dir: str | os.PathLike, last_good: str | None) -> CheckpointWriteError:
    """The message for a save that failed: what failed, why, and what is left to resume from."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some disk space (or lower save_total_limit)"
    else:
        fix = "fix the cause"
    resume = (f"the newest complete checkpoint, {Path(last_good).name}, is intact: {fix}, then run again with "
              "resume_from_checkpoint=true") if last_good else f"no checkpoint was completed yet: {fix} and run again"
    where = f" ({error.filename})" if error.filename else ""
    return CheckpointWriteError(f"could not write {what} in {output_dir}: {reason}{where}; {resume}")
