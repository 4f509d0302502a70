"""benchmarks/bench_serve.py runs end to end on the CPU (--smoke: tiny model, 1 then 3 concurrent requests, both
decode steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_serve_smoke_records_a_row_per_concurrency(tmp_path):
    record = tmp_path / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--smoke", "--record",
                             str(record), "--commit", "test"], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(row["variant"], row["batch"]) for row in rows] == [("dynamic", 1), ("dynamic", 3), ("static", 1),
                                                                  ("static", 3)]
    for row in rows:
        assert row["impl"] == "thuglm-serve" and row["mode"] == "serve" and row["status"] == "ok"
        assert row["commit"] == "test" and row["tokens_per_s"] > 0 and 0 < row["ttft_p50_s"] < 60
        assert row["completion_tokens"] == row["batch"] * row["new_tokens"] and row["full_length"]
        assert {"run_id", "date", "device", "dtype", "seq", "peak_gib"} <= row.keys()
    for alone, together in (rows[0:2], rows[2:4]):
        assert together["speedup_vs_one"] == round(together["tokens_per_s"] / alone["tokens_per_s"], 2)
    assert not any(row["cuda_graph"] for row in rows)  # no CUDA on the CPU: the fixed-shape step runs eagerly
