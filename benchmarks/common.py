"""What the benchmark scripts share: ChatGLM-6B's shape with random weights, and the commit a row measures.

Imported by the scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path); it imports thuglm only
inside the functions that need it, because the official code's worker processes import the scripts too.
"""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import torch

# ChatGLM-6B: 28 layers, hidden 4096, 32 heads, MLP 16384, vocabulary 130,528.
SIX_B = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384,
         "max_sequence_length": 2048, "vocab_size": 130528}


def random_chatglm(config, dtype: torch.dtype, device, attn: str = "sdpa"):
    """thuglm's ChatGLM for `config`, initialised randomly (seed 0) straight in `dtype` on `device`."""
    from thuglm.models import ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ChatGLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation(attn)
    return model


def build_6b_folder(folder: Path, tokenizer_cache: Path | None = None) -> Path:
    """A model folder of the 6B shape: random bf16 weights made on the GPU, the tiny demo tokenizer beside them.

    Built once: a folder that already has a config.json is reused.
    """
    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)
    from thuglm.models import ChatGLMTokenizer
    from thuglm.models.tiny import cached_tiny_chatglm, tiny_config

    if (folder / "config.json").is_file():
        return folder
    tokenizer = ChatGLMTokenizer.from_pretrained(cached_tiny_chatglm(tokenizer_cache))
    model = random_chatglm(tiny_config(tokenizer.vocab_size, tokenizer, **SIX_B), torch.bfloat16, "cuda")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def commit_id(cwd: Path | None = None) -> str:
    """The checkout's short commit, "+ uncommitted" when it has changes; "unknown" without git (a GPU machine's copy)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False, cwd=cwd)
    except OSError:
        return "unknown"
    head, dirty = head.stdout.strip(), dirty.stdout.strip()
    return (head + (" + uncommitted" if dirty else "")) if head else "unknown"
