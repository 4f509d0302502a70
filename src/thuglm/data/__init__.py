"""Turning text into ChatGLM training samples."""

from .samples import IGNORE_INDEX, causal_lm_sample, prompt_response_sample

__all__ = ["IGNORE_INDEX", "causal_lm_sample", "prompt_response_sample"]
