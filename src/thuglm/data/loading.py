"""Reading user data files with `datasets`: files, folders and globs of CSV / JSON / JSONL / parquet / TXT.

`datasets` does the reading (Arrow memory-mapping, a fingerprinted cache, streaming); this module turns what a user
writes in a config (`data/corpus`, `data/*.csv`, `a.json`) into its `data_files`, and its failures into messages
that name the file and say how to fix it.
"""

from __future__ import annotations

import difflib
import glob
import logging
from collections.abc import Sequence
from pathlib import Path

import datasets

logger = logging.getLogger("thuglm.data")

# extension -> (datasets builder, extra builder arguments)
BUILDERS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
OBVIOUS_TEXT_COLUMNS = ("content", "text", "sentence")


class DataError(ValueError):
    """Bad user data. The message names the file (and row / column where it applies) and says how to fix it."""


def _supported() -> str:
    return " ".join(BUILDERS)


def resolve_data_files(patterns: str | Sequence[str]) -> list[Path]:
    """The data files that files, folders (searched recursively) and globs name, sorted and without repeats.

    Inside a folder, hidden files and files of other types (a README, a .DS_Store) are skipped; a file named
    explicitly must be of a supported type.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    found: dict[Path, None] = {}
    for pattern in patterns:
        for path in _expand(str(pattern)):
            found.setdefault(path.resolve(), None)
    return sorted(found)


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [
            p for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise DataError(f"folder {path} holds no data files; thuglm reads {_supported()}")
        return files
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: files of type '{path.suffix or '(none)'}' are not read; use one of {_supported()}")
        return [path]
    if glob.has_magic(pattern):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        files = [p for p in matches if p.is_file() and p.suffix.lower() in BUILDERS]
        if not files:
            raise DataError(f"`{pattern}` matches no data files ({_supported()})")
        return files
    raise DataError(f"{path} does not exist; check `data.files` (files, folders or globs such as data/*.csv)")


def load_raw_dataset(
    patterns: str | Sequence[str],
    *,
    streaming: bool = False,
    cache_dir: str | None = None,
    columns: Sequence[str] | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """One `datasets` table of every row in the named files; `columns` keeps only those (files of several types
    then combine even when their other columns differ)."""
    files = resolve_data_files(patterns)
    groups: dict[tuple[str, tuple], list[str]] = {}
    for path in files:
        builder, kwargs = BUILDERS[path.suffix.lower()]
        groups.setdefault((builder, tuple(sorted(kwargs.items()))), []).append(str(path))
    parts = []
    for (builder, kwargs), group_files in groups.items():
        part = _load_group(builder, dict(kwargs), group_files, streaming, cache_dir)
        if columns is not None:
            part = _select(part, columns, group_files)
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    try:
        # Builders disagree on small things (parquet written by pandas holds large_string, JSON string): align the
        # schemas on the first file's before concatenating.
        first = parts[0].features
        parts = [part if part.features == first or first is None else part.cast(first) for part in parts]
        return datasets.concatenate_datasets(parts)
    except (ValueError, TypeError) as error:
        raise DataError(
            f"the data files have different columns and cannot be combined ({error}); keep one kind of file per run"
        ) from None


def _load_group(builder: str, kwargs: dict, files: list[str], streaming: bool, cache_dir: str | None):
    try:
        return datasets.load_dataset(
            builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise DataError(f"could not read {', '.join(files)} as {builder}: {cause}") from None


def _select(dataset, columns: Sequence[str], files: list[str]):
    present = dataset.column_names or []
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{', '.join(files)}: no column {', '.join(missing)}; the columns are {', '.join(present)}")
    return dataset.select_columns(list(columns))


def guess_text_column(column_names: Sequence[str], requested: str | None, source: str) -> str:
    """The column that holds the text: the one asked for, else an obvious name, else the only column."""
    columns = list(column_names)
    if requested is not None:
        if requested in columns:
            return requested
        close = difflib.get_close_matches(requested, columns, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise DataError(f"{source}: no column `{requested}`; the columns are {', '.join(columns)}.{hint}")
    for name in OBVIOUS_TEXT_COLUMNS:
        if name in columns:
            return name
    if len(columns) == 1:
        return columns[0]
    raise DataError(
        f"{source}: cannot tell which column holds the text (columns: {', '.join(columns)}); "
        "set it with `data.text_column=NAME`"
    )
