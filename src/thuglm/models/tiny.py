"""A tiny ChatGLM for tests and demos.

The real checkpoint is 12 GiB and cannot be downloaded here, so everything that needs "a ChatGLM" builds a small
one: a sentencepiece model trained on the bundled Chinese corpus with the same special pieces as `ice_text.model`,
and a randomly initialised ChatGLM around it, saved in the official checkpoint layout.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import sentencepiece as spm
import torch

from .configuration_chatglm import ChatGLMConfig
from .modeling_chatglm import ChatGLMForConditionalGeneration
from .tokenization_chatglm import (
    BLANK_TOKENS,
    CHATGLM_SPECIAL_TOKENS,
    LINEBREAK_TOKEN,
    TAB_TOKEN,
    ChatGLMTokenizer,
    preprocess_text,
)

# The pieces the official tokenizer relies on, in ice_text.model's order after <unk> <s> </s> <pad>.
SPECIAL_PIECES = [LINEBREAK_TOKEN, *CHATGLM_SPECIAL_TOKENS, TAB_TOKEN, *BLANK_TOKENS]


def bundled_corpus_dir() -> Path:
    return Path(str(resources.files("thuglm") / "resources" / "corpus"))


def iter_corpus_texts(corpus_dir: str | Path | None = None, column: str = "content") -> Iterator[str]:
    """Yield the text cells of every CSV file in `corpus_dir` (the bundled corpus by default), in file-name order."""
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else bundled_corpus_dir()
    files = sorted(corpus_dir.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no CSV files in {corpus_dir}: the tiny tokenizer is trained on a folder of CSV files")
    for path in files:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for row in csv.DictReader(handle):
                text = (row.get(column) or "").strip()
                if text:
                    yield text


def train_tiny_sentencepiece(
    texts: Iterable[str], out_file: str | Path, vocab_size: int = 3000, seed_sentencepiece_size: int = 100_000
) -> Path:
    """Train a unigram sentencepiece model shaped like ChatGLM's `ice_text.model`.

    ids 0-3 are <unk> <s> </s> <pad> as in the original, then <n>, the GLM special pieces, <|tab|> and the
    <|blank_N|> pieces; byte fallback keeps every character (emoji, rare hanzi) encodable. The tokenizer's own
    preprocessing replaces newlines, tabs and runs of spaces before sentencepiece sees the text, so the training
    text gets the same replacement.
    """
    # One sentence per line: sentencepiece reads lines, and a cell may hold several paragraphs.
    lines = [preprocess_text(text) for text in texts]
    # Every character of the corpus needs a piece of its own, plus the specials and 256 byte pieces; grow the
    # vocabulary to fit a larger corpus rather than fail.
    distinct_chars = len(set("".join(lines)))
    vocab_size = max(vocab_size, distinct_chars + len(SPECIAL_PIECES) + 260 + 500)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        byte_fallback=True,
        user_defined_symbols=SPECIAL_PIECES,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=1,
        minloglevel=2,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(out_file))
    # The official encode(add_dummy_prefix=False) drops the first two pieces of "▁<n>…"; that needs "▁" alone.
    if processor.piece_to_id("▁") == processor.unk_id():
        raise RuntimeError("the trained sentencepiece model has no standalone '▁' piece; use a larger corpus")
    return out_file


def padded_vocab_size(vocab_pieces: int) -> int:
    """The model's vocabulary for a tokenizer of `vocab_pieces`: rounded up to a multiple of 64, like the official
    130,528 rows for 130,344 pieces, so that tests meet ids past the tokenizer's end as real checkpoints do."""
    return (vocab_pieces + 63) // 64 * 64


def tiny_config(vocab_pieces: int, tokenizer, **overrides) -> ChatGLMConfig:
    """A small config whose special-token ids come from the tokenizer, like the official config.json."""
    vocab_size = padded_vocab_size(vocab_pieces)
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        inner_hidden_size=256,
        max_sequence_length=2048,  # ChatGLM-6B's: a config written for it (max_seq_len 1024) trains on this one
        layernorm_epsilon=1e-5,
        position_encoding_2d=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides)
    return ChatGLMConfig(**values)


def build_tiny_chatglm(
    out_dir: str | Path,
    seed: int = 0,
    corpus_dir: str | Path | None = None,
    vocab_size: int = 3000,
    **config_overrides,
) -> Path:
    """Train a tiny tokenizer, build a random tiny ChatGLM around it and save both to `out_dir`.

    The folder loads with `AutoTokenizer.from_pretrained` and `AutoModelForCausalLM.from_pretrained` after
    `import thuglm`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = train_tiny_sentencepiece(iter_corpus_texts(corpus_dir), out_dir / "ice_text.model", vocab_size)
    tokenizer = ChatGLMTokenizer(vocab_file=str(vocab_file), num_image_tokens=0)
    config = tiny_config(tokenizer.vocab_size, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "thuglm_tiny.json").write_text(json.dumps({"seed": seed, "vocab_pieces": tokenizer.vocab_size}) + "\n")
    return out_dir


TINY_CACHE_VERSION = 2  # 2: max_sequence_length 2048, as ChatGLM-6B


def cached_tiny_chatglm(cache_root: str | Path | None = None) -> Path:
    """The tiny demo model (seed 0), built once and kept in `$THUGLM_CACHE` (default ~/.cache/thuglm).

    This is what `model: tiny` in a training config resolves to. The folder is built under a temporary name and
    renamed, so an interrupted build never leaves a half-written model behind.
    """
    root = Path(cache_root or os.environ.get("THUGLM_CACHE") or Path.home() / ".cache" / "thuglm")
    target = root / f"tiny-chatglm-v{TINY_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        build_tiny_chatglm(staging, seed=0)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
