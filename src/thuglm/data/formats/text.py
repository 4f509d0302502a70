"""`data.format: text`: one text column, trained whole (causal language modelling)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..loading import guess_text_column
from .base import BadRow, DataFormat, FormatBinding, SourceSpec, cell_text


class TextFormat(DataFormat):
    name = "text"
    kind = "text"
    column_keys = ("prompt",)  # LLaMA-Factory's pre-training entries: "columns": {"prompt": "text"}

    def bind(self, spec: SourceSpec, column_names: Sequence[str], source: str, *, training: bool = True) -> FormatBinding:
        requested = spec.text_column or spec.columns.get("prompt")
        column = guess_text_column(column_names, requested, source=source)
        # A paragraph or document of a .txt file keeps its inner line breaks, not the blank lines around it.
        whole = spec.txt_unit != "line" and ".txt" in Path(source).suffixes
        return FormatBinding(self.name, {"prompt": column}, {"strip_newlines": "yes"} if whole else {}, training)

    def convert(self, row: dict, binding: FormatBinding) -> dict:
        column = binding.columns["prompt"]
        text = cell_text(row.get(column), f"`{column}`")
        if binding.tags.get("strip_newlines"):
            text = text.strip("\r\n")
        if not text.strip():
            raise BadRow(f"`{column}` is empty")
        return {"text": text}

    def unused_hint(self, binding: FormatBinding, unused: Sequence[str]) -> str:
        column = binding.columns["prompt"]
        return (f"If `{unused[0]}` is the answer to `{column}`, train both with data.format=alpaca "
                f"data.columns.prompt={column} data.columns.response={unused[0]}.")
