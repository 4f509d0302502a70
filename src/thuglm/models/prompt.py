"""ChatGLM-6B's chat prompt, with thuglm's one layout for a system text, and the official post-processing of answers.

The official multi-round prompt:

    [Round 0]\n问：{query 0}\n答：{response 0}\n[Round 1]\n问：{query}\n答：

and a first question bare, with no round header. ChatGLM-6B has no slot for a system text (an instruction that holds
for the whole dialogue). thuglm puts it first, on its own line, before the first query or round header:

    {system}\n{the prompt above}

Training (every data format), `thuglm chat`, `thuglm generate`, `thuglm eval` and `thuglm serve` all build prompts
with `build_prompt`, so a model trained with a system text reads it at inference in the same place. This module is
the models layer's, so that data/ and inference/ can both use it without importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def build_prompt(query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> str:
    """The official multi-round prompt; a first question goes in bare, with no round header.

    `system`: a text put before everything else on its own line (`{system}\\n...`); None or blank adds nothing.
    """
    if not history:
        prompt = query
    else:
        rounds = "".join(f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(history))
        prompt = rounds + f"[Round {len(history)}]\n问：{query}\n答："
    return with_system(prompt, system)


def with_system(prompt: str, system: str | None) -> str:
    """`prompt` with the system text in thuglm's place for it: first, then a newline."""
    if system is None or not str(system).strip():
        return prompt
    return f"{system}\n{prompt}"


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
