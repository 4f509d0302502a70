"""benchmarks/bench_train.py runs end to end on the CPU (tiny shape), so the GPU script never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_smoke_records_every_plan(tmp_path):
    record = tmp_path / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--smoke", "--impl", "thuglm",
                             "--record", str(record), "--commit", "test"],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert {(r["mode"], r["grad_ckpt"]) for r in rows} >= {("lora", False), ("lora", True), ("full", True)}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["impl"] == "thuglm" and row["commit"] == "test" and row["tokens_per_s"] > 0
        assert {"run_id", "date", "device", "dtype", "seq", "batch", "peak_gib"} <= row.keys()
