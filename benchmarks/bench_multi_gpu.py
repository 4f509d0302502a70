"""Tokens/s and memory of `thuglm train` on 1 and 2 GPUs: DDP LoRA and FSDP full fine-tuning of the 6B shape.

    PYTHONPATH=src python benchmarks/bench_multi_gpu.py --record benchmarks/results.jsonl     # a machine with >= 2 GPUs
    PYTHONPATH=src python benchmarks/bench_multi_gpu.py --smoke                               # tiny model, CPU, gloo

Every run is the recipe users run, started as users start it: `thuglm train CONFIG` on one GPU, `thuglm train
--nproc 2` (torchrun, DDP) or `accelerate launch --config_file configs/accelerate/fsdp_*.yaml -m thuglm train` on
two. The model is ChatGLM-6B's shape (28 layers, hidden 4096, vocabulary 130,528) with random bf16 weights, saved
once as a model folder with the tiny tokenizer beside it; the data are the bundled corpus packed in rows of `seq`.

Scaling is weak: `batch` rows per GPU, so two GPUs take twice the rows a step. tokens_per_s is the median of the
rates the Trainer logs (summed over the processes; each since the previous log) after the first WARMUP_STEPS logs; run_tokens_per_s is
the whole training loop's average. peak_gib is `torch.cuda.max_memory_allocated` on the first GPU (the others hold
the same share). scaling_efficiency (2-GPU rows) = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU).

The FSDP modes run under their FSDP config on 1 GPU as on 2 (one process shards nothing, but trains as the two do:
fp32 master weights, FSDP's activation checkpointing), so the two rows differ only in the number of GPUs. Full
fine-tuning with AdamW then holds 6.2B x 16 bytes = 99 GB on the one GPU: the 1-GPU row needs a card larger than
80 GB (an H200); the 2-GPU row is the one that must fit 80 GB. Runs write no resumable checkpoints (`save_steps=0`:
the end-of-run checkpoint of full fine-tuning is ~75 GB of AdamW state, minutes of disk writes that are not training);
the final model is written, then measured (saved_gib, saved_dtypes) and deleted.
`--smoke` runs the same launches on the CPU with gloo and the tiny model (FSDP, which accelerate runs only on GPUs,
becomes DDP there) to check the script, not the speed; its rows go to --record only if asked.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import build_6b_folder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
WARMUP_STEPS = 3
RUN_TIMEOUT_S = 300  # one launch; a hung one must not take the other rows with it
CARD_GIB = 79.6  # an 80 GB card as torch counts it

# mode -> how each number of GPUs runs it. batch is per GPU.
PLANS = {
    # Logged every 5 steps (users' default is 10): each log reads the loss and the token count back from the GPUs.
    "train-lora-ddp": {"method": "lora", "seq": 512, "batch": 4, "grad_ckpt": False, "steps": 80, "logging_steps": 5,
                       "launch": {1: "single", 2: "torchrun"}},
    # The same with `compile: true` (fewer, fused kernels: a step less bound by the host); the first steps compile.
    "train-lora-ddp-compiled": {"method": "lora", "seq": 512, "batch": 4, "grad_ckpt": False, "steps": 80,
                                "logging_steps": 5, "overrides": ["compile=true"],
                                "launch": {1: "single", 2: "torchrun"}},
    "train-lora-fsdp": {"method": "lora", "seq": 512, "batch": 4, "grad_ckpt": True, "steps": 30,
                        "launch": {1: "fsdp_lora", 2: "fsdp_lora"}},
    "train-full-fsdp": {"method": "full", "seq": 512, "batch": 1, "grad_ckpt": True, "steps": 12,
                        "launch": {1: "fsdp_full", 2: "fsdp_full"}},
    # ZeRO-2: optimizer states and gradients split, weights whole on each GPU. Full fine-tuning holds ~12 GB of bf16
    # weights plus half of 74 GB (fp32 masters, AdamW's moments) a GPU on 2; one GPU would need all of it.
    "train-lora-zero2": {"method": "lora", "seq": 512, "batch": 4, "grad_ckpt": False, "steps": 40, "logging_steps": 5,
                         "launch": {1: "deepspeed_zero2", 2: "deepspeed_zero2"}, "needs": "deepspeed"},
    "train-full-zero2": {"method": "full", "seq": 512, "batch": 1, "grad_ckpt": True, "steps": 12,
                         "launch": {2: "deepspeed_zero2"}, "needs": "deepspeed", "timeout_s": 420},
    # CPU Adam's first step builds its extension, and the final model is gathered from the shards: give it time.
    "train-full-zero3-offload": {"method": "full", "seq": 512, "batch": 1, "grad_ckpt": True, "steps": 8,
                                 "launch": {2: "deepspeed_zero3_offload"}, "needs": "deepspeed", "timeout_s": 540},
}


def write_base_config(root: Path, precision: str) -> Path:
    """root/base.yaml, the config every run shares: the bundled corpus, a step logged each step, no checkpoints or
    TensorBoard; the runs add the model, method and shape as overrides."""
    corpus = REPO / "src" / "thuglm" / "resources" / "corpus"
    config = root / "base.yaml"
    config.write_text(
        f"data: {{files: ['{corpus}'], cache_dir: '{root / 'hf-cache'}'}}\n"
        f"precision: {precision}\nlogging_steps: 1\nsave_steps: 100000\nreport_to: []\n"
        "learning_rate: 1.0e-5\nwarmup_ratio: 0.0\nseed: 0\n",
        encoding="utf-8",
    )
    return config


def command(launch: str, gpus: int, config: Path, overrides: list[str]) -> list[str]:
    train = ["-m", "thuglm", "train", str(config), *overrides]
    if launch == "single":
        return [sys.executable, *train]
    if launch == "torchrun":
        return [sys.executable, "-m", "thuglm", "train", "--nproc", str(gpus), str(config), *overrides]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{launch}.yaml"),
            "--num_processes", str(gpus), *train]


def run_one(mode: str, plan: dict, gpus: int, model: str, root: Path, smoke: bool) -> dict:
    launch = plan["launch"][gpus]
    if smoke and launch.startswith("fsdp"):
        launch = "torchrun"  # accelerate runs FSDP only on GPUs; on the CPU the same launch would be DDP anyway
    out = root / f"{mode}-{gpus}"
    config = root / "base.yaml"
    overrides = [f"model={model}", f"method={plan['method']}", f"output_dir={out}", "overwrite_output_dir=true",
                 f"max_seq_len={plan['seq']}",
                 f"batch_size={plan['batch']}", f"gradient_checkpointing={str(plan['grad_ckpt']).lower()}",
                 f"max_steps={plan['steps']}", "save_steps=0", f"logging_steps={plan.get('logging_steps', 1)}",
                 *plan.get("overrides", [])]
    argv = command(launch, gpus, config, overrides)
    start = time.perf_counter()
    env = dict(os.environ)
    if not smoke:
        # Exactly `gpus` cards: a single process that saw two would have the Trainer split each batch by DataParallel.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in range(gpus))
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False,
                              timeout=plan.get("timeout_s", RUN_TIMEOUT_S))
    except subprocess.TimeoutExpired as expired:
        done = subprocess.CompletedProcess(argv, -9, (expired.stdout or b"").decode(errors="replace"),
                                           f"stopped after {plan.get('timeout_s', RUN_TIMEOUT_S)} s\n"
                                           + (expired.stderr or b"").decode(errors="replace"))
    row = {"mode": mode, "gpus": gpus, "launcher": launch, "method": plan["method"], "seq": plan["seq"],
           "batch": plan["batch"], "global_batch": plan["batch"] * gpus, "grad_ckpt": plan["grad_ckpt"],
           "steps": plan["steps"], "wall_s": round(time.perf_counter() - start, 1),
           "command": " ".join(argv[1:]).replace(str(root), "$ROOT")}
    metrics_file = out / "metrics.json"
    (root / f"{mode}-{gpus}.log").write_text(done.stdout + "\n" + done.stderr, encoding="utf-8")
    if done.returncode != 0 or not metrics_file.is_file():
        cause = first_failure(done.stderr + "\n" + done.stdout)
        row.update(status="oom" if "OutOfMemoryError" in cause else "error", error=cause[-600:])
        print(f"{mode} on {gpus}: {cause}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        return row
    metrics = json.loads(metrics_file.read_text())
    row.update(
        status="ok", tokens_per_s=steady_throughput(out), run_tokens_per_s=metrics["tokens_per_s"],
        peak_gib=metrics["peak_memory_gib"], peak_kind=metrics["peak_memory_kind"],
        final_train_loss=metrics["final_train_loss"], processes=metrics.get("processes"),
    )
    if metrics["peak_memory_kind"].startswith("cuda"):
        row["fits_80gb"] = metrics["peak_memory_gib"] < CARD_GIB
    row.update(saved_model(out))
    shutil.rmtree(out)  # the trained 6B model is 12 GB a run, and the disk is finite
    return row


def saved_model(out: Path) -> dict:
    """Size and dtypes of the weights the run saved (the model, or the LoRA adapter), from the files' headers."""
    from safetensors import safe_open

    files = sorted(out.glob("*.safetensors"))
    dtypes = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            dtypes.update(str(handle.get_slice(name).get_dtype()) for name in handle.keys())
    return {"saved_gib": round(sum(file.stat().st_size for file in files) / 2**30, 2), "saved_dtypes": sorted(dtypes)}


def first_failure(log: str) -> str:
    """The child's own error, not the launcher's ChildFailedError that follows it: the first exception line (with
    the traceback line above it), or `thuglm: ...` for a user error."""
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("thuglm: ") or (
            re.match(r"^[\w.]*(Error|Exception)\b", line) and "ChildFailedError" not in line
        ):
            return "\n".join(lines[max(0, index - 2) : index + 1])
    return "\n".join(lines[-8:])


def steady_throughput(out: Path) -> float | None:
    """Median of the per-step tokens/s the Trainer logged, after the warm-up steps."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    speeds = [entry["tokens_per_s"] for entry in history if "tokens_per_s" in entry][WARMUP_STEPS:]
    return round(statistics.median(speeds), 1) if speeds else None


def add_scaling(rows: list[dict]) -> None:
    """Against the latest 1-GPU row of the same mode (with --repeats, the one run just before), or else of the same
    method (ZeRO-3 has no 1-GPU launch)."""
    single = [row for row in rows if row["gpus"] == 1 and row["status"] == "ok"]
    by_mode, by_method = {row["mode"]: row for row in single}, {row["method"]: row for row in single}
    for row in rows:
        base = by_mode.get(row["mode"]) or by_method.get(row["method"])
        if "scaling_efficiency" in row:
            continue
        if row["gpus"] > 1 and row["status"] == "ok" and base and base.get("tokens_per_s") and row.get("tokens_per_s"):
            row["scaling_efficiency"] = round(row["tokens_per_s"] / (row["gpus"] * base["tokens_per_s"]), 3)
            row["baseline_mode"] = base["mode"]


def summary(row: dict) -> str:
    def number(key, width, digits=0):
        value = row.get(key)
        return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    return (f"{row['mode']:26s} {row['gpus']:>4} {row['launcher']:24s} {row['seq']:>5} {row['batch']:>3} "
            f"{row['grad_ckpt']!s:5s} {row['status']:6s} {number('tokens_per_s', 10)} "
            f"{number('run_tokens_per_s', 10)} {number('peak_gib', 8, 2)} {number('scaling_efficiency', 7, 3)} "
            f"{number('saved_gib', 9, 2)} {','.join(row.get('saved_dtypes', []))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU with gloo: checks the script")
    parser.add_argument("--root", default="/tmp/thuglm-multi-gpu")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (a copy without .git cannot tell)")
    parser.add_argument("--modes", nargs="*", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--gpus", nargs="*", type=int, default=[1, 2], help="which GPU counts to run (1, 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every (mode, GPUs) this many times, the modes and GPU counts taking turns, so that "
                             "a machine's drift does not land on one of them; each 2-GPU row scales against the "
                             "1-GPU row just before it, and the summary gives the median")
    args = parser.parse_args()

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the children too: CPU processes with gloo
        device, model, gpu_counts = "cpu (smoke)", "tiny", (1, 2)
        plans = {mode: {**plan, "seq": 64, "batch": 2, "steps": 4} for mode, plan in PLANS.items()
                 if "needs" not in plan and mode != "train-lora-fsdp" and "compile=true" not in plan.get("overrides", [])}
    else:
        if torch.cuda.device_count() < max(args.gpus):  # `--gpus 1` measures the 1-GPU rows on a 1-GPU machine
            sys.exit(f"--gpus {' '.join(map(str, args.gpus))} needs {max(args.gpus)} GPU(s), found "
                     f"{torch.cuda.device_count()}; --smoke checks the script on the CPU")
        device, gpu_counts = torch.cuda.get_device_name(), (1, 2)
        start = time.perf_counter()
        model = str(build_6b_folder(root / "glm6b"))
        print(f"6B-shape folder ready in {time.perf_counter() - start:.0f} s")
        plans = {mode: plan for mode, plan in PLANS.items()
                 if "needs" not in plan or importlib.util.find_spec(plan["needs"]) is not None}
    write_base_config(root, "fp32" if args.smoke else "bf16")
    commit = args.commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    run_id = f"multi-gpu-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    rows = []
    launches = [(repeat, mode, gpus) for repeat in range(args.repeats) for mode in args.modes if mode in plans
                for gpus in gpu_counts if gpus in plans[mode]["launch"] and gpus in args.gpus]
    for repeat, mode, gpus in launches:
        row = {**run_one(mode, plans[mode], gpus, model, root, args.smoke), "repeat": repeat}
        rows.append(row)
        add_scaling(rows)  # the 1-GPU row of a mode runs before its 2-GPU row
        print(summary(row), flush=True)
        if args.record:  # row by row: a run stopped by a time limit keeps what it measured
            with open(args.record, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({
                    "run_id": run_id, "date": datetime.date.today().isoformat(), "commit": commit,
                    "device": device, "impl": "thuglm", "dtype": "fp32" if args.smoke else "bf16",
                    "model": model if args.smoke else "6b-shape", **row,
                }) + "\n")
    print(f"\n{'mode':26s} {'gpus':>4} {'launcher':24s} {'seq':>5} {'bs':>3} {'ckpt':5s} {'status':6s} "
          f"{'tokens/s':>10s} {'run tok/s':>10s} {'peak GiB':>8s} {'scaling':>7s} {'saved GiB':>9s} saved dtypes")
    for row in rows:
        print(summary(row))
    for mode in dict.fromkeys(row["mode"] for row in rows):
        scalings = sorted(row["scaling_efficiency"] for row in rows if row["mode"] == mode and "scaling_efficiency" in row)
        if len(scalings) > 1:
            print(f"{mode}: scaling over {len(scalings)} repeats: median {statistics.median(scalings):.3f}, "
                  f"range {scalings[0]:.3f}-{scalings[-1]:.3f}")
    skipped = sorted(set(PLANS) - set(plans))
    if skipped:
        print(f"not run here: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
