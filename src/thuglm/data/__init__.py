"""Turning files of text or instructions into ChatGLM training rows."""

from .collator import GlmCollator
from .formats import FORMATS, SourceSpec, get_format
from .loading import DataError, guess_text_column, load_raw_dataset, resolve_data_files
from .processing import (
    alpaca_query,
    alpaca_sample,
    encode_alpaca_dataset,
    encode_rows,
    encode_samples,
    encode_text_dataset,
    pack_samples,
    text_windows,
)
from .samples import IGNORE_INDEX, causal_lm_sample, prompt_response_sample
from .sources import load_source, mix_samples, prompt_rows

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "GlmCollator",
    "SourceSpec",
    "alpaca_query",
    "alpaca_sample",
    "causal_lm_sample",
    "encode_alpaca_dataset",
    "encode_rows",
    "encode_samples",
    "encode_text_dataset",
    "get_format",
    "guess_text_column",
    "load_raw_dataset",
    "load_source",
    "mix_samples",
    "pack_samples",
    "prompt_response_sample",
    "prompt_rows",
    "resolve_data_files",
    "text_windows",
]
