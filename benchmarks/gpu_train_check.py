"""GPU check of `thuglm train`, the recipe users run, on one card.

    PYTHONPATH=src python benchmarks/gpu_train_check.py [--record FILE.jsonl] [--commit HASH] [--skip-6b]

1. Every method (lora, full, freeze) x precision (bf16, fp16) x gradient checkpointing (off, on) trains the tiny
   model for a few steps on the bundled corpus: no dtype error (the "expected scalar type Half but found Float"
   class), a finite loss, the outputs written.
2. The real 6B shape (random weights saved once as a model folder, with the tiny tokenizer: ids stay below its
   vocabulary) trained through the same recipe: LoRA and full fine-tuning; tokens/s over the whole training loop
   (the Trainer's runtime: first-step warm-up included, loading and saving not), the steady per-step tokens/s (median
   of the logged steps after the third) and the peak of torch.cuda memory.
   This is the end-to-end baseline of the recipe; issue #4 optimises the model under it.
3. `--lora-matrix`: LoRA on the 6B shape in every combination users are told to run: bf16 / fp16 x gradient
   checkpointing off / on x `compile` off / on, b1 s512, through the same recipe: each trains (no CheckpointError,
   no dtype error), its loss, tokens/s and peak memory. Rows: mode "train-lora-matrix".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import subprocess
import time
from pathlib import Path

import torch
from common import build_6b_folder

import thuglm  # noqa: F401
from thuglm.models.tiny import cached_tiny_chatglm
from thuglm.training.config import load_config
from thuglm.training.demo import resource_path
from thuglm.training.recipe import train


def run(model: str, out: Path, **settings) -> dict:
    overrides = [f"model={model}", f"data.files={resource_path('corpus')}", f"output_dir={out}", "report_to=[]",
                 "overwrite_output_dir=true", "save_steps=100000", "logging_steps=1"]
    overrides += [f"{key}={value}" for key, value in settings.items()]
    if torch.cuda.is_available():  # a --smoke run of a script that uses this one is on the CPU
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        metrics = train(load_config(None, overrides)) or {}
        loss = metrics.get("final_train_loss")
        status = "ok" if loss is not None and math.isfinite(loss) else "nan"
    except torch.OutOfMemoryError:
        metrics, status = {}, "oom"
    except Exception as error:  # noqa: BLE001  (the check reports every failure and goes on)
        metrics, status = {"error": f"{type(error).__name__}: {error}"[:300]}, "error"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"status": status, "wall_s": round(time.perf_counter() - start, 1), **settings, **metrics,
            "steady_tokens_per_s": steady_throughput(out)}


def steady_throughput(out: Path) -> float | None:
    """Median of the per-step tokens/s the Trainer logged, leaving out the first steps (CUDA and kernel warm-up)."""
    state = out / "trainer_state.json"
    if not state.is_file():
        return None
    speeds = [e["tokens_per_s"] for e in json.loads(state.read_text())["log_history"] if "tokens_per_s" in e][3:]
    return round(sorted(speeds)[len(speeds) // 2], 1) if speeds else None


def tiny_matrix(root: Path) -> list[dict]:
    tiny = cached_tiny_chatglm(root / "cache")
    rows = []
    for precision in ("bf16", "fp16"):
        for method in ("lora", "full", "freeze"):
            for ckpt in (False, True):
                out = root / f"tiny-{method}-{precision}-{ckpt}"
                row = run(str(tiny), out, method=method, precision=precision, gradient_checkpointing=str(ckpt).lower(),
                          max_steps=8, batch_size=4, max_seq_len=128)
                row.update(model="tiny", written=(out / "metrics.json").is_file())
                rows.append(row)
    return rows


def six_b_runs(root: Path, only: str | None = None, probe: bool = False) -> list[dict]:
    start = time.perf_counter()
    folder = build_6b_folder(root / "glm6b", tokenizer_cache=root / "cache")
    print(f"6B-shape folder written in {time.perf_counter() - start:.0f} s")
    plans = [
        {"method": "lora", "max_seq_len": 512, "batch_size": 4, "gradient_checkpointing": "false", "max_steps": 30},
        {"method": "lora", "max_seq_len": 512, "batch_size": 8, "gradient_checkpointing": "false", "max_steps": 20},
        {"method": "lora", "max_seq_len": 512, "batch_size": 1, "gradient_checkpointing": "true", "max_steps": 30},
        {"method": "lora", "max_seq_len": 2048, "batch_size": 1, "gradient_checkpointing": "true", "max_steps": 15},
        {"method": "full", "max_seq_len": 512, "batch_size": 1, "gradient_checkpointing": "true", "max_steps": 10},
    ]
    if probe:
        probe_full_step(folder)
    rows = []
    for plan in (p for p in plans if only in (None, p["method"])):
        row = run(str(folder), root / f"6b-{plan['method']}-{plan['max_seq_len']}-{plan['batch_size']}",
                  precision="bf16", **plan)
        row["model"] = "6b-shape"
        rows.append(row)
        print(summary(row))
    return rows


def lora_matrix(root: Path) -> list[dict]:
    """LoRA x precision x checkpointing x compile on the 6B shape; the eager runs first (compiling takes a minute)."""
    folder = build_6b_folder(root / "glm6b", tokenizer_cache=root / "cache")
    rows = []
    for compiled in ("false", "true"):
        for precision in ("bf16", "fp16"):
            for ckpt in ("false", "true"):
                out = root / f"6b-matrix-{precision}-{ckpt}-{compiled}"
                row = run(str(folder), out, method="lora", precision=precision, gradient_checkpointing=ckpt,
                          compile=compiled, max_seq_len=512, batch_size=1, max_steps=12)
                row.update(model="6b-shape", matrix=True)
                rows.append(row)
                print(summary(row), flush=True)
                print("ROW " + json.dumps(row, default=str), flush=True)  # kept if the time limit ends the run
    return rows


def probe_full_step(folder: Path, steps: int = 4) -> None:
    """Times forward, backward and AdamW of full fine-tuning outside the Trainer, to tell the model from the loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(20, 3000, (1, 512), device="cuda")
    ids[:, 0], ids[:, 1] = model.config.gmask_token_id, model.config.bos_token_id
    for step in range(steps):
        marks = [time.perf_counter()]
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize(); marks.append(time.perf_counter())
        loss.backward()
        torch.cuda.synchronize(); marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); marks.append(time.perf_counter())
        phases = [f"{b - a:.3f}" for a, b in zip(marks, marks[1:])]
        print(f"probe full step {step}: forward {phases[0]} s, backward {phases[1]} s, clip+AdamW {phases[2]} s")
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()


def summary(row: dict) -> str:
    tps = f"{row.get('tokens_per_s', 0):9.0f}" if row.get("tokens_per_s") else f"{'-':>9s}"
    steady = f"{row['steady_tokens_per_s']:9.0f}" if row.get("steady_tokens_per_s") else f"{'-':>9s}"
    peak = f"{row['peak_memory_gib']:8.2f}" if "peak_memory_gib" in row else f"{'-':>8s}"
    loss = f"{row['final_train_loss']:8.3f}" if row.get("final_train_loss") is not None else f"{'-':>8s}"
    return (f"{row.get('model', ''):9s} {row['method']:7s} {row['precision']:5s} {row.get('max_seq_len', ''):>5} "
            f"{row.get('batch_size', ''):>3} ckpt={row['gradient_checkpointing']:5s} compile={row.get('compile', 'false'):5s} "
            f"{row['status']:6s} {loss} {tps} {steady} "
            f"{peak} {row.get('error', '')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/thuglm-gpu-train")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (the GPU machine's copy has no .git)")
    parser.add_argument("--skip-6b", action="store_true")
    parser.add_argument("--only", help="run only the 6B plans of this method (lora or full), no tiny matrix")
    parser.add_argument("--probe-full", action="store_true", help="time a hand-written full fine-tuning step too")
    parser.add_argument("--lora-matrix", action="store_true",
                        help="only LoRA x bf16/fp16 x checkpointing x compile on the 6B shape")
    args = parser.parse_args()
    root = Path(args.root)
    device = torch.cuda.get_device_name()
    print(f"device {device}, torch {torch.__version__}")
    header = f"{'model':9s} {'method':7s} {'prec':5s} {'seq':>5s} {'bs':>3s} {'ckpt':10s} {'status':6s} {'loss':>8s} " \
             f"{'tokens/s':>9s} {'steady':>9s} {'peak GiB':>8s}"
    if args.lora_matrix:
        rows = lora_matrix(root)
    else:
        rows = [] if args.only else tiny_matrix(root)
        if not args.skip_6b:
            rows += six_b_runs(root, args.only, args.probe_full)
    print("\n" + header)
    for row in rows:
        print(summary(row))
    if args.record:
        record_rows(args.record, rows, "gpu-train", device, args.commit,
                    "PYTHONPATH=src python benchmarks/gpu_train_check.py")


def record_rows(path: str, rows: list[dict], run_name: str, device: str, commit: str | None, command: str,
                **fields) -> None:
    """Append `rows` (results of `run`) to the JSON-lines file `path`, under one run id, with the fields every row of
    results.jsonl carries; `fields` are added to each."""
    commit = commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    run_id = f"{run_name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps({
                "run_id": run_id, "date": datetime.date.today().isoformat(), "commit": commit, "device": device,
                "impl": "thuglm-train", "mode": "train-lora-matrix" if row.get("matrix") else f"train-{row['method']}",
                "dtype": row["precision"], "seq": row.get("max_seq_len"), "batch": row.get("batch_size"),
                "grad_ckpt": row["gradient_checkpointing"] == "true", "peak_gib": row.get("peak_memory_gib"),
                "command": command, **fields, **row,
            }, default=str) + "\n")


if __name__ == "__main__":
    main()
