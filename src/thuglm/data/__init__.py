"""Turning files of text or instructions into ChatGLM training rows."""

from .collator import GlmCollator
from .loading import DataError, guess_text_column, load_raw_dataset, resolve_data_files
from .processing import (
    alpaca_query,
    alpaca_sample,
    encode_alpaca_dataset,
    encode_text_dataset,
    pack_samples,
    text_windows,
)
from .samples import IGNORE_INDEX, causal_lm_sample, prompt_response_sample

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "GlmCollator",
    "alpaca_query",
    "alpaca_sample",
    "causal_lm_sample",
    "encode_alpaca_dataset",
    "encode_text_dataset",
    "guess_text_column",
    "load_raw_dataset",
    "pack_samples",
    "prompt_response_sample",
    "resolve_data_files",
    "text_windows",
]
