"""Greedy-decoding speed of thuglm against the official ChatGLM-6B code, on random weights of the real 6B shape.

    PYTHONPATH=src python benchmarks/bench_decode.py [--record FILE] [--official-site DIR --official-code DIR]
    PYTHONPATH=src python benchmarks/bench_decode.py --smoke          # tiny config on CPU (CI)

On a GPU, for every (batch, prompt length, new tokens) of the grid it times `model.generate` (greedy, no early
stop) for thuglm's paths:

* `dynamic`: the default DynamicCache, eager step (what `generate` did before issue #4);
* `static-compiled`: `cache_implementation="static"`: transformers compiles the decode step
  (torch.compile, mode "reduce-overhead": CUDA graphs) over GLM's 4D mask built outside the graph;
* `static-compiled-late-stop`: the same with thuglm's decode loop (`thuglm.models.decoding`), which reads the
  stop flag one step late, so the host no longer waits for the GPU after every token: what `model.chat`,
  `stream_chat` (static cache only) and `thuglm generate` take on CUDA;

with, for the compiled paths, the GPU time of one compiled step inside generate (CUDA events around each call);

and, with --official-code, the official `modeling_chatglm.py` (THUDM/chatglm-6b) in a subprocess whose PYTHONPATH
puts --official-site (transformers 4.34.1 and its pins) first, so the two transformers never mix. Tokens/s counts
batch x new tokens over the whole `generate` call (prefill included); peak is `max_memory_allocated`.

Before the speed rows it checks numerics on 2 layers of the real width: the fast path's per-step logits (bf16)
against an fp32 eager forward over the same tokens, next to the plain bf16 path's error.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import commit_id, random_chatglm

GMASK, SOP = 130001, 130004
GRID = [(1, 32, 128), (8, 32, 128), (1, 512, 128), (32, 32, 128)]
SMOKE_GRID = [(1, 8, 4), (3, 8, 4)]


def prompt_ids(batch: int, length: int, device, seed: int = 0, config=None) -> torch.Tensor:
    """Random text ids below the special tokens, ending `[gMASK] <sop>` as a ChatGLM prompt does."""
    gmask, sop = (config.gmask_token_id, config.bos_token_id) if config is not None else (GMASK, SOP)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(20, min(gmask, sop) - 100, (batch, length - 2), generator=generator)
    tail = torch.tensor([gmask, sop]).expand(batch, 2)
    return torch.cat([text, tail], dim=1).to(device)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_generate(generate, device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` calls of `generate()`, and its last output."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = generate()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


# ---- thuglm ------------------------------------------------------------------------------------------------------
THUGLM_VARIANTS = {
    "dynamic": {},
    "static-compiled": {"cache_implementation": "static"},
    # What chat / thuglm generate take on CUDA: the same, with thuglm's decode loop, which reads the stop flag a
    # step late so the host never waits for the GPU between tokens (thuglm.models.decoding).
    "static-compiled-late-stop": {"cache_implementation": "static", "custom_generate": "late-stop"},
}
DEFAULT_VARIANTS = "dynamic,static-compiled,static-compiled-late-stop"


def variant_kwargs(variant: str) -> dict:
    from thuglm.models.decoding import sample_without_host_sync

    kwargs = dict(THUGLM_VARIANTS[variant])
    if kwargs.get("custom_generate") == "late-stop":
        kwargs["custom_generate"] = sample_without_host_sync
    return kwargs


def compiled_step_gpu_ms(model, generate) -> float | None:
    """Median GPU time of one compiled decode step inside `generate` (CUDA events around each call of the step)."""
    compiled = getattr(model, "_compiled_call", None)
    if compiled is None:
        return None
    events = []

    def timed(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = compiled(*args, **kwargs)
        end.record()
        events.append((start, end))
        return out

    model._compiled_call = timed  # generate takes the model's cached compiled call (no recompilation)
    try:
        generate()
    finally:
        model._compiled_call = compiled
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2] if times else None


@torch.no_grad()
def thuglm_row(model, variant: str, batch: int, prompt: int, new: int, device, repeats: int) -> dict:
    ids = prompt_ids(batch, prompt, device, config=model.config)
    kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, **variant_kwargs(variant))
    reset_peak(device)
    start = time.perf_counter()
    # Warm-up: compiles and records the CUDA graphs of this shape (the static cache's length is part of it).
    model.generate(input_ids=ids, **(kwargs if variant != "dynamic" else {**kwargs, "max_new_tokens": 4}))
    synchronize(device)
    warmup_s = time.perf_counter() - start
    seconds, out = time_generate(lambda: model.generate(input_ids=ids, **kwargs), device, repeats)
    step_ms = None
    if variant != "dynamic" and torch.device(device).type == "cuda":
        try:
            step_ms = compiled_step_gpu_ms(model, lambda: model.generate(input_ids=ids, **kwargs))
        except Exception:  # noqa: BLE001 -- a diagnostic: never lose the row for it
            traceback.print_exc()
    assert out.shape == (batch, prompt + new), out.shape
    return {"impl": "thuglm", "variant": variant, "batch": batch, "prompt_len": prompt, "new_tokens": new,
            "tokens_per_s": batch * new / seconds, "seconds": seconds, "warmup_s": warmup_s,
            "step_wall_ms": 1e3 * seconds / new, "compiled_step_gpu_ms": step_ms,
            "peak_gib": peak_gib(device), "status": "ok", "_tokens": out[:, prompt:].tolist()}


# ---- the official code (run in its own process) ----------------------------------------------------------------
def official_worker(grid, repeats: int, out_file: str) -> None:
    """Runs under transformers 4.34.1: builds the official model (6B shape, bf16) and times its generate."""
    import chatglm_official
    import transformers
    from chatglm_official.configuration_chatglm import ChatGLMConfig
    from chatglm_official.modeling_chatglm import ChatGLMForConditionalGeneration

    print(f"official: transformers {transformers.__version__} from {transformers.__file__}", flush=True)
    config = ChatGLMConfig.from_pretrained(Path(chatglm_official.__file__).parent)  # the released config.json
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ChatGLMForConditionalGeneration(config, empty_init=False)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.02)
    rows = []
    for batch, prompt, new in grid:
        row = {"impl": "official", "variant": "official", "batch": batch, "prompt_len": prompt, "new_tokens": new}
        try:
            ids = prompt_ids(batch, prompt, "cuda")
            kwargs = {"max_new_tokens": new, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
            generate = functools.partial(model.generate, input_ids=ids, **kwargs)
            reset_peak("cuda")
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
                seconds, out = time_generate(generate, "cuda", repeats)
            assert out.shape == (batch, prompt + new), out.shape
            row.update(tokens_per_s=batch * new / seconds, seconds=seconds, peak_gib=peak_gib("cuda"), status="ok")
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom", tokens_per_s=None, peak_gib=peak_gib("cuda"))
        except Exception as error:  # noqa: BLE001 -- recorded, so one failing shape never loses the others
            traceback.print_exc()
            row.update(status="error", error=repr(error)[:300], tokens_per_s=None, peak_gib=None)
        print(f"official {row}", flush=True)
        rows.append(row)
        with open(out_file, "w") as handle:
            json.dump(rows, handle)


def run_official(args, grid) -> list[dict]:
    code = Path(args.official_code).resolve()
    package = code.parent / "chatglm_official"
    if not package.exists():  # the official files import each other relatively: give them a package
        package.mkdir()
        for name in ("modeling_chatglm.py", "configuration_chatglm.py", "config.json"):
            (package / name).write_text((code / name).read_text())
        (package / "__init__.py").write_text("")
    out_file = Path(args.work_dir) / "official_rows.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(args.official_site).resolve()), str(package.parent)]))
    command = [sys.executable, __file__, "--official-worker", str(out_file), "--repeats", str(args.repeats),
               "--grid", json.dumps(grid)]
    try:
        subprocess.run(command, env=env, timeout=args.official_timeout, check=False)
    except subprocess.TimeoutExpired:
        print("official: stopped at its time limit", flush=True)
    if not out_file.exists():
        return [{"impl": "official", "variant": "official", "batch": b, "prompt_len": p, "new_tokens": n,
                 "status": "error", "tokens_per_s": None, "peak_gib": None} for b, p, n in grid]
    return json.loads(out_file.read_text())


# ---- numerics ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def numerics(config, device, new: int = 16) -> list[dict]:
    """Per-step logits of each path (bf16) against an fp32 eager forward over the tokens that path generated."""
    reference = random_chatglm(config, torch.float32, device, attn="eager").eval()
    ids = prompt_ids(2, 24, device, seed=1, config=config)
    ids[0, :5] = 3  # left padding on the first row
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0
    rows = []
    for variant in DEFAULT_VARIANTS.split(","):
        model = random_chatglm(config, torch.bfloat16, device).eval()
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
        kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=3,
                      output_logits=True, return_dict_in_generate=True, **variant_kwargs(variant))
        model.generate(input_ids=ids, attention_mask=attention_mask, **kwargs)  # compile before the measured call
        out = model.generate(input_ids=ids, attention_mask=attention_mask, **kwargs)
        full_mask = torch.cat([attention_mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], dim=1)
        ref_logits = reference(input_ids=out.sequences, attention_mask=full_mask).logits.float()
        ref_steps = ref_logits[:, ids.shape[1] - 1 : -1]
        fast_steps = torch.stack(out.logits, dim=1).float()
        rel = (fast_steps - ref_steps).norm(dim=-1) / ref_steps.norm(dim=-1)
        agreement = (ref_steps.argmax(-1) == out.sequences[:, ids.shape[1] :]).float().mean().item()
        rows.append({"variant": variant, "logits_max_rel_err": rel.max().item(),
                     "greedy_agreement_with_fp32": agreement})
        del model
    return rows


# ---- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: the script runs end to end")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (a copy without .git cannot tell)")
    parser.add_argument("--grid", help="JSON list of [batch, prompt_len, new_tokens]")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {list(THUGLM_VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-code", help="folder with the official modeling/configuration_chatglm.py")
    parser.add_argument("--official-site", help="folder with transformers 4.34.1 and its pins (pip --target)")
    parser.add_argument("--official-timeout", type=float, default=240)
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip thuglm rows once this many seconds passed")
    parser.add_argument("--no-numerics", action="store_true")
    parser.add_argument("--work-dir", default=".")
    parser.add_argument("--official-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    grid = [tuple(g) for g in json.loads(args.grid)] if args.grid else (SMOKE_GRID if args.smoke else GRID)
    if args.official_worker:
        official_worker(grid, args.repeats, args.official_worker)
        return

    import thuglm  # noqa: F401
    from thuglm.models import ChatGLMConfig

    started = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        config = ChatGLMConfig(  # a small vocabulary, its special tokens at the top as in the real one
            vocab_size=1024, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128,
            mask_token_id=1000, gmask_token_id=1001, bos_token_id=1004, eos_token_id=1005,
        )
        device_name, dtype, repeats = "cpu", torch.float32, 1
    else:
        config = ChatGLMConfig()
        device_name, dtype, repeats = torch.cuda.get_device_name(), torch.bfloat16, args.repeats
    print(f"device {device_name}, torch {torch.__version__}", flush=True)

    numerics_rows = []
    if not args.smoke and not args.no_numerics:
        try:
            numerics_rows = numerics(ChatGLMConfig(num_layers=2), device)
        except Exception:  # noqa: BLE001 -- the speed rows still run
            traceback.print_exc()
        for r in numerics_rows:
            print(f"numerics {r}", flush=True)
        torch._dynamo.reset()

    model = random_chatglm(config, dtype, device).eval()
    rows, tokens = [], {}
    for variant in args.variants.split(","):
        for batch, prompt, new in grid:
            if variant == "dynamic" and not args.smoke and (batch, prompt) not in ((1, 32), (8, 32)):
                continue  # the slow baseline: two shapes say enough
            if time.perf_counter() - started > args.budget_s:
                print(f"skipped {variant} {batch}x{prompt}+{new}: time budget", flush=True)
                continue
            try:
                row = thuglm_row(model, variant, batch, prompt, new, device, 1 if variant == "dynamic" else repeats)
                tokens[(variant, batch, prompt, new)] = row.pop("_tokens")
            except torch.cuda.OutOfMemoryError:
                row = {"impl": "thuglm", "variant": variant, "batch": batch, "prompt_len": prompt, "new_tokens": new,
                       "status": "oom", "tokens_per_s": None, "peak_gib": peak_gib(device)}
            except Exception as error:  # noqa: BLE001 -- recorded as status "error"
                traceback.print_exc()
                row = {"impl": "thuglm", "variant": variant, "batch": batch, "prompt_len": prompt, "new_tokens": new,
                       "status": "error", "error": repr(error)[:300], "tokens_per_s": None, "peak_gib": None}
            print(f"thuglm {row}", flush=True)
            rows.append(row)
    # Greedy tokens of the fast path against the plain one (exact in fp32; bf16 may flip near-ties of random weights).
    for (variant, *shape), generated in tokens.items():
        plain = tokens.get(("dynamic", *shape))
        if variant != "dynamic" and plain is not None:
            same = sum(a == b for ra, rb in zip(generated, plain) for a, b in zip(ra, rb))
            total = sum(len(r) for r in plain)
            for row in rows:
                if (row["variant"], row["batch"], row["prompt_len"], row["new_tokens"]) == (variant, *shape):
                    row["tokens_equal_dynamic"] = same / total
            if args.smoke and same != total:
                raise SystemExit(f"{variant} greedy tokens differ from the dynamic cache's at {shape}")
    del model
    reset_peak(device)
    if args.official_code:
        rows += run_official(args, grid)

    run_id = f"decode-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    common = {"run_id": run_id, "date": f"{datetime.date.today()}", "commit": args.commit or commit_id(),
              "device": device_name, "mode": "decode", "dtype": "fp32" if args.smoke else "bf16", "grad_ckpt": False,
              "attn": "sdpa", "torch": torch.__version__,
              "command": "python benchmarks/bench_decode.py" + (" --smoke" if args.smoke else "")}
    records = [{**common, "seq": r["prompt_len"] + r["new_tokens"], **r} for r in rows]
    for r in numerics_rows:
        records.append({**common, "impl": "thuglm", "mode": "decode-numerics", "seq": 24 + 16, "batch": 2,
                        "status": "ok", "tokens_per_s": None, "peak_gib": None, "layers": 2, **r})

    official = {(r["batch"], r["prompt_len"], r["new_tokens"]): r.get("tokens_per_s") for r in rows
                if r["impl"] == "official"}
    print(f"\n{'impl':8s} {'variant':26s} {'batch':>5s} {'prompt+new':>10s} {'status':>6s} {'tokens/s':>9s} "
          f"{'x official':>10s} {'peak GiB':>8s}")
    for r in rows:
        base = official.get((r["batch"], r["prompt_len"], r["new_tokens"]))
        tps = r.get("tokens_per_s")
        ratio = f"{tps / base:10.2f}" if tps and base else f"{'-':>10s}"
        peak = f"{r['peak_gib']:8.2f}" if r.get("peak_gib") else f"{'-':>8s}"
        print(f"{r['impl']:8s} {r['variant']:26s} {r['batch']:5d} {r['prompt_len']:>5d}+{r['new_tokens']:<4d} "
              f"{r['status']:>6s} {tps or 0:9.1f} {ratio} {peak}")
    if args.record:
        with open(args.record, "a") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    bad = [r for r in rows if r["status"] == "error"]
    if args.smoke and bad:
        raise SystemExit(f"smoke run failed: {bad}")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
