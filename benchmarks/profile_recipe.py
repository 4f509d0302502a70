"""Where the time of a `thuglm train` step goes on a GPU: the recipe as users run it, profiled for a few steps.

    PYTHONPATH=src python benchmarks/profile_recipe.py [key=value ...]      # one GPU; overrides go to thuglm train
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/profile_recipe.py  # DDP: every process profiled, the first reports

e.g. `method=full optimizer=adafactor optimizer_in_backward=true gradient_checkpointing=true batch_size=1` for
full fine-tuning as on a 24 GB card. Options for trying what the recipe does not expose (each may repeat):

    --ddp KEY=VALUE       a DistributedDataParallel argument (static_graph, gradient_as_bucket_view, bucket_cap_mb, ...)
    --trainer KEY=VALUE   a TrainingArguments field set after the recipe built them (average_tokens_across_devices, ...)
    --trace FILE.json.gz  also write the profiled steps as a Chrome trace (the first process's)
    --no-profile          only the run's tokens/s: no profiler
    --memory-snapshot FILE  record every CUDA allocation from before the model loads, write the snapshot (a pickle
                          for https://pytorch.org/memory_viz) and print what is alive at the peak (memory_peak.py)
    --loss-chunk-mib N    the loss's smallest chunk of fp32 logits (models/losses.py MIN_CHUNK_BYTES), to try sizes
    --loss-eager          the loss's chunk arithmetic as written (~10 kernels a chunk), not compiled on the GPU
    --inductor KEY=VALUE  a torch._inductor.config setting for the compiled layers (max_autotune_gemm=true: Triton
                          matmul templates beside cuBLAS, with fused epilogues; coordinate_descent_tuning=true, ...)
    --nan-check-off       no NaN / inf check before each optimizer step (on_nan's guard and the host-device
                          synchronisation it costs a step): what a check that does not wait for the GPU could gain
    --pad-to-longest      pad each batch to its longest row, as thuglm train did before packed batches were padded to
                          max_seq_len (a compiled layer then recompiles, then compiles any length, as the longest changes)
    --record FILE         append the run as a row (`impl: thuglm-train`, `mode` from --mode, the median step's tokens/s,
                          peak, every step's loss) to FILE; --run-id, --commit and --mode name it

Trains LoRA (by default; any config key can be overridden) on ChatGLM-6B's shape with random weights (the folder
`bench_multi_gpu.py` builds) and the bundled corpus, and wraps steps PROFILED of the Trainer's loop in
torch.profiler. It prints how much of the wall time the GPU was busy, the kernels that took it, and the host-side
operations that kept the GPU waiting. With --no-profile and --record it measures `thuglm train` itself: the rows
issue #23 compares with the official code (`impl: official` rows of bench_train.py under the same --run-id).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_multi_gpu import write_base_config
from common import build_6b_folder, kernel_time
from torch.profiler import ProfilerActivity, profile

FIRST_PROCESS = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one report (the processes run in step)
PROFILED = range(6, 9)  # micro-batches (training_step calls) inside the profile, after warm-up


def profiled_training_step(original, trace: str | None):
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
                if trace:
                    state["profiler"].export_chrome_trace(trace)  # .gz: compressed
        return original(self, *args, **kwargs)

    return training_step


def report(prof, wall_ms: float, steps: int) -> None:
    kernels, busy_ms = kernel_time(prof)
    print(f"\nprofile of {steps} steps: wall {wall_ms:.0f} ms (profiled), kernels {busy_ms:.0f} ms "
          f"({100 * busy_ms / wall_ms:.0f} % busy), {kernels / steps:.0f} kernels a step", flush=True)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=80), flush=True)


def option_values(argv: list[str], name: str) -> list[str]:
    """The values of every `name VALUE` in argv, removed from it."""
    values = []
    while name in argv:
        index = argv.index(name)
        values.append(argv[index + 1])
        del argv[index:index + 2]
    return values


def parsed(pairs: list[str]) -> dict:
    """KEY=VALUE strings as a dict, each value read as a Python literal (true/false as booleans) or kept a string."""
    result = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        value = {"true": "True", "false": "False", "none": "None"}.get(value.lower(), value)
        try:
            result[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            result[key] = value
    return result


def override_trainer(recipe, GlmTrainer, ddp: dict, trainer_fields: dict) -> None:
    """Patch the recipe's TrainingArguments and the Trainer's DDP arguments with the --trainer / --ddp values."""
    if trainer_fields:
        build = recipe.training_arguments

        def training_arguments(*args, **kwargs):
            arguments = build(*args, **kwargs)
            for key, value in trainer_fields.items():
                if not hasattr(arguments, key):
                    raise SystemExit(f"--trainer {key}: TrainingArguments has no such field")
                setattr(arguments, key, value)
            return arguments

        recipe.training_arguments = training_arguments
    if ddp:
        build_accelerator_args = GlmTrainer._build_accelerator_args

        def with_ddp_kwargs(self, **kwargs):
            args = build_accelerator_args(self, **kwargs)
            args["kwargs_handlers"] = [dataclasses.replace(handler, **ddp) for handler in args["kwargs_handlers"]]
            return args

        GlmTrainer._build_accelerator_args = with_ddp_kwargs


def main() -> None:
    from thuglm.training import recipe
    from thuglm.training.trainer import GlmTrainer

    argv = sys.argv[1:]
    ddp, trainer_fields = parsed(option_values(argv, "--ddp")), parsed(option_values(argv, "--trainer"))
    import torch._inductor.config as inductor_config

    for key, value in parsed(option_values(argv, "--inductor")).items():
        if not hasattr(inductor_config, key):
            raise SystemExit(f"--inductor {key}: torch._inductor.config has no such setting")
        setattr(inductor_config, key, value)
    traces = option_values(argv, "--trace")
    record = {name: (option_values(argv, f"--{name}") or [None])[-1] for name in ("record", "run-id", "commit", "mode")}
    no_profile = "--no-profile" in argv
    snapshots, chunk_mib = option_values(argv, "--memory-snapshot"), option_values(argv, "--loss-chunk-mib")
    if chunk_mib:
        from thuglm.models import losses

        losses.MIN_CHUNK_BYTES = int(float(chunk_mib[-1]) * 2**20)
    if snapshots:  # before the model is loaded, so the replay sees every block alive at the peak
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=3_000_000)
    if "--loss-eager" in argv:
        from thuglm.models import losses

        losses._fused_on = lambda device, fn: fn
    if "--pad-to-longest" in argv:
        from thuglm.data import collator

        for_model = collator.GlmCollator.for_model.__func__
        collator.GlmCollator.for_model = classmethod(lambda cls, pad_id, config, pad_to_multiple_of=None:
                                                     for_model(cls, pad_id, config))
    if "--nan-check-off" in argv:
        from thuglm.training.parts.nonfinite_guard import NonFiniteGuard

        NonFiniteGuard._get_grad_norm = lambda self, model, grad_norm=None: super(
            NonFiniteGuard, self)._get_grad_norm(model, grad_norm=grad_norm)
    argv = [arg for arg in argv if arg not in ("--no-profile", "--pad-to-longest", "--loss-eager", "--nan-check-off")]
    override_trainer(recipe, GlmTrainer, ddp, trainer_fields)
    root = Path("/tmp/thuglm-profile")
    root.mkdir(parents=True, exist_ok=True)
    # model=... in the arguments replaces the 6B shape (model=tiny: a check of this script on the CPU)
    model = "tiny" if any(arg.startswith("model=") for arg in argv) else build_6b_folder(
        Path("/tmp/thuglm-multi-gpu") / "glm6b")
    config = write_base_config(root, "bf16")
    overrides = [f"model={model}", "method=lora", f"output_dir={root / 'out'}", "overwrite_output_dir=true",
                 "max_seq_len=512", "batch_size=4", "gradient_checkpointing=false", f"max_steps={PROFILED.stop + 2}",
                 *argv]
    if not no_profile:
        GlmTrainer.training_step = profiled_training_step(GlmTrainer.training_step, traces[-1] if traces else None)
    if "--sdpa-with-cudnn" in overrides:  # as before thuglm train turned SDPA's cuDNN kernel off (its host cost)
        overrides.remove("--sdpa-with-cudnn")
        recipe.choose_attention_kernels = lambda attn_implementation: None
    config = recipe.load_config(str(config), overrides)
    metrics = recipe.train(config)
    if snapshots and FIRST_PROCESS:
        write_snapshot(Path(snapshots[-1]))
    if not FIRST_PROCESS:  # the first reports, then deletes the output
        return
    history = json.loads((root / "out" / "trainer_state.json").read_text())["log_history"]
    # A log's rate covers the steps since the previous log: leave out those that cover a profiled step (1-based).
    profiled = range(PROFILED.start + 1, PROFILED.stop + config.logging_steps + 1) if not no_profile else range(0)
    # A log covers the logging_steps steps up to its own: those after the third (compilation and warm-up) count.
    unprofiled = [entry["tokens_per_s"] for entry in history
                  if "tokens_per_s" in entry and entry["step"] - config.logging_steps >= 3
                  and entry["step"] not in profiled]
    print("run: " + ", ".join(f"{key} {metrics.get(key)}" for key in
                              ("tokens_per_s", "peak_memory_gib", "peak_memory_kind", "final_train_loss"))
          + f", median unprofiled step tokens_per_s {statistics.median(unprofiled) if unprofiled else None}"
          + f", processes {metrics.get('processes')}, ddp {ddp or '-'}, trainer {trainer_fields or '-'}",
          flush=True)
    if record["record"]:
        write_row(record, config, metrics, history, statistics.median(unprofiled) if unprofiled else None)
    shutil.rmtree(root / "out", ignore_errors=True)  # a full fine-tune's model is 12 GB


def write_snapshot(path: Path) -> None:
    from memory_peak import summarise

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    with open(path, "wb") as handle:
        pickle.dump(snapshot, handle)
    print(f"memory snapshot: {path} (max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB)\n"
          + summarise(snapshot, top=30), flush=True)


def write_row(record: dict, config, metrics: dict, history: list[dict], step_tokens_per_s: float | None) -> None:
    """One results.jsonl row: `tokens_per_s` is the median logged step's (after the third, none profiled), the
    whole run's rate beside it as `run_tokens_per_s` (compilation and warm-up included)."""
    losses = [round(entry["loss"], 5) for entry in history if "loss" in entry]
    row = {"run_id": record["run-id"] or f"recipe-{time.strftime('%Y%m%dT%H%M%S')}", "date": time.strftime("%Y-%m-%d"),
           "commit": record["commit"] or "unknown", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "model": "6b-shape" if config.model != "tiny" else "tiny",
           "impl": "thuglm-train", "mode": record["mode"] or f"{config.method}-{config.precision}",
           "method": config.method, "precision": config.precision, "seq": config.max_seq_len,
           "batch": config.batch_size, "grad_ckpt": config.gradient_checkpointing, "compile": config.compile,
           "logging_steps": config.logging_steps,
           "steps": metrics.get("steps"), "status": "ok", "tokens_per_s": step_tokens_per_s,
           "run_tokens_per_s": metrics.get("tokens_per_s"), "peak_gib": metrics.get("peak_memory_gib"),
           "final_train_loss": metrics.get("final_train_loss"), "losses": losses,
           "command": "python benchmarks/profile_recipe.py " + " ".join(sys.argv[1:])}
    with open(record["record"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
