"""Does Adafactor in the backward pass on bf16 weights (thuglm's full fine-tuning on 24 GB) learn like AdamW?

    PYTHONPATH=src python benchmarks/optim_curves.py [--record benchmarks/results.jsonl]

The tiny ChatGLM (bundled tokenizer) is first pre-trained on the bundled corpus with AdamW in fp32, so that the
fine-tune starts from a trained model, then fully fine-tuned on the bundled alpaca instructions three ways, on the
same batches in the same order:

* `adamw-fp32`: AdamW on fp32 weights (the reference);
* `adamw-bf16`: AdamW on bf16 weights, round to nearest (the official code's pure-bf16 full fine-tuning);
* `adafactor-bf16-sr`: `thuglm.training.optim.Adafactor` stepped in the backward pass on bf16 weights, stochastic
  rounding (what `bench_train.py --modes full` measures on the 6B shape).

Printed: the training loss (mean of each 10 steps) and the held-out loss on 10 % of the instructions. CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import time

import torch

from thuglm.models import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from thuglm.models.tiny import cached_tiny_chatglm, iter_corpus_texts
from thuglm.training.demo import resource_path
from thuglm.training.optim import Adafactor, step_in_backward


def encode(tokenizer, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """`prompt [gMASK] <sop> answer <eop>`, labels from <sop> on (the official ptuning layout)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)[: max_len // 2]
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    ids = prompt_ids + [tokenizer.gmask_token_id, tokenizer.bos_token_id] + answer_ids + [tokenizer.eos_token_id]
    ids = ids[:max_len]
    labels = [-100] * (len(prompt_ids) + 1) + ids[len(prompt_ids) + 1 :]
    return ids, labels


def batches(samples: list[tuple[list[int], list[int]]], batch_size: int, steps: int, pad: int, seed: int):
    order = random.Random(seed)
    pool: list[int] = []
    for _ in range(steps):
        if len(pool) < batch_size:
            pool += order.sample(range(len(samples)), len(samples))
        chosen = [samples[pool.pop()] for _ in range(batch_size)]
        yield collate(chosen, pad)


def collate(chosen, pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in chosen)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chosen])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chosen])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chosen])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def held_out_loss(model, samples, pad: int) -> float:
    model.eval()
    reference = model.float() if model.dtype != torch.float32 else model
    losses = [reference(**collate(samples[i : i + 16], pad)).loss.item() for i in range(0, len(samples), 16)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(tokenizer, folder, steps: int, seed: int):
    texts = list(iter_corpus_texts())
    samples = [encode(tokenizer, "", text, 96) for text in texts]
    model = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in batches(samples, 16, steps, tokenizer.pad_token_id, seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


def finetune(name: str, state: dict, folder, train, held_out, pad: int, steps: int, lr: float, seed: int):
    dtype = torch.float32 if name == "adamw-fp32" else torch.bfloat16
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.train()
    if name.startswith("adamw"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        optimizer = Adafactor(model.parameters(), lr=lr)
        step_in_backward(optimizer)
    curve = []
    for batch in batches(train, 8, steps, pad, seed):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()  # nothing left to do for Adafactor: its hooks stepped during backward
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve, held_out_loss(model, held_out, pad)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--record", help="append the result (JSON line) to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads, and they crawl on a busy machine
    torch.manual_seed(0)
    start = time.perf_counter()
    folder = cached_tiny_chatglm()
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id
    state = pretrain(tokenizer, folder, args.pretrain_steps, seed=0)
    print(f"pre-trained in {time.perf_counter() - start:.0f} s", flush=True)
    instructions = json.loads((resource_path("alpaca") / "instructions.json").read_text())
    samples = [encode(tokenizer, r["instruction"] + r["input"], r["output"], 128) for r in instructions]
    random.Random(1).shuffle(samples)
    held_out, train = samples[: len(samples) // 10], samples[len(samples) // 10 :]
    results = {}
    for name in ("adamw-fp32", "adamw-bf16", "adafactor-bf16-sr"):
        curve, held = finetune(name, state, folder, train, held_out, pad, args.steps, args.lr, seed=2)
        results[name] = {"curve": curve, "held_out_loss": held}
        print(f"{name}: final {sum(curve[-10:]) / 10:.4f}, held-out {held:.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print(f"{'steps':>9s} " + " ".join(f"{name:>18s}" for name in results))
    for begin in range(0, args.steps, 10):
        cells = [sum(r["curve"][begin : begin + 10]) / len(r["curve"][begin : begin + 10]) for r in results.values()]
        print(f"{begin + 1:>4d}-{begin + 10:<4d} " + " ".join(f"{c:18.4f}" for c in cells))
    print("held-out " + " ".join(f"{r['held_out_loss']:18.4f}" for r in results.values()))
    print(f"{time.perf_counter() - start:.0f} s")
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
        row = {"run_id": f"optim-curves-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
               "date": datetime.date.today().isoformat(), "commit": commit + "+uncommitted", "device": "cpu",
               "impl": "thuglm", "mode": "optim-curves", "command": "python benchmarks/optim_curves.py",
               "settings": vars(args), **{name: r for name, r in results.items()}}
        with open(args.record, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
