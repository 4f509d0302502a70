"""P-Tuning v2 next to LoRA on the ChatGLM-6B shape, through `thuglm train` (the recipe users run), one GPU.

    PYTHONPATH=src python benchmarks/bench_ptuning.py [--record FILE.jsonl] [--commit HASH]
    PYTHONPATH=src python benchmarks/bench_ptuning.py --smoke     # CPU: the tiny model, 2 steps a plan

First the tiny model trains with ptuning in bf16 and fp16, checkpointing off and on (no dtype error, a finite loss).
Then the plans, b1 s512, bf16 (the official recipe's pre_seq_len 128): ptuning without and with prefix_projection, and LoRA
(r 8, the default targets), each with gradient checkpointing off and on. Each row: status, final loss, tokens/s of
the whole loop, steady tokens/s (median of the logged steps after the third) and peak torch.cuda memory. Rows are
mode "train-ptuning" / "train-lora" with `bench: ptuning` in --record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gpu_train_check import record_rows, run

import thuglm  # noqa: F401

PLANS = [
    {"method": "ptuning", "ptuning.pre_seq_len": 128, "ptuning.prefix_projection": "false"},
    {"method": "ptuning", "ptuning.pre_seq_len": 128, "ptuning.prefix_projection": "true"},
    {"method": "lora"},
]


def summary(row: dict) -> str:
    name = row["method"] + ("+proj" if row.get("ptuning.prefix_projection") == "true" else "")
    tps = f"{row['tokens_per_s']:9.0f}" if row.get("tokens_per_s") else f"{'-':>9s}"
    steady = f"{row['steady_tokens_per_s']:9.0f}" if row.get("steady_tokens_per_s") else f"{'-':>9s}"
    peak = f"{row['peak_memory_gib']:8.2f}" if row.get("peak_memory_gib") is not None else f"{'-':>8s}"
    loss = f"{row['final_train_loss']:8.3f}" if row.get("final_train_loss") is not None else f"{'-':>8s}"
    return (f"{row.get('model', ''):8s} {name:13s} {row['precision']:4s} ckpt={row['gradient_checkpointing']:5s} {row['status']:6s} {loss} {tps} {steady} {peak} "
            f"trainable={row.get('trainable_parameters', '-')} {row.get('error', '')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/thuglm-bench-ptuning")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (the GPU machine's copy has no .git)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="CPU: the tiny model, fp32, 2 steps a plan")
    args = parser.parse_args()
    root = Path(args.root)
    if args.smoke:
        from thuglm.models.tiny import cached_tiny_chatglm

        model, precision, steps, seq, device = str(cached_tiny_chatglm(root / "cache")), "fp32", 2, 64, "cpu"
        plans = [{**p, "ptuning.pre_seq_len": 4} if p["method"] == "ptuning" else p for p in PLANS]
        checkpointing = ("false",)
    else:
        from common import build_6b_folder

        model = str(build_6b_folder(root / "glm6b", tokenizer_cache=root / "cache"))
        precision, steps, seq, device = "bf16", args.steps, 512, torch.cuda.get_device_name()
        plans, checkpointing = PLANS, ("false", "true")
    print(f"device {device}, torch {torch.__version__}")
    rows = []
    if not args.smoke:  # first the dtypes: the tiny model, bf16 / fp16 x checkpointing (fp16: fp16 base, fp32 prefix)
        from thuglm.models.tiny import cached_tiny_chatglm

        tiny = str(cached_tiny_chatglm(root / "cache"))
        for tiny_precision in ("bf16", "fp16"):
            for ckpt in ("false", "true"):
                row = run(tiny, root / f"tiny-{tiny_precision}-{ckpt}", method="ptuning", precision=tiny_precision,
                          gradient_checkpointing=ckpt, max_seq_len=128, batch_size=4, max_steps=8)
                row["model"] = "tiny"
                rows.append(row)
                print(summary(row), flush=True)
    for plan in plans:
        for ckpt in checkpointing:
            tag = f"{plan['method']}-{plan.get('ptuning.prefix_projection', '')}-{ckpt}"
            row = run(model, root / tag, **plan, precision=precision, gradient_checkpointing=ckpt,
                      max_seq_len=seq, batch_size=1, max_steps=steps)
            row["model"] = "tiny" if args.smoke else "6b-shape"
            rows.append(row)
            print(summary(row), flush=True)
            print("ROW " + json.dumps(row, default=str), flush=True)  # kept if a time limit ends the run
    print()
    for row in rows:
        print(summary(row))
    if args.record:
        record_rows(args.record, rows, "bench-ptuning", device, args.commit,
                    "PYTHONPATH=src python benchmarks/bench_ptuning.py", bench="ptuning")
    if any(row["status"] != "ok" for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
