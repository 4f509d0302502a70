"""Data formats: how a raw row of a user's file becomes text or a dialogue, in one canonical shape.

Every format turns a row into one of two canonical rows, whatever its columns are called:

* `text` rows: {"text": str}, for causal language modelling on all of it;
* dialogue rows: {"system": str, "turns": [user, assistant, user, assistant, ...]}, which `thuglm.data.dialogue`
  lays out as one sample per assistant answer (ChatGLM-6B's `[Round i]` prompt of the turns before it).

A row that cannot be converted (an empty answer, two user turns in a row, a list where text belongs) is not dropped:
its canonical row is empty and its `problem` says why, and the loader skips and counts it or stops, as
`data.on_bad_row` says, naming the file and row.

A format is one module with one class, registered in `FORMATS` below. The vocabulary is LLaMA-Factory's
(`dataset_info.json`): `columns` (prompt, query, response, history, system, messages) and `tags` (role_tag,
content_tag, user_tag, assistant_tag, system_tag), so an entry of that file translates key for key.
"""

from __future__ import annotations

from .alpaca import AlpacaFormat
from .base import (
    DIALOGUE_FEATURES,
    TEXT_FEATURES,
    BadRow,
    DataFormat,
    FormatBinding,
    SourceSpec,
)
from .sharegpt import ShareGptFormat
from .text import TextFormat

FORMATS: dict[str, DataFormat] = {fmt.name: fmt for fmt in (TextFormat(), AlpacaFormat(), ShareGptFormat())}
"""Every data format by its `data.format` name."""


def get_format(name: str) -> DataFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown data format {name!r}; known: {', '.join(FORMATS)}") from None


__all__ = [
    "DIALOGUE_FEATURES",
    "FORMATS",
    "TEXT_FEATURES",
    "BadRow",
    "DataFormat",
    "FormatBinding",
    "SourceSpec",
    "get_format",
]
