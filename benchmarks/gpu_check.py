"""GPU check of the native ChatGLM-6B: numerics of every precision/attention path, then a first speed baseline.

    PYTHONPATH=src python benchmarks/gpu_check.py [--record FILE.jsonl] [--layers 28]

1. Numerics, on the real width (hidden 4096, 32 heads, inner 16384) with 2 layers: logits of bf16/fp16 x
   eager/sdpa against the fp32 eager reference, forward and backward, and greedy decoding with cache against
   without. No dtype errors anywhere (the "expected scalar type Half but found Float" class of bug).
2. Speed and memory of the full 6B shape (random weights built on the GPU): a LoRA training step (r=8 on
   query_key_value, dense, dense_h_to_4h, dense_4h_to_h, bf16, sdpa) at seq 512 and greedy decoding.
   This is thuglm before any speed work (issue #4 compares against the official code); figures go to
   FILE.jsonl with --record (then appended to benchmarks/results.jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time

import torch

import thuglm  # noqa: F401
from thuglm.models import ChatGLMConfig, ChatGLMForConditionalGeneration

GMASK, SOP, EOP, MASK, PAD = 130001, 130004, 130005, 130000, 3


def random_model(config: ChatGLMConfig, dtype: torch.dtype, attn: str = "sdpa") -> ChatGLMForConditionalGeneration:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = ChatGLMForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    model.set_attn_implementation(attn)
    return model


def sample_batch(batch: int, seq: int, vocab: int = 130000) -> dict[str, torch.Tensor]:
    text = torch.randint(20, vocab - 100, (batch, seq - 3), device="cuda")
    ids = torch.cat([torch.full((batch, 1), GMASK), torch.full((batch, 1), SOP)], 1).cuda()
    ids = torch.cat([ids, text, torch.full((batch, 1), EOP, device="cuda")], 1)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "labels": labels}


def numerics(layers: int = 2) -> list[dict]:
    config = ChatGLMConfig(num_layers=layers)
    reference = random_model(config, torch.float32, "eager")
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.02)
    batch = sample_batch(2, 128)
    prompt = batch["input_ids"][:1, :40].clone()
    prompt[0, -2:] = torch.tensor([GMASK, SOP])
    ref_out = reference(**batch)
    ref_out.loss.backward()
    ref_grad = reference.transformer.layers[0].attention.query_key_value.weight.grad.float()
    ref_logits = ref_out.logits.float()
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for attn in ("eager", "sdpa", "flex_attention"):
            if attn == "flex_attention" and dtype == torch.float16:
                continue
            model = random_model(config, dtype, attn)
            model.load_state_dict({k: v.to(dtype) for k, v in reference.state_dict().items()})
            out = model(**batch)
            out.loss.backward()
            grad = model.transformer.layers[0].attention.query_key_value.weight.grad.float()
            logits = out.logits.float()
            with torch.no_grad():
                cached = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
                uncached = model.generate(
                    input_ids=prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, use_cache=False
                )
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "attn": attn,
                    "logits_max_rel_err": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                    "loss": out.loss.item(),
                    "loss_ref": ref_out.loss.item(),
                    "grad_rel_err": ((grad - ref_grad).norm() / ref_grad.norm()).item(),
                    "cache_equals_no_cache": bool(torch.equal(cached, uncached)),
                }
            )
            del model
            torch.cuda.empty_cache()
    return rows


def packed_numerics(layers: int = 2) -> dict[str, float]:
    """Rows packing two samples each plus left padding: every attention path against fp32 eager."""
    config = ChatGLMConfig(num_layers=layers)
    reference = random_model(config, torch.float32, "eager")
    a, b = sample_batch(2, 70), sample_batch(2, 50)
    pad = torch.full((2, 8), PAD, device="cuda")
    ids = torch.cat([pad, a["input_ids"], b["input_ids"]], 1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(a["input_ids"]), 2 * torch.ones_like(b["input_ids"])], 1)
    real = mask != 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits[real].float()
    errors = {}
    for attn in ("sdpa", "flex_attention"):
        model = random_model(config, torch.float32, attn)
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[real].float()
        errors[attn] = ((logits - expected).abs().max() / expected.abs().max()).item()
        del model
    return errors


def lora_speed(seq: int, batch: int, steps: int = 6, layers: int = 28, grad_ckpt: bool = False,
               attn: str = "sdpa") -> dict:
    from peft import LoraConfig, get_peft_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # The numerics compiled flex for other dtypes and shapes; past dynamo's recompile limit it would fall back to
    # the unfused path and time that instead (1.2k tokens/s instead of 10.4k on an H200).
    torch._dynamo.reset()
    model = random_model(ChatGLMConfig(num_layers=layers), torch.bfloat16, attn)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    row = {"mode": "lora", "seq": seq, "batch": batch, "grad_ckpt": grad_ckpt, "dtype": "bfloat16", "attn": attn}
    try:
        for step in range(steps):
            if step == 2:
                torch.cuda.synchronize()
                start = time.perf_counter()
            data = sample_batch(batch, seq)
            model(**data).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        row.update(status="ok", tokens_per_s=(steps - 2) * batch * seq / elapsed)
    except torch.OutOfMemoryError:
        row.update(status="oom", tokens_per_s=None)
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    return row


@torch.no_grad()
def decode_speed(batch: int, new_tokens: int = 128, layers: int = 28) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = random_model(ChatGLMConfig(num_layers=layers), torch.bfloat16).eval()
    prompt = sample_batch(batch, 32)["input_ids"][:, :-1]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids=prompt, **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    row = {"mode": "decode", "seq": 31 + new_tokens, "batch": batch, "grad_ckpt": False, "dtype": "bfloat16",
           "attn": "sdpa",
           "status": "ok", "tokens_per_s": batch * new_tokens / elapsed,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model
    torch.cuda.empty_cache()
    return row


@torch.no_grad()
def profile_decode(layers: int = 28, new_tokens: int = 16) -> None:
    """Where a greedy decoding step spends its time (a lead for the decode work of issue #4)."""
    from torch.profiler import ProfilerActivity, profile

    model = random_model(ChatGLMConfig(num_layers=layers), torch.bfloat16).eval()
    prompt = sample_batch(1, 32)["input_ids"][:, :-1]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    model.generate(input_ids=prompt, **kwargs)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(input_ids=prompt, **kwargs)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    print(f"\ndecode profile: {kernels / new_tokens:.0f} GPU kernels a token")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    del model
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--profile-decode", action="store_true", help="also profile a greedy decode")
    parser.add_argument("--commit", help="the commit measured (the GPU machine's copy has no .git)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    print(f"device {device}, torch {torch.__version__}")

    print("\nnumerics (2 layers of the real width, against fp32 eager):")
    print(f"{'dtype':9s} {'attn':14s} {'logits rel err':>15s} {'loss':>8s} {'qkv grad rel err':>17s} cache==nocache")
    for r in numerics():
        print(f"{r['dtype']:9s} {r['attn']:14s} {r['logits_max_rel_err']:15.2e} {r['loss']:8.4f} "
              f"{r['grad_rel_err']:17.2e} {r['cache_equals_no_cache']}")

    print("packed rows (2 samples + padding), fp32, logits rel err against eager:", packed_numerics())

    rows = [
        lora_speed(512, 4, layers=args.layers),
        lora_speed(512, 4, layers=args.layers, attn="flex_attention"),
        lora_speed(512, 8, layers=args.layers),
        lora_speed(512, 1, layers=args.layers, grad_ckpt=True),
        lora_speed(2048, 1, layers=args.layers, grad_ckpt=True),
        decode_speed(1, layers=args.layers),
        decode_speed(8, layers=args.layers),
    ]
    print("\nspeed, 6B shape, random weights, bf16 (thuglm before any optimisation):")
    print(f"{'mode':7s} {'attn':14s} {'seq':>5s} {'batch':>5s} {'ckpt':>5s} {'status':>6s} {'tokens/s':>9s} "
          f"{'peak GiB':>9s}")
    for r in rows:
        tps = f"{r['tokens_per_s']:9.0f}" if r["tokens_per_s"] else f"{'-':>9s}"
        print(f"{r['mode']:7s} {r['attn']:14s} {r['seq']:5d} {r['batch']:5d} {str(r['grad_ckpt']):>5s} {r['status']:>6s} {tps} "
              f"{r['peak_gib']:9.2f}")

    if args.profile_decode:
        profile_decode(layers=args.layers)

    if args.record:
        commit = args.commit or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        run_id = f"gpu-check-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
        with open(args.record, "a") as handle:
            for r in rows:
                handle.write(json.dumps({"run_id": run_id, "date": datetime.date.today().isoformat(),
                                         "commit": commit, "device": device, "impl": "thuglm",
                                         "command": "PYTHONPATH=src python benchmarks/gpu_check.py",
                                         "layers": args.layers, **r}) + "\n")


if __name__ == "__main__":
    main()
