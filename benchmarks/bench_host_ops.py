"""How many operations one `thuglm train` step sends to the device: the host work of a small-batch step (CPU only).

    PYTHONPATH=src python benchmarks/bench_host_ops.py [--record benchmarks/results.jsonl] [key=value ...]
    PYTHONPATH=src python benchmarks/bench_host_ops.py --smoke    # 2 layers, a few steps: the script runs (CI)

At batch 1 a LoRA step of ChatGLM-6B on a GPU is host-bound: the GPU finishes each small kernel before the host has
launched the next, so the step takes about as long as the host needs to dispatch its operations. This counts them:
`thuglm train` itself (the recipe and its Trainer, as the CLI runs it) on a random model of ChatGLM-6B's depth
(28 layers; the count does not depend on the width, so the layers are the tiny model's), LoRA with the shipped
defaults, b1, packed to 512 tokens, with and without gradient checkpointing. Every aten operation one training step
(forward and backward) dispatches is counted by a TorchDispatchMode, split into those that run a kernel and views
(shape changes, no kernel). On a GPU, fused ops (dropout) are one kernel where the CPU runs several: read the
counts as the host's share, not as the GPU's kernel count. Then the host time itself: the same run at 32 tokens a
row, where the tiny layers' arithmetic is negligible, timed over 40 training steps on one thread (the fastest
step, the least disturbed by other work on the machine, and the median). Any config key can be overridden
(`key=value`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_host_walks import cpu_name
from common import commit_id
from torch.utils._python_dispatch import TorchDispatchMode

COUNTED_STEP = 3  # the third training_step call: the warm-up steps' one-time work is done
VIEWS = {"view", "_unsafe_view", "t", "transpose", "detach", "slice", "select", "unbind", "unsqueeze", "squeeze",
         "split", "split_with_sizes", "chunk", "expand", "permute", "as_strided", "alias", "unflatten", "flatten",
         "_reshape_alias", "view_as", "narrow", "reshape"}
"""aten operations that only make a new view of a tensor: host work without a kernel."""


class OperationCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_a_training_step(overrides: list[str]) -> tuple[collections.Counter[str], list[float]]:
    """Run `thuglm train` with `overrides`: the operations of its COUNTED_STEP-th training_step, and every
    training_step's wall time in ms."""
    from thuglm.cli import main
    from thuglm.training.trainer import GlmTrainer

    original, times, counted = GlmTrainer.training_step, [], OperationCount()

    def training_step(self, *args, **kwargs):
        start = time.perf_counter()
        with counted if len(times) + 1 == COUNTED_STEP else contextlib.nullcontext():
            result = original(self, *args, **kwargs)
        times.append(1e3 * (time.perf_counter() - start))
        return result

    GlmTrainer.training_step = training_step
    try:
        if main(["train", *overrides]) != 0:
            sys.exit(f"thuglm train {' '.join(overrides)} failed")
    finally:
        GlmTrainer.training_step = original
    return counted.counts, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", help="append one row per run (JSON) to this file")
    parser.add_argument("--smoke", action="store_true", help="2 layers and 6 timed steps: the script runs end to end")
    parser.add_argument("overrides", nargs="*", help="config keys for every run (key=value)")
    args = parser.parse_args()
    layers, timed_steps = (2, 6) if args.smoke else (28, 40)

    from thuglm.models.tiny import build_tiny_chatglm

    work = Path(tempfile.mkdtemp(prefix="bench-host-ops-"))
    model = build_tiny_chatglm(work / "model", num_layers=layers)
    corpus = Path(__file__).resolve().parents[1] / "src" / "thuglm" / "resources" / "corpus"
    config = work / "lora.yaml"
    config.write_text("method: lora\nprecision: fp32\n")
    run_id = f"host-ops-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    rows = []
    for checkpointing in (True, False):
        overrides = [str(config), f"model={model}", f"data.files=[{corpus}]", "data.format=text", "packing=true",
                     "max_seq_len=512", "batch_size=1", "global_batch_size=1", "max_steps=4", "save_steps=100",
                     "data.validation_split=0", f"gradient_checkpointing={str(checkpointing).lower()}",
                     f"output_dir={work / f'out-{checkpointing}'}", *args.overrides]
        counts, _ = count_a_training_step(overrides)
        kernels = sum(n for name, n in counts.items() if name not in VIEWS)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _, times = count_a_training_step([*overrides, "max_seq_len=32", f"max_steps={timed_steps}",
                                                   "overwrite_output_dir=true"])
        finally:
            torch.set_num_threads(threads)
        steady = times[COUNTED_STEP:]  # after the warm-up steps and the counted one (counting slows it)
        rows.append({
            "run_id": run_id, "date": datetime.date.today().isoformat(), "commit": commit_id(), "device": cpu_name(),
            "card": "cpu (host side of a GPU step)", "impl": "thuglm-train", "mode": "host-ops-lora", "layers": layers,
            "seq": 512, "batch": 1, "gradient_checkpointing": checkpointing, "status": "ok",
            "kernel_ops": kernels, "view_ops": sum(counts.values()) - kernels, "all_ops": sum(counts.values()),
            "host_ms_min": round(min(steady), 1), "host_ms_median": round(statistics.median(steady), 1),
            "top_ops": dict(counts.most_common(12)), "overrides": args.overrides,
            "command": "python benchmarks/bench_host_ops.py " + " ".join(args.overrides),
        })
    print(f"{'checkpointing':14s} {'kernel ops':>10s} {'view ops':>9s} {'all':>6s} {'kernel ops a layer':>19s} "
          f"{'host ms (min / median)':>23s}")
    for row in rows:
        print(f"{row['gradient_checkpointing']!s:14} {row['kernel_ops']:10d} {row['view_ops']:9d} "
              f"{row['all_ops']:6d} {row['kernel_ops'] / layers:19.1f} {row['host_ms_min']:11.1f} / {row['host_ms_median']:.1f}")
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
