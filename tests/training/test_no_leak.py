"""Training through `thuglm train` on uniformly random characters cannot beat their entropy.

If any predicted token could see itself through GLM's bidirectional prefix (the tutorial's layout), the held-out
loss would fall far below ln(alphabet); with every target after `<sop>` it stays at the honest floor.
"""

from __future__ import annotations

import csv
import math
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thuglm.inference.evaluation import evaluate_perplexity
from thuglm.training.config import load_config
from thuglm.training.recipe import train

from .test_train_e2e import OFFICIAL_TINY, base_settings, write_config


def single_token_hanzi(tokenizer, count: int) -> list[str]:
    """Hanzi that are pieces of the vocabulary (merged pairs in the text are fine: the test counts nats per
    character, whose floor is ln(alphabet) however the text is cut into tokens)."""
    chosen = [chr(code) for code in range(0x4E00, 0x9FA6) if tokenizer.convert_tokens_to_ids(chr(code)) != tokenizer.unk_token_id]
    return chosen[:count]


def write_random_corpus(path, alphabet, rows, length, rng):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["content"])
        for _ in range(rows):
            writer.writerow(["".join(rng.choice(alphabet) for _ in range(length))])


def test_loss_on_random_characters_stays_at_their_entropy(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(OFFICIAL_TINY)
    alphabet = single_token_hanzi(tokenizer, 64)
    assert len(alphabet) == 64
    rng = random.Random(0)
    write_random_corpus(tmp_path / "train.csv", alphabet, rows=400, length=60, rng=rng)
    write_random_corpus(tmp_path / "eval.csv", alphabet, rows=40, length=60, rng=rng)

    settings = base_settings(
        tmp_path, method="full", max_steps=150, learning_rate=3e-3, max_seq_len=128, batch_size=8, save_steps=1000,
        logging_steps=10, report_to=[],
    )
    settings["data"] = {"files": [str(tmp_path / "train.csv")], "cache_dir": str(tmp_path / "hf-cache")}
    train(load_config(write_config(tmp_path, **settings)))

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        result = evaluate_perplexity(model, tokenizer, [str(tmp_path / "eval.csv")], max_seq_len=128)
    characters = 40 * 60
    nats_per_character = result["eval_loss"] * result["tokens"] / characters  # the <eop> tokens only add loss
    floor = math.log(64)
    assert nats_per_character >= 0.9 * floor, (nats_per_character, floor)
    assert nats_per_character <= 1.3 * floor, "the model did not even learn the alphabet: the test proves nothing"
