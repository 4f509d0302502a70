"""What every data format shares: the source description, the canonical rows, finding columns, refusing rows."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets

from ..loading import DataError

TEXT_FEATURES = datasets.Features({"text": datasets.Value("string"), "problem": datasets.Value("string")})
DIALOGUE_FEATURES = datasets.Features({
    "system": datasets.Value("string"),
    "turns": datasets.Sequence(datasets.Value("string")),
    "problem": datasets.Value("string"),
})
RANKING_FEATURES = datasets.Features({
    "system": datasets.Value("string"),
    "turns": datasets.Sequence(datasets.Value("string")),
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "problem": datasets.Value("string"),
})
"""A ranking row (LLaMA-Factory's `ranking: true` data, for `task: dpo`): the dialogue up to the last question
(`turns` ends with a user turn), and the chosen and the rejected answer to it."""
TXT_UNITS = ("line", "paragraph", "document")


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a run: its files and how to read them (`data.files` + `data.format`, or one `data.sources` item).

    `columns` maps a format's roles (alpaca: prompt, query, response, history, system; sharegpt: messages, system;
    text: prompt) to the file's column names; `tags` names the keys and roles inside sharegpt messages.
    """

    files: tuple[str, ...]
    format: str = "text"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    text_column: str | None = None
    field: str | None = None
    txt_unit: str = "line"
    encoding: str | None = None
    weight: float | None = None
    max_samples: int | None = None
    ranking: bool = False
    """Each row holds a question and two answers, `chosen` and `rejected` (alpaca and sharegpt; `task: dpo`)."""

    def describe(self) -> str:
        return ", ".join(self.files)

    def reading(self, files) -> SourceSpec:
        """These settings for other files, whole: no weight, no max_samples (eval files, a prompt file)."""
        files = [files] if isinstance(files, (str, os.PathLike)) else files
        return dataclasses.replace(self, files=tuple(map(str, files)), weight=None, max_samples=None)


class BadRow(ValueError):
    """A row that cannot become a sample. `reason` completes "rows whose ..." (rows are counted by it); `detail`,
    shown for the first such row, may quote the row's value."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail or reason


@dataclass(frozen=True)
class FormatBinding:
    """A format bound to one file's columns: which column plays which role. Picklable, for `datasets.map` workers."""

    format: str
    columns: dict[str, str | None]
    tags: dict[str, str]
    training: bool = True

    @property
    def ranking(self) -> bool:
        """Bound to a ranking file: its rows become `RANKING_FEATURES` rows."""
        return "chosen" in self.columns

    @property
    def used(self) -> list[str]:
        return [column for column in self.columns.values() if column is not None]

    def convert(self, row: dict) -> dict:
        """The canonical row of `row` (raises `BadRow`)."""
        from . import FORMATS

        return FORMATS[self.format].convert(row, self)


class DataFormat:
    """A data format: finds its columns in a file and turns each row into a canonical text or dialogue row."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "text" or "dialogue"
    column_keys: ClassVar[tuple[str, ...]]
    """The roles `data.columns` may name for this format."""
    uses_tags: ClassVar[bool] = False

    @property
    def features(self) -> datasets.Features:
        return TEXT_FEATURES if self.kind == "text" else DIALOGUE_FEATURES

    def features_of(self, binding: FormatBinding) -> datasets.Features:
        """The canonical rows' features under `binding`: a ranking file's, or the format's own."""
        return RANKING_FEATURES if binding.ranking else self.features

    def bind(self, spec: SourceSpec, column_names: Sequence[str], source: str, *, training: bool = True) -> FormatBinding:
        """The roles of this format found among `column_names` of the file `source`; a missing column is a
        `DataError` that names the file and its columns."""
        raise NotImplementedError

    def convert(self, row: dict, binding: FormatBinding) -> dict:
        raise NotImplementedError

    def unused_hint(self, binding: FormatBinding, unused: Sequence[str]) -> str:
        """A sentence added to the warning about columns no role reads (the likely fix), or ''."""
        return ""


def find_column(
    names: Sequence[str], role: str, requested: str | None, defaults: Sequence[str], *, fmt: str, source: str,
    required: bool,
) -> str | None:
    """The column of `role`: the one the user named (it must exist), else the first default present.

    A required role with no column is a `DataError` naming the file, its columns and the key that maps it.
    """
    listed = ", ".join(names) or "none"
    if requested is not None:
        if requested in names:
            return requested
        close = difflib.get_close_matches(requested, list(names), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"{source}: no column {requested!r} for data.columns.{role} (the file's columns: {listed}).{hint}")
    for default in defaults:
        if default in names:
            return default
    if not required:
        return None
    close = difflib.get_close_matches(defaults[0], list(names), n=1, cutoff=0.6)
    guess = close[0] if close else "NAME"
    return_hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(
        f"{source}: {fmt} data needs a column for `{role}` ({' or '.join(defaults)} by default), and the file's "
        f"columns are {listed}.{return_hint} Name it with data.columns.{role}={guess}."
    )


def ranking_answers(chosen: str, rejected: str, columns: dict[str, str | None]) -> tuple[str, str]:
    """The chosen and the rejected answer of a ranking row; an empty one, or two the same, is a bad row (a pair
    that prefers nothing teaches nothing)."""
    for role, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow(f"`{columns[role]}` is empty (no {role} answer)")
    if chosen.strip() == rejected.strip():
        raise BadRow(f"`{columns['chosen']}` and `{columns['rejected']}` are the same answer",
                     f"`{columns['chosen']}` and `{columns['rejected']}` are the same answer ({chosen.strip()[:40]!r}): "
                     "the pair prefers nothing")
    return chosen, rejected


def cell_text(value: Any, what: str) -> str:
    """A cell as text: None is '', numbers become text; a list or an object is refused (`BadRow`)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        raise BadRow(f"{what} is a list or an object, not text", f"{what} holds {str(value)[:60]!r}, a list or an "
                     "object, not text")
    return str(value)
