"""ChatGLM-6B's chat prompt and answer post-processing, as the official `chat` does them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..models.prompt import build_prompt, with_system  # noqa: F401  (re-exported: chat, generate and serve use it)

# Half-width punctuation next to a hanzi becomes full-width, as in the official post-processing.
_PUNCTUATION = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")]
_HANZI = r"[\u4e00-\u9fff]"


def answer_token_ids(token_ids: Sequence[int], end_ids: int | Sequence[int] | None) -> list[int]:
    """The generated ids before the first end token (`<eop>`): what the user is shown. Later ids are batch padding.

    The end token is cut rather than decoded: a tokenizer whose `<eop>` piece decodes to text would otherwise show it.
    """
    ends = {end_ids} if isinstance(end_ids, int) else set(end_ids or [])
    token_ids = list(token_ids)
    for index, token in enumerate(token_ids):
        if token in ends:
            return token_ids[:index]
    return token_ids


def process_response(response: str) -> str:
    response = response.strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCTUATION:
        response = re.sub(rf"({_HANZI}){half}", rf"\1{full}", response)
        response = re.sub(rf"{half}({_HANZI})", rf"{full}\1", response)
    return response
