"""An alpaca-format SFT file of many distinct rows that a model learns by rule, not by heart: the stream issue #23's
FP8 loss curve is read on.

    python benchmarks/make_sft_stream.py OUT.json [--rows 60000] [--seed 0]

The bundled alpaca instructions are 32 rows once packed to 512 tokens, so 200 steps of 16 rows see each ~100 times:
the loss then falls by memorising, and two bf16 runs that differ only in rounding end 4 % apart (benchmarks/README.md,
run speed-20261207T131701), too chaotic to read a 1 % difference against. Here every answer follows from its
instruction (sums, differences, comparisons, a snippet of the bundled corpus reversed or copied): 60,000 rows, 99 %
of them distinct, ~34 tokens each, pack into ~4,000 rows of 512 tokens, more than 200 steps of 16 rows reach, so none
is seen twice and the loss falls by what the rules teach. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "src" / "thuglm" / "resources" / "corpus"


def corpus_text() -> str:
    text = []
    for path in sorted(CORPUS.glob("*.csv")):
        with path.open(encoding="utf-8") as file:
            text.extend(row["content"] for row in csv.DictReader(file))
    return "".join(text)


def snippet(rng: random.Random, text: str) -> str:
    length = rng.randint(6, 14)
    start = rng.randrange(len(text) - length)
    return text[start:start + length]


def sft_row(rng: random.Random, text: str) -> dict:
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    kind = rng.randrange(5)
    if kind == 0:
        return {"instruction": f"计算 {a} 加 {b}。", "input": "", "output": f"{a} 加 {b} 等于 {a + b}。"}
    if kind == 1:
        big, small = max(a, b), min(a, b)
        return {"instruction": f"计算 {big} 减 {small}。", "input": "", "output": f"{big} 减 {small} 等于 {big - small}。"}
    if kind == 2:
        answer = f"{a} 和 {b} 一样大。" if a == b else f"{max(a, b)} 比 {min(a, b)} 大。"
        return {"instruction": f"{a} 和 {b} 哪个大？", "input": "", "output": answer}
    words = snippet(rng, text)
    if kind == 3:
        return {"instruction": "把下面的文字倒过来写。", "input": words, "output": words[::-1]}
    return {"instruction": "把下面的文字原样抄写一遍。", "input": words, "output": words}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, text = random.Random(args.seed), corpus_text()
    rows = [sft_row(rng, text) for _ in range(args.rows)]
    args.out.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    print(f"{args.out}: {len(rows):,} rows, {len({json.dumps(row) for row in rows}):,} distinct")


if __name__ == "__main__":
    main()
