"""Batch-encoding speed of ChatGLMTokenizer on Chinese text, one core.

    python benchmarks/bench_tokenizer.py [--model DIR] [--megabytes 8] [--record]

Encodes the bundled corpus, repeated to --megabytes of UTF-8, three ways: `encode_text` (sentencepiece's batched
encoder, the path thuglm's data pipeline uses), `tokenizer(texts)` (the transformers call, with special tokens and
position ids), and per-text `tokenizer.encode` as the tutorial does. With --model it uses that folder's
ice_text.model (e.g. the real ChatGLM-6B one); otherwise it builds the tiny demo tokenizer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from thuglm.models import ChatGLMTokenizer
from thuglm.models.tiny import iter_corpus_texts, train_tiny_sentencepiece


def corpus(megabytes: float) -> list[str]:
    texts = list(iter_corpus_texts())
    out, size = [], 0
    while size < megabytes * 1e6:
        for text in texts:
            out.append(text)
            size += len(text.encode("utf-8"))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="folder with ice_text.model (default: the tiny demo tokenizer)")
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/results.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.model:
        vocab_file = Path(args.model) / "ice_text.model"
    else:
        vocab_file = train_tiny_sentencepiece(iter_corpus_texts(), Path(tempfile.mkdtemp()) / "ice_text.model")
    tokenizer = ChatGLMTokenizer(vocab_file=str(vocab_file), num_image_tokens=0)
    texts = corpus(args.megabytes)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    chunks = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]
    results = {
        "encode_text": megabytes / timed(lambda: [tokenizer.encode_text(c, num_threads=1) for c in chunks]),
        "tokenizer_call": megabytes / timed(lambda: [tokenizer(c) for c in chunks]),
    }
    sample = texts[: max(1, len(texts) // 8)]
    sample_mb = sum(len(t.encode("utf-8")) for t in sample) / 1e6
    results["per_text_encode"] = sample_mb / timed(lambda: [tokenizer.encode(t) for t in sample])

    print(f"vocab pieces {tokenizer.vocab_size}, corpus {megabytes:.1f} MB, {len(texts)} texts, 1 core")
    for name, speed in results.items():
        print(f"  {name:16s} {speed:6.2f} MB/s")
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        row = {
            "run_id": f"tokenizer-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "device": f"cpu ({os.cpu_count()} cores, 1 used)",
            "impl": "thuglm",
            "mode": "tokenize",
            "command": "python benchmarks/bench_tokenizer.py" + (f" --model {args.model}" if args.model else ""),
            "vocab_pieces": tokenizer.vocab_size,
            "megabytes": round(megabytes, 2),
            **{f"{name}_mb_per_s": round(speed, 3) for name, speed in results.items()},
        }
        with open(Path(__file__).parent / "results.jsonl", "a") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
