"""Training speed and memory of the ChatGLM-6B shape: thuglm against the official code, in one run, one table.

    PYTHONPATH=src python benchmarks/bench_train.py --official-site /tmp/official_site --record rows.jsonl
    PYTHONPATH=src python benchmarks/bench_train.py --smoke          # tiny shape on the CPU (CI)

Random weights of the real shape (28 layers, hidden 4096, vocabulary 130,528) are built directly on the GPU, in bf16.
Each batch is an SFT sample as the tutorials build it: a prompt (a quarter of the row), `[gMASK] <sop>`, the answer;
labels -100 on the prompt. One step is forward, backward and the optimizer; tokens/s counts every token of the batch
over timed steps after warm-up; peak is `torch.cuda.max_memory_allocated` since the model was built (weights
included). The card is capped at 80 GB (`set_per_process_memory_fraction`), so "fits" means fits an 80 GB card.

Modes: `lora` (peft, r=8, alpha 32, dropout 0.1 on dense, dense_h_to_4h, dense_4h_to_h: the tutorial's setup; AdamW),
`qlora` (the same adapters on NF4 weights through bitsandbytes; thuglm only), `full` (all weights; the official code
with pure-bf16 AdamW, thuglm with `thuglm.training.optim.Adafactor` stepped in the backward pass).

The official side (THUDM/chatglm-6b's modeling_chatglm.py with transformers 4.34.1 and peft 0.5.0) runs in a
subprocess whose PYTHONPATH holds those packages (`--official-site`) and whose modeling files come from
`--official-dir`; neither is part of this repository. thuglm runs in another subprocess with the current packages.
`--check` compares thuglm's fast paths in bf16 with the eager fp32 path first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import types
from pathlib import Path

import torch
from common import SIX_B, kernel_time, random_chatglm

GMASK, MASK, SOP, EOP, PAD = 130001, 130000, 130004, 130005, 3
# The official code needs the real special-token ids, so the smoke shape keeps the real vocabulary.
SMOKE = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 256,
         "vocab_size": 130528, "max_sequence_length": 2048}
LORA_TARGETS = ["dense", "dense_h_to_4h", "dense_4h_to_h"]
CARD_GIB = 79.6  # an 80 GB H100 as torch reports it (81,559 MiB)
RESULT = "RESULT "


# ---- plans -------------------------------------------------------------------------------------------------------
def plan(mode: str, seq: int, batch: int, grad_ckpt: bool, **variant) -> dict:
    return {"mode": mode, "seq": seq, "batch": batch, "grad_ckpt": grad_ckpt, **variant}


def full_plans(impl: str) -> list[dict]:
    if impl == "official":
        lora = [plan("lora", 512, b, False) for b in (4, 8, 16)]
        lora += [plan("lora", 512, 1, True), plan("lora", 2048, 1, True), plan("lora", 2048, 2, False)]
        lora += [plan("lora", s, 1, True) for s in (4096, 8192, 16384)]
        return lora + [plan("full", 512, 1, True)]
    # thuglm: eager, then with every block compiled (torch.compile, one graph per shape).
    lora = [plan("lora", 512, b, False) for b in (8, 16)]
    lora += [plan("lora", 512, b, False, compile=True) for b in (16, 20)]
    lora += [plan("lora", 512, 1, True), plan("lora", 512, 1, True, compile=True)]
    lora += [plan("lora", s, 1, True) for s in (2048, 4096, 8192, 16384)]
    lora += [plan("lora", s, 1, True, attn="flex_attention") for s in (16384, 20480)]
    qlora = [plan("qlora", 512, 1, True), plan("qlora", 2048, 1, True)]
    full = [plan("full", 512, 1, True), plan("full", 512, 1, True, compile=True), plan("full", 512, 4, True)]
    return lora + qlora + full


def smoke_plans(impl: str) -> list[dict]:
    return [plan("lora", 32, 2, False), plan("lora", 32, 1, True), plan("full", 32, 1, True)]


# ---- data --------------------------------------------------------------------------------------------------------
def sft_batch(batch: int, seq: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """prompt [gMASK] <sop> answer; labels from <sop> on, as the official ptuning/LoRA tutorials build them."""
    generator = torch.Generator().manual_seed(seed)
    prompt = max(1, seq // 4)
    ids = torch.randint(20, 120000, (batch, seq), generator=generator)
    ids[:, prompt], ids[:, prompt + 1], ids[:, -1] = GMASK, SOP, EOP
    labels = ids.clone()
    labels[:, : prompt + 1] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


# ---- models ------------------------------------------------------------------------------------------------------
def build_thuglm(shape: dict, device, dtype, attn: str = "sdpa"):
    from thuglm.models import ChatGLMConfig

    return random_chatglm(ChatGLMConfig(**shape, use_cache=False), dtype, device, attn)


def build_official(shape: dict, device, dtype, official_dir: Path):
    # Import the official files as a package (their imports are relative), without copying them anywhere.
    package = types.ModuleType("chatglm_official")
    package.__path__ = [str(official_dir)]
    sys.modules["chatglm_official"] = package
    configuration = importlib.import_module("chatglm_official.configuration_chatglm")
    modeling = importlib.import_module("chatglm_official.modeling_chatglm")
    config = configuration.ChatGLMConfig(**shape, use_cache=False, bos_token_id=SOP, eos_token_id=EOP,
                                         mask_token_id=MASK, gmask_token_id=GMASK, pad_token_id=PAD)
    # The official constructor allocates its linears with skip_init on the CPU in fp16 (the checkpoint fills them);
    # build them initialised, in the benchmark dtype, directly on the device instead.
    modeling.skip_init = lambda cls, *args, **kwargs: cls(*args, **{**kwargs, "device": device, "dtype": dtype})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = modeling.ChatGLMForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # As thuglm's _init_weights: LayerNorms 1 / 0, biases 0, weights N(0, 0.02).
            if "layernorm" in name or name.endswith("bias"):
                param.fill_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype)


def quantize_nf4(model) -> None:
    """Swap every linear of the transformer layers for a bitsandbytes NF4 Linear4bit (double quantisation, bf16 compute).

    What `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` builds, done on
    weights already on the GPU. The embedding (tied to the lm_head) stays bf16, as transformers leaves it.
    """
    import bitsandbytes as bnb

    for block in model.transformer.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True).to(child.weight.device)
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, quantized)
                del child
    gc.collect()
    torch.cuda.empty_cache()


def add_lora(model):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                        target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def transformer_blocks(model) -> torch.nn.ModuleList:
    return next(module for name, module in model.named_modules() if name.endswith("transformer.layers"))


# ---- one worker process: one implementation, every plan ----------------------------------------------------------
class TrainingStep:
    """A model of one mode with its optimizer, stepping batches of any size."""

    def __init__(self, impl: str, mode: str, shape: dict, device, dtype, official_dir: Path | None):
        self.impl, self.mode, self.device = impl, mode, device
        self.in_backward = False
        if impl == "official":
            model = build_official(shape, device, dtype, official_dir)
        else:
            model = build_thuglm(shape, device, dtype)
        if mode == "qlora":
            quantize_nf4(model)
        if mode in ("lora", "qlora"):
            model = add_lora(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
        elif impl == "official":
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        else:
            from thuglm.training.optim import Adafactor, step_in_backward

            self.optimizer = Adafactor(model.parameters(), lr=1e-5)
            step_in_backward(self.optimizer)
            self.in_backward = True
        self.model = model.train()
        self.grad_ckpt: bool | None = None
        self.autocast = False  # adapters' matmuls under autocast, without peft's fp32 copy of their inputs

    def set_checkpointing(self, on: bool) -> None:
        if on == self.grad_ckpt:
            return
        model = self.model
        if on and self.impl == "official":
            model.gradient_checkpointing_enable()  # torch's reentrant checkpoint, as the official code calls it
            if self.mode != "full":
                model.enable_input_require_grads()  # what the LoRA tutorials add for reentrant checkpointing
        elif on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        self.grad_ckpt = on

    def forward_context(self) -> contextlib.AbstractContextManager:
        """What `thuglm train` runs a bf16 LoRA forward in: autocast, peft's input casting off (GlmTrainer)."""
        stack = contextlib.ExitStack()
        if self.autocast:
            from peft.helpers import disable_input_dtype_casting

            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            stack.enter_context(disable_input_dtype_casting(self.model))
        return stack

    def step(self, batch: dict) -> torch.Tensor:
        with self.forward_context():
            loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        if not self.in_backward:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def measure(trainer: TrainingStep, spec: dict, seconds: float, warmup: int, min_steps: int) -> dict:
    seconds, warmup, min_steps = (spec.get(k, v) for k, v in (("seconds", seconds), ("warmup", warmup),
                                                              ("min_steps", min_steps)))
    device = trainer.device
    cuda = device.type == "cuda"
    trainer.set_checkpointing(spec["grad_ckpt"])
    trainer.autocast = bool(spec.get("autocast"))
    if spec.get("attn"):
        trainer.model.set_attn_implementation(spec["attn"])
    if spec.get("compile"):
        for block in transformer_blocks(trainer.model):
            block.compile()
    batch = sft_batch(spec["batch"], spec["seq"], device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(warmup):
        loss = trainer.step(batch)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        loss = trainer.step(batch)
        steps += 1
        if cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = spec["batch"] * spec["seq"] * steps
    return {"status": "ok" if torch.isfinite(loss).item() else "nan", "tokens_per_s": round(tokens / elapsed, 1),
            "step_s": round(elapsed / steps, 4), "steps": steps, "warmup_s": round(warm_s, 2),
            "loss": round(loss.item(), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}


def reset_after(trainer: TrainingStep | None, spec: dict) -> None:
    if trainer is not None:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.autocast = False
        if spec.get("attn"):
            trainer.model.set_attn_implementation("sdpa")
        if spec.get("compile"):
            for block in transformer_blocks(trainer.model):
                block._compiled_call_impl = None  # back to eager for the plans after this one
            torch._dynamo.reset()  # the next compiled plan compiles its own shape, not a dynamic one
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_step(trainer: TrainingStep, spec: dict) -> None:
    """Top kernels of one step, to see where the time goes (printed, not recorded)."""
    from torch.profiler import ProfilerActivity, profile

    trainer.set_checkpointing(spec["grad_ckpt"])
    batch = sft_batch(spec["batch"], spec["seq"], trainer.device)
    trainer.step(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step(batch)
        torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start)
    averages = prof.key_averages()
    kernels, busy_ms = kernel_time(prof)
    print(f"profile {spec}: {kernels} kernels, {busy_ms:.1f} ms of kernel time in {wall_ms:.1f} ms "
          "(profiled, so the wall time is inflated)", flush=True)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(averages.table(sort_by=key, row_limit=40, max_name_column_width=70), flush=True)
            break
        except Exception as error:  # noqa: BLE001  (the sort key's name changed across torch versions)
            print(f"profile table by {key}: {error}")


def worker(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_GIB * 2**30 / total))
    shape = SMOKE if args.smoke else SIX_B
    plans = json.loads(args.plans)
    official_dir = Path(args.official_dir) if args.official_dir else None
    trainer: TrainingStep | None = None
    versions = versions_of(args.worker)
    for spec in plans:
        row = {"impl": args.worker, **spec, "dtype": str(dtype).removeprefix("torch."), **versions}
        try:
            if trainer is None or trainer.mode != spec["mode"]:
                trainer = None
                reset_after(None, spec)
                trainer = TrainingStep(args.worker, spec["mode"], shape, device, dtype, official_dir)
                if args.profile and spec["mode"] == "lora" and device.type == "cuda":
                    profile_step(trainer, plan("lora", 512, 8, False))
            row.update(measure(trainer, spec, args.seconds, args.warmup, args.min_steps))
            if spec.get("profile") and device.type == "cuda":
                profile_step(trainer, spec)
        except torch.OutOfMemoryError:
            row.update(status="oom")
        except Exception as error:  # noqa: BLE001  (record every failure and go on)
            traceback.print_exc()
            row.update(status="error", error=f"{type(error).__name__}: {error}"[:300])
        reset_after(trainer, spec)
        print(RESULT + json.dumps(row), flush=True)


def versions_of(impl: str) -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# ---- numerics: fast paths in bf16 against the eager fp32 path ----------------------------------------------------
def check_numerics(layers: int = 2, compiled_check: bool = True) -> list[dict]:
    """Loss and gradients of thuglm's training fast paths in bf16 against eager attention + plain loss in fp32.

    Two layers of the real width and the real vocabulary; the plain bf16 path is measured too, as the yardstick of
    what bf16 alone costs.
    """
    shape = {**SIX_B, "num_layers": layers}
    device = torch.device("cuda")
    reference = build_thuglm(shape, device, torch.float32, attn="eager").train()
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    batch = sft_batch(2, 512, device, seed=1)
    watched = ["transformer.layers.0.attention.query_key_value.weight",
               f"transformer.layers.{layers - 1}.mlp.dense_4h_to_h.weight", "transformer.word_embeddings.weight"]

    def run(model, **kwargs):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False, **kwargs).loss
        loss.backward()
        params = dict(model.named_parameters())
        return loss.item(), [params[name].grad.float() for name in watched]

    expected_loss, expected_grads = run(reference, skip_logits=False)
    del reference
    rows = []
    variants = [("bf16 eager, plain loss", "eager", False, False), ("bf16 sdpa, plain loss", "sdpa", False, False),
                ("bf16 sdpa, chunked loss", "sdpa", True, False),
                ("bf16 flex, chunked loss", "flex_attention", True, False)]
    if compiled_check:
        variants.append(("bf16 sdpa, chunked loss, compiled blocks", "sdpa", True, True))
    for label, attn, chunked, compiled in variants:
        try:
            model = build_thuglm(shape, device, torch.bfloat16, attn=attn).train()
            model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
            if compiled:
                for block in model.transformer.layers:
                    block.compile()
            loss, grads = run(model, skip_logits=chunked)
            errors = [((g - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, expected_grads)]
            row = {"variant": label, "loss_rel_err": abs(loss - expected_loss) / abs(expected_loss),
                   "grad_rel_err": dict(zip(["qkv.0", "4h_to_h.last", "embedding"], errors)), "status": "ok"}
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            row = {"variant": label, "status": "error", "error": f"{type(error).__name__}: {error}"[:300]}
        print(f"check {json.dumps(row)}", flush=True)
        rows.append(row)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


# ---- driver ------------------------------------------------------------------------------------------------------
def run_worker(impl: str, plans: list[dict], args) -> list[dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    here = Path(__file__).resolve()
    if impl == "official":
        env["PYTHONPATH"] = os.pathsep.join(p for p in [args.official_site, args.extra_site] if p)
    else:
        src = str(here.parents[1] / "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [src, args.extra_site, env.get("PYTHONPATH")] if p)
    command = [sys.executable, str(here), "--worker", impl, "--plans", json.dumps(plans), "--seconds",
               str(args.seconds), "--warmup", str(args.warmup), "--min-steps", str(args.min_steps)]
    command += ["--official-dir", args.official_dir] if args.official_dir else []
    command += ["--smoke"] if args.smoke else []
    command += ["--profile"] if args.profile and impl == "thuglm" else []
    rows = []
    timeout = args.official_timeout if impl == "official" else args.thuglm_timeout
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    except OSError as error:
        print(f"{impl} worker failed to start: {error}")
    else:
        timer = threading.Timer(timeout, process.kill)  # a worker past its time leaves the rest of its plans
        timer.start()
        for line in process.stdout:
            if line.startswith(RESULT):
                rows.append(json.loads(line[len(RESULT):]))
                print(summary(rows[-1]), flush=True)
            else:
                print(line, end="", flush=True)
        process.wait()
        timer.cancel()
    for spec in plans[len(rows):]:  # a worker that died or ran out of time leaves its remaining plans unmeasured
        rows.append({"impl": impl, **spec, "status": "not_run"})
    return rows


def summary(row: dict) -> str:
    variant = ",".join(f"{k}={row[k]}" for k in ("attn", "compile", "autocast") if row.get(k)) or "-"
    tps = f"{row['tokens_per_s']:>10,.0f}" if row.get("tokens_per_s") else f"{'-':>10s}"
    peak = f"{row['peak_gib']:>8.2f}" if row.get("peak_gib") else f"{'-':>8s}"
    return (f"{row['impl']:9s} {row['mode']:6s} {row['seq']:>6} {row['batch']:>3} {row['grad_ckpt']!s:5s} "
            f"{variant:24s} {row['status']:7s} {tps} {peak} {row.get('error', '')}")


HEADER = f"{'impl':9s} {'mode':6s} {'seq':>6s} {'bs':>3s} {'ckpt':5s} {'variant':24s} {'status':7s} " \
         f"{'tokens/s':>10s} {'peak GiB':>8s}"


def ratios(rows: list[dict]) -> list[str]:
    """thuglm against the official code on the same card: the best s512 LoRA throughput and the matching rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines = []
    best = {impl: max((r for r in ok if r["impl"] == impl and r["mode"] == "lora" and r["seq"] == 512
                       and not r["grad_ckpt"]), key=lambda r: r["tokens_per_s"], default=None)
            for impl in ("thuglm", "official")}
    if best["thuglm"] and best["official"]:
        lines.append(f"LoRA s512, best batch that fits 80 GB: thuglm b{best['thuglm']['batch']} "
                     f"{best['thuglm']['tokens_per_s']:,.0f} / official b{best['official']['batch']} "
                     f"{best['official']['tokens_per_s']:,.0f} tokens/s = "
                     f"{best['thuglm']['tokens_per_s'] / best['official']['tokens_per_s']:.2f}x")
    for twin in (o for o in ok if o["impl"] == "official"):
        same = [r for r in ok if r["impl"] == "thuglm" and all(r[k] == twin[k] for k in
                                                               ("mode", "seq", "batch", "grad_ckpt"))]
        for r in sorted(same, key=lambda r: r["tokens_per_s"]):
            variant = ",".join(k for k in ("attn", "compile", "autocast") if r.get(k)) or "eager"
            lines.append(f"{r['mode']} s{r['seq']} b{r['batch']} ckpt={r['grad_ckpt']} ({variant}): "
                         f"{r['tokens_per_s'] / twin['tokens_per_s']:.2f}x tokens/s, peak {r['peak_gib']:.2f} "
                         f"vs {twin['peak_gib']:.2f} GiB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: the script runs end to end")
    parser.add_argument("--impl", default="official,thuglm", help="comma-separated: official, thuglm")
    parser.add_argument("--modes", default="lora,qlora,full")
    parser.add_argument("--official-site", help="site folder with transformers 4.34.1, tokenizers, hub, peft 0.5")
    parser.add_argument("--official-dir", default=str(Path(__file__).resolve().parents[1] / ".official"),
                        help="folder with the official modeling_chatglm.py and configuration_chatglm.py")
    parser.add_argument("--extra-site", help="extra site folder for both sides (bitsandbytes)")
    parser.add_argument("--record", help="append one JSON line per measurement to this file")
    parser.add_argument("--commit", help="the commit measured (the GPU machine's copy has no .git)")
    parser.add_argument("--run-id", help="the rows' run_id (default bench-train-TIME): the same as other scripts' rows "
                        "of one run, e.g. profile_recipe.py's `thuglm train` rows")
    parser.add_argument("--check", action="store_true", help="numerics of the fast paths first (GPU)")
    parser.add_argument("--check-compile", action="store_true", help="with --check: compiled blocks too")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of a thuglm LoRA step")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--official-timeout", type=float, default=240.0, help="seconds for the official worker")
    parser.add_argument("--thuglm-timeout", type=float, default=420.0, help="seconds for the thuglm worker")
    parser.add_argument("--only", help="JSON list of plans to run instead of the built-in grid (a plan with an "
                        "`impl` key runs for that implementation only; `profile: true` prints its top kernels)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plans", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.seconds, args.warmup, args.min_steps = 0.0, 1, 1
    impls = [i for i in args.impl.split(",") if i]
    if "official" in impls and not args.official_site:
        print("no --official-site: measuring thuglm only")
        impls.remove("official")
    modes = set(args.modes.split(","))
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    print(f"device {device_name}, torch {torch.__version__}", flush=True)
    check_rows = check_numerics(compiled_check=args.check_compile) if args.check and device_name != "cpu" else []
    rows = []
    for impl in impls:
        plans = json.loads(args.only) if args.only else (smoke_plans(impl) if args.smoke else full_plans(impl))
        plans = [p for p in plans if p["mode"] in modes and (impl == "thuglm" or p["mode"] != "qlora")
                 and p.get("impl", impl) == impl]
        if plans:
            rows += run_worker(impl, plans, args)
    print("\n" + HEADER)
    for row in rows:
        print(summary(row))
    for line in ratios(rows):
        print(line)
    if args.record:
        record(args, rows, check_rows, device_name)


def record(args, rows: list[dict], check_rows: list[dict], device_name: str) -> None:
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           check=False).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    common = {"run_id": args.run_id or f"bench-train-{now:%Y%m%dT%H%M%S}", "date": now.date().isoformat(), "commit": commit,
              "device": device_name, "command": "python benchmarks/bench_train.py" + (" --smoke" if args.smoke else "")}
    with open(args.record, "a") as handle:
        handle.writelines(json.dumps({**common, "tokens_per_s": None, "peak_gib": None, **row}) + "\n" for row in rows)
        handle.writelines(json.dumps({**common, "impl": "thuglm", "mode": "check", "dtype": "bfloat16", "seq": 512,
                                     "batch": 2, "grad_ckpt": False, **row}) + "\n" for row in check_rows)


if __name__ == "__main__":
    main()
