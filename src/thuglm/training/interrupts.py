"""Ctrl-C (SIGINT) and SIGTERM during `thuglm train`: one line, exit status 130, no half-written checkpoint.

The first signal stops the run where it is: the training loop unwinds as from a `KeyboardInterrupt`, the save in
progress (if any) is left in the staging folder and removed, and the run ends with
`thuglm: interrupted at step N; the newest complete checkpoint is checkpoint-M (resume with ...)`. Unwinding can
take a moment (a dataloader, a collective under several processes); a second signal ends the process at once.

SIGTERM is taken as SIGINT: it is what a job scheduler sends, and what torchrun sends every process of a
`thuglm train --nproc N` run once one of them has stopped, so all of them stop and the launcher exits with 130.
Ctrl-C in a terminal reaches torchrun and its processes alike, and torchrun passes its own on a moment later: signals
that arrive within `SAME_INTERRUPT_S` of the first count as that one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from ..errors import INTERRUPTED_STATUS, ThuglmError

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_INTERRUPT_S = 0.5  # a person's second Ctrl-C comes later than torchrun's copy of the first


class TrainingInterrupted(ThuglmError):
    """The run was stopped by Ctrl-C or SIGTERM; the message names the checkpoint to resume from."""

    exit_status = INTERRUPTED_STATUS


def interrupted_message(step: int, last_checkpoint: str | None) -> str:
    if last_checkpoint is None:
        return f"interrupted at step {step}; no checkpoint had been written yet, so a new run starts from the beginning"
    name = os.path.basename(last_checkpoint)
    return (f"interrupted at step {step}; the newest complete checkpoint is {name} "
            "(resume with resume_from_checkpoint=true)")


@contextlib.contextmanager
def stop_on_signals():
    """Inside: SIGINT and SIGTERM raise `KeyboardInterrupt` once; any later one exits the process at once (130).

    Outside the main thread (where Python cannot install handlers) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first_at = []

    def stop_now(signum, frame):
        if time.monotonic() - first_at[0] < SAME_INTERRUPT_S:
            return
        sys.stderr.write("\nthuglm: stopped\n")
        sys.stderr.flush()
        os._exit(INTERRUPTED_STATUS)

    def stop_gracefully(signum, frame):
        first_at.append(time.monotonic())
        for handled in previous:
            signal.signal(handled, stop_now)
        raise KeyboardInterrupt

    # A signal ignored when the process started (`nohup`, a background job of a script) stays ignored.
    previous = {handled: signal.signal(handled, stop_gracefully) for handled in HANDLED_SIGNALS
                if signal.getsignal(handled) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for handled, handler in previous.items():
            signal.signal(handled, handler)
