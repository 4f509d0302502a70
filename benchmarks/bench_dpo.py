"""Preference tuning (`task: dpo`) through `thuglm train` on ChatGLM-6B's shape: peak memory and tokens/s of a step.

    PYTHONPATH=src python benchmarks/bench_dpo.py --record benchmarks/results.jsonl [--modes dpo,orpo] [--steps 20] \
        [--model-folder /tmp/bench_quant/glm6b]
    PYTHONPATH=src python benchmarks/bench_dpo.py --smoke [--modes dpo,orpo]   # the tiny model on CPU, end to end

On the lent GPU machine TRL comes from the carried wheels: `.whl/trl-1.16.0-py3-none-any.whl` (git-ignored; fetch it
with `pip download trl==1.16.0 --no-deps -d .whl`), installed with the others by `benchmarks/gpu_session.sh`, or by
hand: `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site:src.

`thuglm train` (the CLI, in a subprocess) on random bf16 weights of the 6B shape (benchmarks/common.py, built once
under --work-dir), LoRA (r 8 on query_key_value, dense, dense_h_to_4h, dense_4h_to_h), bf16, gradient checkpointing,
batch 1 pair, every answer laid out as `prompt [gMASK] <sop> answer` of exactly 1024 tokens (long prompts and answers
from the bundled corpus, shortened by the SFT layout's rules), so a step forwards 2 x 1024 tokens with the adapter
and 2 x 1024 without it (the reference, for `dpo`). Modes: `dpo` (loss_type sigmoid: the reference is the base with
the adapter off), `orpo` (no reference). Rows `impl: thuglm-train`, `mode: dpo | orpo`, `seq: 1024`, `batch: 1`,
`peak_gib` (metrics.json: max_memory_allocated) and `tokens_per_s` (the tokens of both answers trained a second,
metrics.json). Goal: `dpo` peak <= 16 GiB.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT, build_6b_folder, commit_id, device_name, thuglm_train_run

SEQ = 1024
GOAL_PEAK_GIB = 16.0
LOSS_TYPES = {"dpo": "sigmoid", "orpo": "orpo"}


def write_pairs(path: Path, count: int, chars: int) -> Path:
    """`count` alpaca ranking rows whose question and two answers are each `chars` characters of the bundled corpus
    (different passages), longer than a row holds: the layout cuts each sample to max_seq_len tokens."""
    sys.path.insert(0, str(ROOT / "src"))
    from thuglm.training.demo import resource_path

    text = "".join(row["content"] for file in sorted(resource_path("corpus").glob("*.csv"))
                   for row in csv.DictReader(file.open(encoding="utf-8")))
    rows = []
    for index in range(count):
        start = index * 3 * chars
        question, chosen, rejected = (text[(start + part * chars) % (len(text) - chars):][:chars] for part in range(3))
        rows.append({"instruction": question, "input": "", "chosen": chosen, "rejected": rejected})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def train_row(model: str, mode: str, data: Path, out: Path, steps: int, smoke: bool) -> dict:
    """One `thuglm train` run in a subprocess; its metrics.json gives peak and tokens/s."""
    overrides = [f"model={model}", "task=dpo", "method=lora", f"dpo.loss_type={LOSS_TYPES[mode]}",
                 f"data.files={data}", "data.format=alpaca", "data.validation_split=0", f"output_dir={out}",
                 "overwrite_output_dir=true", "report_to=[]", f"max_seq_len={SEQ}", "batch_size=1",
                 "gradient_checkpointing=true", f"max_steps={steps}", "save_steps=0", "logging_steps=1"]
    if not smoke:
        overrides.append("precision=bf16")
    run, metrics = thuglm_train_run(mode, out, overrides)
    row = {"impl": "thuglm-train", "mode": mode, "seq": SEQ, "batch": 1, "grad_ckpt": True, "steps": steps, **run}
    if metrics is None:
        return {**row, "peak_gib": None, "tokens_per_s": None}
    peak = metrics.get("peak_memory_gib")
    return {**row, "peak_gib": peak, "tokens_per_s": metrics.get("tokens_per_s"),
            "train_tokens": metrics.get("train_tokens"), "final_train_loss": metrics.get("final_train_loss"),
            "rewards_accuracies": metrics.get("rewards/accuracies"),
            "goal_peak_gib": GOAL_PEAK_GIB if mode == "dpo" else None,
            "meets_goal": (peak <= GOAL_PEAK_GIB) if mode == "dpo" and peak is not None and not smoke else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny model on CPU: the modes run end to end")
    parser.add_argument("--modes", default="dpo", help=f"of {','.join(LOSS_TYPES)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (a copy without .git cannot tell)")
    parser.add_argument("--work-dir", default="/tmp/bench_dpo")
    parser.add_argument("--model-folder", help="the 6B-shape folder to use or build (default WORK_DIR/glm6b); a warm "
                        "machine's /tmp/bench_quant/glm6b saves building one")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import thuglm  # noqa: F401

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    if args.smoke:
        from thuglm.models.tiny import cached_tiny_chatglm

        folder, steps = cached_tiny_chatglm(), 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_dpo.py measures a GPU; use --smoke on a CPU")
        folder, steps = build_6b_folder(Path(args.model_folder or work / "glm6b")), args.steps
    data = write_pairs(work / "pairs.json", count=max(steps, 4) + 4, chars=2 * SEQ)
    rows = []
    for mode in modes:
        rows.append(train_row(str(folder), mode, data, work / f"train-{mode}", steps, args.smoke))
        print(rows[-1], flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    common = {"run_id": f"dpo-{stamp}", "date": time.strftime("%Y-%m-%d"), "commit": args.commit or commit_id(ROOT),
              "device": device_name(), "model": "tiny" if args.smoke else "6b-shape",
              "dtype": "fp32" if args.smoke else "bf16"}
    rows = [{**common, **row} for row in rows]
    for row in rows:
        print("ROW " + json.dumps(row, ensure_ascii=False))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if any(row["status"] != "ok" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
