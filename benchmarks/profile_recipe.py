"""Where the time of a `thuglm train` step goes on a GPU: the recipe as users run it, profiled for a few steps.

    PYTHONPATH=src python benchmarks/profile_recipe.py [key=value ...]      # one GPU; overrides go to thuglm train
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/profile_recipe.py  # DDP: every process profiled, the first reports

e.g. `method=full optimizer=adafactor optimizer_in_backward=true gradient_checkpointing=true batch_size=1` for
full fine-tuning as on a 24 GB card.

Trains LoRA (by default; any config key can be overridden) on ChatGLM-6B's shape with random weights (the folder
`bench_multi_gpu.py` builds) and the bundled corpus, and wraps steps PROFILED of the Trainer's loop in
torch.profiler. It prints how much of the wall time the GPU was busy, the kernels that took it, and the host-side
operations that kept the GPU waiting. Nothing is recorded: this is for finding work, not for reporting speed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_multi_gpu import write_base_config
from common import build_6b_folder
from torch.profiler import ProfilerActivity, profile

FIRST_PROCESS = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one report (the processes run in step)
PROFILED = range(6, 9)  # micro-batches (training_step calls) inside the profile, after warm-up


def profiled_training_step(original):
    state: dict = {"calls": 0, "profiler": None, "start": 0.0}

    def training_step(self, *args, **kwargs):
        call = state["calls"]
        state["calls"] += 1
        if call == PROFILED.start:
            torch.cuda.synchronize()
            state["profiler"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["profiler"].__enter__()
            state["start"] = time.perf_counter()
        if call == PROFILED.stop:  # the previous steps, their optimizer steps and data loading included
            torch.cuda.synchronize()
            wall_ms = 1e3 * (time.perf_counter() - state["start"])
            state["profiler"].__exit__(None, None, None)
            if FIRST_PROCESS:
                report(state["profiler"], wall_ms, len(PROFILED))
        return original(self, *args, **kwargs)

    return training_step


def report(prof, wall_ms: float, steps: int) -> None:
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    print(f"\nprofile of {steps} steps: wall {wall_ms:.0f} ms (profiled), kernels {busy_ms:.0f} ms "
          f"({100 * busy_ms / wall_ms:.0f} % busy), {len(kernels) / steps:.0f} kernels a step", flush=True)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=80), flush=True)


def main() -> None:
    from thuglm.training import recipe
    from thuglm.training.trainer import GlmTrainer

    root = Path("/tmp/thuglm-profile")
    root.mkdir(parents=True, exist_ok=True)
    model = build_6b_folder(Path("/tmp/thuglm-multi-gpu") / "glm6b")
    config = write_base_config(root, "bf16")
    overrides = [f"model={model}", "method=lora", f"output_dir={root / 'out'}", "overwrite_output_dir=true",
                 "max_seq_len=512", "batch_size=4", "gradient_checkpointing=false", f"max_steps={PROFILED.stop + 2}",
                 *sys.argv[1:]]
    GlmTrainer.training_step = profiled_training_step(GlmTrainer.training_step)
    if "--sdpa-with-cudnn" in overrides:  # as before thuglm train turned SDPA's cuDNN kernel off (its host cost)
        overrides.remove("--sdpa-with-cudnn")
        recipe.choose_attention_kernels = lambda attn_implementation: None
    metrics = recipe.train(recipe.load_config(str(config), overrides))
    history = json.loads((root / "out" / "trainer_state.json").read_text())["log_history"]
    unprofiled = [entry["tokens_per_s"] for step, entry in enumerate(history[1:], start=1)
                  if "tokens_per_s" in entry and step > 3 and step not in (*PROFILED, PROFILED.stop)]
    if not FIRST_PROCESS:
        return
    print("run: " + ", ".join(f"{key} {metrics.get(key)}" for key in
                              ("tokens_per_s", "peak_memory_gib", "peak_memory_kind", "final_train_loss"))
          + f", median unprofiled step tokens_per_s {statistics.median(unprofiled) if unprofiled else None}",
          flush=True)
    shutil.rmtree(root / "out", ignore_errors=True)  # a full fine-tune's model is 12 GB


if __name__ == "__main__":
    main()
