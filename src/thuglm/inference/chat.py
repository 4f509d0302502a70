"""ChatGLM-6B's chat prompt and answer post-processing, as the official `chat` does them."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Half-width punctuation next to a hanzi becomes full-width, as in the official post-processing.
_PUNCTUATION = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")]
_HANZI = r"[\u4e00-\u9fff]"


def build_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The official multi-round prompt; a first question goes in bare, with no round header."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(response: str) -> str:
    response = response.strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCTUATION:
        response = re.sub(rf"({_HANZI}){half}", rf"\1{full}", response)
        response = re.sub(rf"{half}({_HANZI})", rf"{full}\1", response)
    return response
