"""How many operations one `thuglm train` step sends to the device: the host work of a small-batch step (CPU only).

    PYTHONPATH=src python benchmarks/bench_host_ops.py [--record benchmarks/results.jsonl] [key=value ...]
    PYTHONPATH=src python benchmarks/bench_host_ops.py --smoke    # 2 layers, a few steps: the script runs (CI)
    PYTHONPATH=src python benchmarks/bench_host_ops.py --official-site DIR   # the official code's step beside

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

With `--official-site DIR` (transformers 4.34.1, peft 0.5.0 and their dependencies, as `bench_train.py` takes them)
the official code's step is counted and timed beside it, in a process of its own: THUDM/chatglm-6b's modeling file
(`--official-dir`) with the LoRA of the official side of the GPU benchmarks (the tutorial's three linears, dropout
0.1, torch's reentrant checkpoint), the same depth, width and tokens. Both sides then take ChatGLM-6B's vocabulary
(the official code needs its special-token ids), so the loss is split into the chunks it has on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_host_walks import cpu_name
from common import SIX_B, commit_id
from torch.utils._python_dispatch import TorchDispatchMode

COUNTED_STEP = 3  # the third training_step call: the warm-up steps' one-time work is done
RESULT = "RESULT "  # the official worker's line of JSON
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


def count_an_official_step(official_dir: Path, layers: int, timed_steps: int) -> dict:
    """The official code's LoRA b1 step with checkpointing (bench_train.py's official side): the operations of its
    COUNTED_STEP-th forward and backward at 512 tokens, and the time of each forward and backward at 32 tokens on
    one thread (ms). The optimizer is left out of both, as it is outside `training_step` on thuglm's side."""
    from bench_train import SMOKE, TrainingStep, sft_batch

    step = TrainingStep("official", "lora", {**SMOKE, "num_layers": layers}, torch.device("cpu"), torch.float32,
                        official_dir)
    step.set_checkpointing(True)
    counted, times = OperationCount(), []
    for call in range(1, COUNTED_STEP + 1):
        with counted if call == COUNTED_STEP else contextlib.nullcontext():
            step.model(**sft_batch(1, 512, "cpu"), use_cache=False).loss.backward()
        step.optimizer.zero_grad(set_to_none=True)
    torch.set_num_threads(1)
    batch = sft_batch(1, 32, "cpu")
    for _ in range(timed_steps):
        start = time.perf_counter()
        step.model(**batch, use_cache=False).loss.backward()
        times.append(1e3 * (time.perf_counter() - start))
        step.optimizer.zero_grad(set_to_none=True)
    return {"counts": dict(counted.counts), "times": times}


def official_step_in_its_process(args, layers: int, timed_steps: int) -> dict:
    """`count_an_official_step` under transformers 4.34.1 (`--official-site`), in a process of its own."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.official_site, str(here)])}
    command = [sys.executable, str(Path(__file__).resolve()), "--official-worker", "--official-dir",
               args.official_dir, "--layers", str(layers), "--timed-steps", str(timed_steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        sys.exit(f"the official code's step failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def with_the_6b_vocabulary(model_dir: Path) -> None:
    """Widen the tiny model's embedding (tied to its output layer) to ChatGLM-6B's 130,528 words, in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(SIX_B["vocab_size"])
    model.save_pretrained(model_dir)


def row(run_id: str, impl: str, layers: int, checkpointing: bool, counts, steady: list[float], command: str,
        overrides: list[str], vocabulary: str) -> dict:
    kernels = sum(n for name, n in counts.items() if name not in VIEWS)
    return {
        "run_id": run_id, "date": datetime.date.today().isoformat(), "commit": commit_id(), "device": cpu_name(),
        "card": "cpu (host side of a GPU step)", "impl": impl, "mode": "host-ops-lora", "layers": layers,
        "seq": 512, "batch": 1, "gradient_checkpointing": checkpointing, "vocabulary": vocabulary, "status": "ok",
        "kernel_ops": kernels, "view_ops": sum(counts.values()) - kernels, "all_ops": sum(counts.values()),
        "host_ms_min": round(min(steady), 1), "host_ms_median": round(statistics.median(steady), 1),
        "top_ops": dict(collections.Counter(counts).most_common(12)), "overrides": overrides, "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", help="append one row per run (JSON) to this file")
    parser.add_argument("--smoke", action="store_true", help="2 layers and 6 timed steps: the script runs end to end")
    parser.add_argument("--official-site", help="site folder with transformers 4.34.1, tokenizers, hub, peft 0.5: "
                        "the official code's step beside thuglm's (its checkpointed LoRA step only)")
    parser.add_argument("--official-dir", default=str(Path(__file__).resolve().parents[1] / ".official"),
                        help="folder with the official modeling_chatglm.py and configuration_chatglm.py")
    parser.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timed-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config keys for every run (key=value)")
    args = parser.parse_args()
    if args.official_worker:
        print(RESULT + json.dumps(count_an_official_step(Path(args.official_dir), args.layers, args.timed_steps)))
        return
    layers, timed_steps = (2, 6) if args.smoke else (28, 40)

    from thuglm.models.tiny import build_tiny_chatglm

    work = Path(tempfile.mkdtemp(prefix="bench-host-ops-"))
    model = build_tiny_chatglm(work / "model", num_layers=layers)
    vocabulary = "tiny"
    if args.official_site:  # the official code needs ChatGLM-6B's special-token ids: both sides take its vocabulary
        with_the_6b_vocabulary(model)
        vocabulary = "chatglm-6b"
    corpus = Path(__file__).resolve().parents[1] / "src" / "thuglm" / "resources" / "corpus"
    config = work / "lora.yaml"
    config.write_text("method: lora\nprecision: fp32\n")
    run_id = f"host-ops-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    rows = []
    command = "python benchmarks/bench_host_ops.py " + " ".join(
        [*(["--official-site DIR"] if args.official_site else []), *args.overrides])
    for checkpointing in (True, False):
        overrides = [str(config), f"model={model}", f"data.files=[{corpus}]", "data.format=text", "packing=true",
                     "max_seq_len=512", "batch_size=1", "global_batch_size=1", "max_steps=4", "save_steps=100",
                     "data.validation_split=0", f"gradient_checkpointing={str(checkpointing).lower()}",
                     f"output_dir={work / f'out-{checkpointing}'}", *args.overrides]
        counts, _ = count_a_training_step(overrides)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _, times = count_a_training_step([*overrides, "max_seq_len=32", f"max_steps={timed_steps}",
                                                   "overwrite_output_dir=true"])
        finally:
            torch.set_num_threads(threads)
        steady = times[COUNTED_STEP:]  # after the warm-up steps and the counted one (counting slows it)
        rows.append(row(run_id, "thuglm-train", layers, checkpointing, counts, steady, command, args.overrides,
                        vocabulary))
    if args.official_site:
        official = official_step_in_its_process(args, layers, timed_steps)
        rows.append(row(run_id, "official", layers, True, official["counts"], official["times"][COUNTED_STEP:],
                        command, [], vocabulary))
    print(f"{'impl':13s} {'checkpointing':14s} {'kernel ops':>10s} {'view ops':>9s} {'all':>6s} "
          f"{'kernel ops a layer':>19s} {'host ms (min / median)':>23s}")
    for each in rows:
        print(f"{each['impl']:13s} {each['gradient_checkpointing']!s:14} {each['kernel_ops']:10d} "
              f"{each['view_ops']:9d} {each['all_ops']:6d} {each['kernel_ops'] / layers:19.1f} "
              f"{each['host_ms_min']:11.1f} / {each['host_ms_median']:.1f}")
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(each) + "\n" for each in rows)


if __name__ == "__main__":
    main()
