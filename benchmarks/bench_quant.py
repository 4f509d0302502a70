"""Small GPUs: QLoRA training through `thuglm train`, and 4-bit / 8-bit chat decoding, on ChatGLM-6B's shape.

    PYTHONPATH=src python benchmarks/bench_quant.py --record benchmarks/results.jsonl \
        [--official-code DIR --official-site DIR] [--parts train,chat,quality]
    PYTHONPATH=src python benchmarks/bench_quant.py --smoke       # the tiny model on CPU: every part runs end to end
    PYTHONPATH=src python benchmarks/bench_quant.py --tiny-ppl    # tiny model, CPU: QLoRA against LoRA perplexity

Parts, each on random weights of the 6B shape (benchmarks/common.py, one folder built once under --work-dir):

* `train`: `thuglm train` (the CLI, in a subprocess each) for b1, seq 2048, gradient checkpointing, packing, on the
  bundled corpus: `mode: qlora` (quantization bits 4, NF4, double quant, bf16 compute) and `mode: lora` (bf16 base),
  the same steps in the same run. Rows `impl: thuglm-train` with `peak_gib` (the run's metrics.json:
  max_memory_allocated) and `tokens_per_s` (trained tokens / train time, metrics.json). Goal: QLoRA peak <= 6.0 GiB
  and >= 0.6x the LoRA tokens/s.
* `chat`: `load_for_inference(folder, quantize=4 | 8 | None)` then greedy `generate`, batch 1, prompt 32, 128 new
  tokens, both the dynamic cache (`decode: dynamic`) and what `chat` / `thuglm generate` use on CUDA
  (`decode: fast`: static cache, compiled step); with --official-code the official bf16 code in its own process
  (benchmarks/bench_decode.py's runner). Rows `impl: thuglm-chat`, `mode: int4 | int8 | bf16`, `batch: 1`; peak is
  max_memory_allocated from loading on. Goals: int4 peak <= 5.0 GiB and faster than the official bf16 code;
  int8 peak <= 7.5 GiB.
* `quality`: the logits' relative error (Frobenius norm of the difference over the bf16 logits' norm) of the 4-bit
  and 8-bit models against the bf16 model, on 2 x 128 random prompt tokens. Rows `mode: int4-quality | int8-quality`.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import ROOT, build_6b_folder, commit_id, device_name, subprocess_env, thuglm_train_run


# ---- train ---------------------------------------------------------------------------------------------------------
def train_row(model: str, mode: str, out: Path, seq: int, steps: int, smoke: bool) -> dict:
    """One `thuglm train` run in a subprocess; its metrics.json gives peak and tokens/s."""
    from thuglm.training.demo import resource_path

    overrides = [f"model={model}", f"data.files={resource_path('corpus')}", f"output_dir={out}",
                 "overwrite_output_dir=true", "report_to=[]", f"max_seq_len={seq}", "batch_size=1",
                 "gradient_checkpointing=true", "packing=true", f"max_steps={steps}", "save_steps=0",
                 "logging_steps=1", "data.validation_split=0", "method=lora"]
    if not smoke:
        overrides.append("precision=bf16")
    if mode == "qlora":
        overrides.append("quantization.bits=4")
    run, metrics = thuglm_train_run(mode, out, overrides)
    row = {"impl": "thuglm-train", "mode": mode, "seq": seq, "batch": 1, "grad_ckpt": True, "steps": steps, **run}
    if metrics is None:
        return {**row, "peak_gib": None, "tokens_per_s": None}
    return {**row, "peak_gib": metrics.get("peak_memory_gib"), "tokens_per_s": metrics.get("tokens_per_s"),
            "final_train_loss": metrics.get("final_train_loss")}


# ---- chat ----------------------------------------------------------------------------------------------------------
def prompt(config, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    special = min(config.gmask_token_id, config.bos_token_id)
    high = special - 100 if special > 1000 else config.vocab_size - 10  # below 6B's special ids; the tiny one's are low
    text = torch.randint(20, high, (batch, length - 2), generator=generator)
    tail = torch.tensor([config.gmask_token_id, config.bos_token_id]).expand(batch, 2)
    return torch.cat([text, tail], dim=1).to(device)


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(folder: Path, bits: int | None):
    from thuglm.inference import load_for_inference

    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return load_for_inference(folder, dtype=dtype, quantize=bits)[1]


@torch.no_grad()
def chat_rows(folder: Path, modes: list[str], new: int, repeats: int) -> list[dict]:
    rows = []
    for mode in modes:
        bits = {"int4": 4, "int8": 8, "bf16": None}[mode]
        reset_peak()
        try:
            model = load(folder, bits)
        except Exception as error:  # noqa: BLE001 -- recorded
            traceback.print_exc()
            rows.append({"impl": "thuglm-chat", "mode": mode, "batch": 1, "status": "error", "error": repr(error)[:300]})
            continue
        loaded = peak()
        ids = prompt(model.config, 1, 32, model.device)
        for decode in ("dynamic", "fast"):
            row = {"impl": "thuglm-chat", "mode": mode, "decode": decode, "batch": 1, "prompt_len": 32,
                   "new_tokens": new, "weights_gib": loaded}
            kwargs = {"max_new_tokens": new, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
            if decode == "fast":
                fast = model.fast_decoding_kwargs(ids.shape[1], kwargs)
                if not fast:
                    continue  # CPU: chat decodes with the dynamic cache
                kwargs.update(fast)
            try:
                model.generate(input_ids=ids, **kwargs)  # warm-up (and compilation for the fast path)
                times = []
                for _ in range(repeats):
                    sync()
                    start = time.perf_counter()
                    out = model.generate(input_ids=ids, **kwargs)
                    sync()
                    times.append(time.perf_counter() - start)
                seconds = sorted(times)[len(times) // 2]
                assert out.shape[1] == ids.shape[1] + new, out.shape
                row.update(status="ok", tokens_per_s=new / seconds, seconds=seconds, peak_gib=peak())
            except Exception as error:  # noqa: BLE001 -- recorded, the other rows still run
                traceback.print_exc()
                row.update(status="error", error=repr(error)[:300], tokens_per_s=None, peak_gib=peak())
            print(row, flush=True)
            rows.append(row)
        del model
    return rows


def official_rows(args, new: int) -> list[dict]:
    import bench_decode

    runner = argparse.Namespace(official_code=args.official_code, official_site=args.official_site,
                                official_timeout=args.official_timeout, work_dir=args.work_dir, repeats=args.repeats)
    rows = bench_decode.run_official(runner, [(1, 32, new)])
    return [{**row, "impl": "official", "mode": "decode", "dtype": "bf16", "decode": "official"} for row in rows]


# ---- quality -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def quality_rows(folder: Path) -> list[dict]:
    reference = load(folder, None)
    ids = prompt(reference.config, 2, 128, reference.device, seed=1)
    expected = reference(ids).logits.float()
    del reference
    reset_peak()
    rows = []
    for bits in (4, 8):
        model = load(folder, bits)
        got = model(ids).logits.float()
        error = ((got - expected).norm() / expected.norm()).item()
        agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        rows.append({"impl": "thuglm-chat", "mode": f"int{bits}-quality", "logits_rel_err_vs_bf16": error,
                     "argmax_agreement_vs_bf16": agreement, "status": "ok"})
        print(rows[-1], flush=True)
        del model, got
        reset_peak()
    return rows


# ---- the tiny model's perplexity: QLoRA against LoRA ---------------------------------------------------------------
def tiny_perplexity(work: Path, steps: int) -> list[dict]:
    """Two runs of `thuglm train` on the tiny official-layout model, the same data and steps: LoRA on the fp32 base
    (the CPU's precision; bf16 on a GPU) and QLoRA on its NF4 copy; eval perplexity on the held-out 5%."""
    from thuglm.training.demo import resource_path

    tiny = ROOT / "tests" / "fixtures" / "official_tiny"
    rows = []
    for mode in ("lora", "qlora"):
        out = work / f"tiny-{mode}"
        overrides = [f"model={tiny}", f"data.files={resource_path('corpus')}", f"output_dir={out}",
                     "overwrite_output_dir=true", "report_to=[]", "max_seq_len=128", "batch_size=8",
                     f"max_steps={steps}", "save_steps=0", "learning_rate=2e-3", "data.validation_split=0.05",
                     "seed=0"]
        if mode == "qlora":
            overrides.append("quantization.bits=4")
        config = work / "tiny.yaml"
        work.mkdir(parents=True, exist_ok=True)
        config.write_text("{}\n")
        done = subprocess.run([sys.executable, "-m", "thuglm", "train", str(config), *overrides], capture_output=True,
                              text=True, check=False, env=subprocess_env())
        metrics = json.loads((out / "metrics.json").read_text()) if done.returncode == 0 else {}
        rows.append({"impl": "thuglm-train", "mode": f"tiny-{mode}", "model": "tiny", "steps": steps,
                     "eval_loss": metrics.get("eval_loss"), "perplexity": metrics.get("perplexity"),
                     "status": "ok" if metrics else "error"})
        print(rows[-1], flush=True)
    return rows


# ---- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny model on CPU: every part runs end to end")
    parser.add_argument("--tiny-ppl", action="store_true", help="only the tiny model's QLoRA-vs-LoRA perplexity")
    parser.add_argument("--parts", default="train,chat,quality")
    parser.add_argument("--chat-modes", default="int4,int8,bf16", help="the `chat` part's models, of int4,int8,bf16")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (a copy without .git cannot tell)")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-code", help="folder with the official modeling/configuration_chatglm.py")
    parser.add_argument("--official-site", help="folder with transformers 4.34.1 and its pins (pip --target)")
    parser.add_argument("--official-timeout", type=float, default=300)
    parser.add_argument("--work-dir", default="/tmp/bench_quant")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import thuglm  # noqa: F401

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.tiny_ppl:
        rows += tiny_perplexity(work, args.train_steps if args.train_steps != 30 else 150)
    else:
        parts = args.parts.split(",")
        if args.smoke:
            from thuglm.models.tiny import cached_tiny_chatglm

            folder, seq, steps, new = cached_tiny_chatglm(), 128, 2, 8
        else:
            if not torch.cuda.is_available():
                sys.exit("bench_quant.py measures a GPU; use --smoke on a CPU")
            folder, seq, steps, new = build_6b_folder(work / "glm6b"), 2048, args.train_steps, args.new_tokens
        if "train" in parts:
            for mode in ("lora", "qlora"):
                rows.append(train_row(str(folder), mode, work / f"train-{mode}", seq, steps, args.smoke))
                print(rows[-1], flush=True)
        if "chat" in parts:
            rows += chat_rows(folder, args.chat_modes.split(","), new, 1 if args.smoke else args.repeats)
            if args.official_code and args.official_site:
                rows += official_rows(args, new)
        if "quality" in parts:
            rows += quality_rows(folder)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    common = {"run_id": f"quant-{stamp}", "date": time.strftime("%Y-%m-%d"), "commit": args.commit or commit_id(ROOT),
              "device": device_name(), "model": "tiny" if args.smoke or args.tiny_ppl else "6b-shape",
              "dtype": "bf16" if torch.cuda.is_available() else "fp32"}
    rows = [{**common, **row} for row in rows]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
