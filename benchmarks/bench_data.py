"""Tokenizing + packing a Chinese corpus on CPU: thuglm's data pipeline against the tutorial's approach.

    PYTHONPATH=src python benchmarks/bench_data.py [--megabytes 100] [--tutorial-megabytes 10] [--record FILE]
    PYTHONPATH=src python benchmarks/bench_data.py --smoke      # a 0.2 MB corpus, seconds (CI)

The corpus is the bundled one (src/thuglm/resources/corpus/*.csv), its rows repeated and shuffled into CSV files of
10 MB in a temporary folder (generated, never committed). Both approaches use the tiny demo tokenizer and 2 worker
processes, back to back in the same run, each with a fresh datasets cache:

* thuglm: `load_raw_dataset` + `encode_text_dataset(packing=True, num_proc=2)`: sentencepiece's batched encoder,
  texts cut into windows and packed into full rows of --max-seq-len tokens;
* tutorial (zero_nlp style): `load_dataset("csv")` + `map` calling the tokenizer once per row with
  `padding="max_length", truncation=True` (texts longer than a row are cut off, short ones padded).

The tutorial may run on a slice of the corpus (--tutorial-megabytes); the ratio is in MB/s of raw CSV. Then the
streaming path (`streaming=True`, every row consumed) runs in a fresh process per corpus size, whose peak RSS
should stay flat as the corpus grows.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import commit_id

MAX_SEQ_LEN = 512
FILE_MEGABYTES = 10


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> float:
    """CSV files (title, content) of the bundled corpus's rows, shuffled and repeated to `megabytes`; returns MB."""
    from thuglm.models.tiny import bundled_corpus_dir

    rows = []
    for path in sorted(bundled_corpus_dir().glob("*.csv")):
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows += [(row["title"], row["content"]) for row in csv.DictReader(handle) if row["content"].strip()]
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    target, written, index = megabytes * 1e6, 0, 0
    while written < target:
        path = folder / f"part-{index:04d}.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["title", "content"])
            while handle.tell() < FILE_MEGABYTES * 1e6 and written + handle.tell() < target:
                rng.shuffle(rows)
                writer.writerows(rows)
        written += path.stat().st_size
        index += 1
    return written / 1e6


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (datasets' map workers): contention on a shared machine
    stretches wall time, much less this."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tiny_tokenizer():
    from thuglm.models import ChatGLMTokenizer
    from thuglm.models.tiny import cached_tiny_chatglm

    return ChatGLMTokenizer.from_pretrained(cached_tiny_chatglm())


def run_thuglm(folder: Path, cache_dir: str, num_proc: int) -> dict:
    from thuglm.data.loading import load_raw_dataset
    from thuglm.data.processing import encode_text_dataset

    tokenizer = tiny_tokenizer()
    start = time.perf_counter()
    dataset = load_raw_dataset(str(folder / "*.csv"), cache_dir=cache_dir)
    rows = encode_text_dataset(
        dataset, tokenizer, text_column="content", max_seq_len=MAX_SEQ_LEN, packing=True, num_proc=num_proc
    )
    seconds = time.perf_counter() - start
    lengths = [len(ids) for ids in rows["input_ids"]]
    return {"seconds": seconds, "rows": len(rows), "tokens": sum(lengths), "slots": len(rows) * MAX_SEQ_LEN}


def _tutorial_row(row: dict, tokenizer) -> dict:
    """zero_nlp's preprocessing: one tokenizer call per text, padded to the full row length."""
    return tokenizer(row["content"], max_length=MAX_SEQ_LEN, truncation=True, padding="max_length")


def run_tutorial(folder: Path, cache_dir: str, num_proc: int) -> dict:
    import datasets

    tokenizer = tiny_tokenizer()
    files = sorted(str(path) for path in folder.glob("*.csv"))
    start = time.perf_counter()
    dataset = datasets.load_dataset("csv", data_files=files, split="train", cache_dir=cache_dir)
    rows = dataset.map(
        _tutorial_row, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names, num_proc=num_proc
    )
    seconds = time.perf_counter() - start
    real = sum(sum(mask) for mask in rows["attention_mask"])
    return {"seconds": seconds, "rows": len(rows), "tokens": real, "slots": len(rows) * MAX_SEQ_LEN}


def streaming_peak_rss(folder: Path) -> dict:
    """Child process: the streamed pipeline over every row; its peak RSS in MiB."""
    from thuglm.data.loading import load_raw_dataset
    from thuglm.data.processing import encode_text_dataset

    tokenizer = tiny_tokenizer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports and tokenizer: the floor
    start = time.perf_counter()
    dataset = load_raw_dataset(str(folder / "*.csv"), streaming=True)
    rows = encode_text_dataset(dataset, tokenizer, text_column="content", max_seq_len=MAX_SEQ_LEN, packing=True)
    count = tokens = 0
    for row in rows:
        count += 1
        tokens += len(row["input_ids"])
    return {"seconds": time.perf_counter() - start, "rows": count, "tokens": tokens,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_before_mib": before}


def run_streaming(folder: Path) -> dict:
    command = [sys.executable, __file__, "--streaming-child", str(folder)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=100.0, help="corpus size for thuglm's pipeline")
    parser.add_argument("--tutorial-megabytes", type=float, default=10.0, help="the slice the tutorial approach runs")
    parser.add_argument("--streaming-megabytes", default="25,50,100", help="corpus sizes for the streaming RSS")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="0.2 MB, one process, every step once (CI)")
    parser.add_argument("--record", help="append result rows (JSON lines) to this file")
    parser.add_argument("--note", default="", help="recorded with the rows (e.g. that the machine was shared)")
    parser.add_argument("--streaming-only", action="store_true", help="only the streaming RSS rows")
    parser.add_argument("--streaming-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.streaming_child:
        print(json.dumps(streaming_peak_rss(Path(args.streaming_child))))
        return
    if args.smoke:  # every step once, on a corpus small enough for CI
        args.megabytes, args.tutorial_megabytes, args.streaming_megabytes, args.num_proc = 0.2, 0.2, "0.2", 1

    tiny_tokenizer()  # build the tiny model folder once, outside the timings
    work = Path(tempfile.mkdtemp(prefix="thuglm-bench-data-"))
    results = []
    try:
        full = work / "corpus"
        megabytes = write_corpus(full, args.megabytes)
        sliced = work / "slice"
        slice_megabytes = write_corpus(sliced, min(args.tutorial_megabytes, args.megabytes))
        print(f"corpus {megabytes:.1f} MB in {len(list(full.glob('*.csv')))} files; tutorial slice "
              f"{slice_megabytes:.1f} MB; {os.cpu_count()} cores, num_proc={args.num_proc}", flush=True)

        batch_runs = (
            ("thuglm", run_thuglm, full, megabytes),
            ("tutorial", run_tutorial, sliced, slice_megabytes),
            ("thuglm", run_thuglm, sliced, slice_megabytes),
        )
        for impl, function, folder, size in () if args.streaming_only else batch_runs:
            cache_dir = tempfile.mkdtemp(dir=work)  # fresh: nothing read from an earlier run's cache
            cpu_start = cpu_seconds()
            result = function(folder, cache_dir, args.num_proc)
            cpu_s = cpu_seconds() - cpu_start
            shutil.rmtree(cache_dir, ignore_errors=True)
            result.update(impl=impl, megabytes=round(size, 2), mb_per_s=size / result["seconds"], cpu_s=cpu_s,
                          mb_per_cpu_s=size / cpu_s, fill=result["tokens"] / result["slots"])
            print(f"{impl:9s} {size:6.1f} MB {result['seconds']:7.1f} s {result['mb_per_s']:6.2f} MB/s, "
                  f"{cpu_s:7.1f} CPU s {result['mb_per_cpu_s']:6.2f} MB/CPU-s, {result['rows']:8d} rows, "
                  f"{100 * result['fill']:.0f}% of the row slots are tokens", flush=True)
            results.append({"mode": "tokenize-pack", **result})

        for size in [float(s) for s in args.streaming_megabytes.split(",")]:
            folder = work / f"stream-{size:g}"
            actual = write_corpus(folder, size)
            result = run_streaming(folder)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"streaming {actual:6.1f} MB {result['seconds']:7.1f} s peak RSS {result['peak_rss_mib']:.0f} MiB "
                  f"({result['peak_rss_before_mib']:.0f} MiB before the first row)", flush=True)
            results.append({"mode": "tokenize-pack-streaming", "impl": "thuglm", "megabytes": round(actual, 2),
                            "mb_per_s": actual / result["seconds"], **result})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tutorial = next((r for r in results if r["impl"] == "tutorial"), None)
    for r in results:
        if tutorial and r["mode"] == "tokenize-pack" and r["impl"] == "thuglm":
            r["x_tutorial"] = r["mb_per_s"] / tutorial["mb_per_s"]
            r["x_tutorial_cpu"] = r["mb_per_cpu_s"] / tutorial["mb_per_cpu_s"]
            print(f"thuglm on {r['megabytes']} MB: {r['x_tutorial']:.1f}x the tutorial's MB/s (wall), "
                  f"{r['x_tutorial_cpu']:.1f}x its MB per CPU second")

    if args.record:
        common = {"run_id": f"data-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
                  "date": f"{datetime.date.today()}", "commit": commit_id(),
                  "device": f"cpu ({os.cpu_count()} cores)", "dtype": None, "seq": MAX_SEQ_LEN, "batch": None,
                  "grad_ckpt": None, "status": "ok", "tokens_per_s": None, "peak_gib": None,
                  "num_proc": args.num_proc, "tokenizer": "tiny demo (3,000 pieces)",
                  "command": "python benchmarks/bench_data.py" + (" --smoke" if args.smoke else ""), "note": args.note}
        records = [{**common, **r, "tokens_per_s": r["tokens"] / r["seconds"]} for r in results]
        for record in records:
            if "peak_rss_mib" in record:
                record["peak_gib"] = record["peak_rss_mib"] / 1024
        with open(args.record, "a") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


if __name__ == "__main__":
    main()
