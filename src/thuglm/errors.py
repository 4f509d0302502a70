"""The one error type the `thuglm` command turns into a one-line message and exit status 2.

Every problem a user can fix (a bad config key, a broken data file, a model folder without weights, a full disk
during a save, a loss that became NaN) is raised as a subclass of `ThuglmError`, with a message that names the
file (and row, column or key) and says what to do. `thuglm --debug ...` shows the traceback as well.
"""

from __future__ import annotations

INTERRUPTED_STATUS = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


class ThuglmError(Exception):
    """An error whose message is meant for the user: the CLI prints `thuglm: <message>` and exits with
    `exit_status` (2: bad input; a run stopped by Ctrl-C says 130, as a shell does)."""

    exit_status = 2
