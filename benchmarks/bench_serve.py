"""`thuglm serve` under load: one greedy request alone, then N at once, over HTTP against the app in this process.

    PYTHONPATH=src python benchmarks/bench_serve.py [--record benchmarks/results.jsonl]   # GPU, 6B shape, bf16
    PYTHONPATH=src python benchmarks/bench_serve.py --smoke                              # tiny model on CPU (CI)

The model is thuglm's ChatGLM of the 6B shape with random weights (seed 0) and the tiny demo tokenizer. Its
embedding rows past the tokenizer's 3,809 pieces are zeroed (the head is tied to them), so their logits are 0 and
greedy decoding, whose best logit over ~3,800 random ones is positive, only picks ids the tokenizer can show as text;
the head keeps the real 130,528 rows, so every step costs what it costs for ChatGLM-6B. The end token is switched
off, so every answer is exactly --new-tokens long.

The server is the real app (`create_app`) under uvicorn on a free local port; each client is a thread that POSTs a
streamed `/v1/chat/completions` (temperature 0, `max_tokens` = --new-tokens, usage included) with the standard
library's http.client and reads the server-sent events. Time to first token is the first content event a client
reads. Rows, one per concurrency level (`batch` = concurrent requests):

    tokens_per_s  completion tokens of all requests / wall time from the first request sent to the last answer
    ttft_p50_s    the median time to first token over the requests
    speedup_vs_one  tokens_per_s / the same variant's one-request row's (the goal: >= 8 at 16, ttft_p50_s <= 0.5)

for each decode step (`variant`): `dynamic`, the server's default, whose shapes follow the load, and `static`,
`thuglm serve --cuda-graphs`: every slot over the whole --max-seq-len, captured once as a CUDA graph (`cuda_graph`
says whether the capture worked; with --smoke it runs eagerly on the CPU).

A warm-up request of each concurrency runs first (CUDA kernels, allocator), untimed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import http.client
import json
import socket
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from common import SIX_B, commit_id, random_chatglm

QUESTIONS = ["介绍一下长城。", "春天适合做什么？", "写一首关于月亮的诗。", "如何学习编程？", "什么是人工智能？",
             "推荐几本好书。", "北京有哪些名胜古迹？", "怎样保持健康？"]


def build_model(smoke: bool):
    """The random-weight model (see the module's docstring) and the tiny demo tokenizer."""
    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)
    from thuglm.models import ChatGLMTokenizer
    from thuglm.models.tiny import cached_tiny_chatglm, tiny_config

    tokenizer = ChatGLMTokenizer.from_pretrained(cached_tiny_chatglm())
    shape = {} if smoke else SIX_B
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    model = random_chatglm(tiny_config(tokenizer.vocab_size, tokenizer, **shape), dtype, device).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer):] = 0
    model.generation_config.eos_token_id = -1  # no id is -1: every answer runs to max_tokens
    return model, tokenizer


@contextlib.contextmanager
def serving(service):
    """The app under uvicorn on 127.0.0.1 (a free port), in a thread; yields the port."""
    import uvicorn

    from thuglm.inference.serve import create_app

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def one_request(port: int, question: str, new_tokens: int, sent_at: float) -> dict:
    """A streamed greedy request: its time to first token, end time and completion tokens."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "stream": True, "temperature": 0,
                       "max_tokens": new_tokens, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first_token_at, usage, text = None, None, []
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                first_token_at = first_token_at or time.perf_counter()
                text.append(choice["delta"]["content"])
    connection.close()
    done_at = time.perf_counter()
    return {"ttft_s": (first_token_at or done_at) - sent_at, "done_at": done_at,
            "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "text": "".join(text)}


def concurrent_requests(port: int, count: int, new_tokens: int) -> dict:
    """`count` requests sent together (one thread each); tokens/s over the whole and the median TTFT."""
    results: list[dict | BaseException] = [None] * count
    start = time.perf_counter()

    def run(index: int) -> None:
        try:
            results[index] = one_request(port, QUESTIONS[index % len(QUESTIONS)] + f"（第{index}问）", new_tokens,
                                         time.perf_counter())
        except BaseException as error:  # noqa: BLE001 -- raised below in the main thread
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    wall = max(r["done_at"] for r in results) - start
    tokens = sum(r["completion_tokens"] for r in results)
    return {"tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(r["ttft_s"] for r in results), 4),
            "ttft_max_s": round(max(r["ttft_s"] for r in results), 4), "wall_s": round(wall, 3),
            "completion_tokens": tokens, "prompt_len": round(statistics.mean(r["prompt_tokens"] for r in results), 1),
            "full_length": all(r["completion_tokens"] == new_tokens for r in results)}


def measure_variant(variant: str, model, tokenizer, levels: list[int], new_tokens: int, args, common: dict) -> list[dict]:
    """One server with this decode step; a row per concurrency level, each with its speedup over one request."""
    from thuglm.inference.serve import ChatService

    if variant not in ("dynamic", "static"):
        raise SystemExit(f"unknown variant {variant!r}: dynamic or static")
    service = ChatService(model, tokenizer, slots=max(levels), max_seq_len=args.max_seq_len,
                          model_name="6b-shape-random", static_decode=variant == "static")
    rows = []
    with serving(service) as port:
        for count in levels:
            if not args.smoke:
                torch.cuda.reset_peak_memory_stats()
            try:
                concurrent_requests(port, count, min(new_tokens, 16))  # warm-up, untimed
                measured = concurrent_requests(port, count, new_tokens)
                status = "ok"
            except Exception as error:  # noqa: BLE001 -- recorded as status "error"
                traceback.print_exc()
                measured, status = {"tokens_per_s": None, "ttft_p50_s": None, "error": repr(error)[:300]}, "error"
            peak = torch.cuda.max_memory_allocated() / 2**30 if not args.smoke else None
            # Captured by the scheduler thread before its first request; None if capturing failed (eager fallback).
            graph = service.batcher.static_step is not None and service.batcher.static_step.graph is not None
            row = {**common, "variant": variant, "cuda_graph": graph, "batch": count, "status": status, **measured,
                   "seq": round(measured.get("prompt_len", 0) + new_tokens), "peak_gib": peak and round(peak, 3)}
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    del service
    gc.collect()
    if not args.smoke:
        torch.cuda.empty_cache()
    alone = next((r["tokens_per_s"] for r in rows if r["batch"] == 1 and r["tokens_per_s"]), None)
    for row in rows:
        if alone and row["tokens_per_s"]:
            row["speedup_vs_one"] = round(row["tokens_per_s"] / alone, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: the script runs end to end")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--commit", help="the commit measured (a copy without .git cannot tell)")
    parser.add_argument("--concurrency", default=None, help="comma-separated request counts (default 1,16; smoke 1,3)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens a request generates (default 128; smoke 8)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="tokens a KV-cache slot holds")
    parser.add_argument("--variants", default="dynamic,static", help="decode steps to measure, comma-separated: "
                        "dynamic (the default step, shapes follow the load), static (`thuglm serve --cuda-graphs`: "
                        "fixed shapes, a CUDA graph on a GPU; run eagerly with --smoke)")
    args = parser.parse_args()

    levels = [int(n) for n in (args.concurrency or ("1,3" if args.smoke else "1,16")).split(",")]
    new_tokens = args.new_tokens or (8 if args.smoke else 128)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke for the tiny model on the CPU")
    device_name = "cpu" if args.smoke else torch.cuda.get_device_name()
    print(f"device {device_name}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    model, tokenizer = build_model(args.smoke)
    run_id = f"serve-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    common = {"run_id": run_id, "date": f"{datetime.date.today()}", "commit": args.commit or commit_id(),
              "device": device_name, "impl": "thuglm-serve", "mode": "serve", "dtype": "fp32" if args.smoke else "bf16",
              "model": "tiny" if args.smoke else "6b-shape", "grad_ckpt": False, "new_tokens": new_tokens,
              "slots": max(levels), "torch": torch.__version__,
              "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])}
    rows = []
    for variant in args.variants.split(","):
        rows += measure_variant(variant, model, tokenizer, levels, new_tokens, args, common)
    print(f"\n{'variant':8s} {'graph':>5s} {'batch':>5s} {'status':>6s} {'tokens/s':>9s} {'x one':>6s} {'ttft p50':>9s} "
          f"{'peak GiB':>8s}")
    for row in rows:
        print(f"{row['variant']:8s} {row['cuda_graph']!s:>5s} {row['batch']:5d} {row['status']:>6s} "
              f"{row['tokens_per_s'] or 0:9.1f} {row.get('speedup_vs_one', 0):6.2f} {row['ttft_p50_s'] or 0:9.3f} "
              f"{row['peak_gib'] or 0:8.2f}")
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        with open(args.record, "a") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if any(row["status"] != "ok" for row in rows) or (args.smoke and not all(r["full_length"] for r in rows)):
        raise SystemExit("a serve benchmark row failed (see above)")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
