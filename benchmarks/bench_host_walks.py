"""The host time of the training loop's walks over the module tree, for LoRA on ChatGLM-6B's shape (CPU only).

    PYTHONPATH=src python benchmarks/bench_host_walks.py [--record benchmarks/results.jsonl]

The Trainer calls `model.train()` and `model.zero_grad()` every step, collects the parameters to clip their
gradients and counts them for its FLOP estimate; each walks all ~1,400 modules of the LoRA model. With a bf16/fp16
base each micro-batch's forward also turns peft's casting of adapter inputs off and back on: peft's helper
(`disable_input_dtype_casting`) walks the tree twice to find the adapter layers. GlmTrainer walks once per run
(`WalkShortcuts`, a cached parameter list and count, a cached list of adapter layers). The model is built on the
meta device: the walks are Python over the module tree, whatever the weights. A LoRA step on a GPU is host-bound
(GPU ~80 % busy at b4 s512), so host time saved a step is close to time saved a step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from common import SIX_B, commit_id, random_chatglm


def per_call_ms(function, repeats: int = 20) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1e3 * (time.perf_counter() - start) / repeats


def lora_6b_on_meta():
    from peft import LoraConfig, get_peft_model

    from thuglm.models import ChatGLMTokenizer
    from thuglm.models.tiny import cached_tiny_chatglm, tiny_config
    from thuglm.training.config import DEFAULT_LORA_TARGETS

    tokenizer = ChatGLMTokenizer.from_pretrained(cached_tiny_chatglm(None))
    model = random_chatglm(tiny_config(tokenizer.vocab_size, tokenizer, **SIX_B), torch.bfloat16, "meta")
    return get_peft_model(model, LoraConfig(r=8, target_modules=list(DEFAULT_LORA_TARGETS)))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def main() -> None:
    from peft.helpers import disable_input_dtype_casting

    from thuglm.training.parts.adapter_casting import adapter_input_casting_off, adapter_layers
    from thuglm.training.parts.module_walks import WalkShortcuts

    def entered(context_manager):
        with context_manager:
            pass

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", help="append the result row (JSON) to this file")
    args = parser.parse_args()
    model = lora_6b_on_meta()
    walks = {  # what the Trainer's loop does each step
        "train": lambda: model.train(),
        "zero_grad": lambda: model.zero_grad(),
        "parameters_to_clip": lambda: list(model.parameters()),
        "flop_count": lambda: model.num_parameters(exclude_embeddings=True),
        "adapter_casting_off": lambda: entered(disable_input_dtype_casting(model)),
    }
    before = {name: per_call_ms(walk) for name, walk in walks.items()}
    shortcuts = WalkShortcuts(model)
    parameters = shortcuts.parameters
    layers = adapter_layers(model)
    after = {"train": per_call_ms(lambda: model.train()), "zero_grad": per_call_ms(lambda: model.zero_grad()),
             "parameters_to_clip": per_call_ms(lambda: list(parameters)), "flop_count": 0.0,
             "adapter_casting_off": per_call_ms(lambda: entered(adapter_input_casting_off(layers)))}
    shortcuts.remove()
    row = {"run_id": f"host-walks-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
           "date": datetime.date.today().isoformat(), "commit": commit_id(), "device": cpu_name(),
           "card": "cpu (host side of a GPU step)", "impl": "thuglm", "mode": "host-walks-lora-6b",
           "modules": sum(1 for _ in model.modules()), "parameters": len(parameters),
           "before_ms": {k: round(v, 2) for k, v in before.items()}, "after_ms": {k: round(v, 3) for k, v in after.items()},
           "before_ms_per_step": round(sum(before.values()), 2), "after_ms_per_step": round(sum(after.values()), 3),
           "command": "python benchmarks/bench_host_walks.py"}
    print(f"{row['modules']} modules, {row['parameters']} parameters")
    print(f"{'walk':20s} {'Trainer ms':>10s} {'GlmTrainer ms':>13s}")
    for name in walks:
        print(f"{name:20s} {before[name]:10.2f} {after[name]:13.3f}")
    print(f"{'a step':20s} {row['before_ms_per_step']:10.2f} {row['after_ms_per_step']:13.3f}")
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
