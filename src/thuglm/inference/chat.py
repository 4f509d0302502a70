"""ChatGLM-6B's chat prompt and answer post-processing, as the official `chat` does them.

They live beside the model (`thuglm.models.prompt`: `model.chat` uses them, and models/ imports nothing above it);
chat, generate and serve import them from here.
"""

from __future__ import annotations

from ..models.prompt import answer_token_ids, build_prompt, process_response, with_system  # noqa: F401
