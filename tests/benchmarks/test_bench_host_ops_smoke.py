"""benchmarks/bench_host_ops.py --smoke: the operations and host time of `thuglm train` steps, as its rows record them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_host_ops_smoke_counts_the_operations_of_a_step(tmp_path):
    record = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_host_ops.py"), "--smoke", "--record", str(record)],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpointed, plain = (json.loads(line) for line in record.read_text().splitlines())
    assert checkpointed["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    for row in (checkpointed, plain):
        assert row["impl"] == "thuglm-train" and row["mode"] == "host-ops-lora" and row["layers"] == 2
        assert 0 < row["kernel_ops"] < row["all_ops"] and row["host_ms_min"] > 0
    # The recomputation dispatches each layer's forward a second time.
    assert checkpointed["kernel_ops"] > plain["kernel_ops"]
