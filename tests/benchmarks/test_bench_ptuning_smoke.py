"""benchmarks/bench_ptuning.py --smoke: every plan (ptuning, ptuning + projection, LoRA) trains the tiny model."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ptuning_smoke_trains_every_plan(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ptuning.py"), "--smoke", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("ROW ")]
    assert len(rows) == 3 and all('"status": "ok"' in row for row in rows)
