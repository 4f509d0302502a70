"""Using a trained ChatGLM: chat prompts and answers."""

from .chat import build_prompt, process_response

__all__ = ["build_prompt", "process_response"]
