"""benchmarks/bench_dpo.py --smoke: a DPO step of `thuglm train` on the tiny model, its row as the GPU run writes it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_dpo_smoke_trains_and_writes_its_row(tmp_path):
    record = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--smoke", "--work-dir", str(tmp_path / "work"),
         "--record", str(record)],
        capture_output=True, text=True, timeout=600, check=False,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert row["impl"] == "thuglm-train" and row["mode"] == "dpo" and row["status"] == "ok"
    assert row["seq"] == 1024 and row["batch"] == 1 and row["steps"] == 2
    assert row["train_tokens"] == 2 * 2 * 1024  # two steps of one pair: both answers laid out to 1024 tokens
    assert row["peak_gib"] > 0 and row["tokens_per_s"] > 0
