"""File modes of what thuglm writes: the trained model is meant to be read by other users and services."""

from __future__ import annotations

import stat
from pathlib import Path


def give_files_the_folder_mode(folder: Path) -> None:
    """Every file in `folder` gets the mode the umask gives new files, read off the folder's own mode.

    safetensors writes its files 0600 whatever the umask, which would keep the weights from other users and
    services. The folder was made by `mkdir` (0777 less the umask), so its mode without the execute bits is what
    `open` gives a new file, without changing the process's umask to read it.
    """
    file_mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)
