"""ChatGLM-6B's chat prompt, with thuglm's one layout for a system text.

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
