"""benchmarks/bench_decode.py and bench_data.py run end to end on the CPU (--smoke), so the scripts never rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"run_id", "date", "commit", "device", "impl", "mode", "dtype", "seq", "batch", "grad_ckpt", "status",
            "tokens_per_s", "peak_gib"}


def run_smoke(script: str, record: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--record", str(record)],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    for row in rows:
        assert REQUIRED <= row.keys(), REQUIRED - row.keys()
        assert row["status"] == "ok", row
    return rows


def test_bench_decode_smoke_static_cache_gives_the_dynamic_tokens(tmp_path):
    rows = run_smoke("bench_decode.py", tmp_path / "rows.jsonl")
    assert {r["variant"] for r in rows} == {"dynamic", "static-compiled", "static-compiled-late-stop"}
    assert {r["batch"] for r in rows} == {1, 3}
    for row in rows:
        assert row["impl"] == "thuglm" and row["mode"] == "decode" and row["tokens_per_s"] > 0
        if row["variant"] != "dynamic":
            assert row["tokens_equal_dynamic"] == 1.0


def test_bench_data_smoke_measures_both_approaches_and_streaming(tmp_path):
    rows = run_smoke("bench_data.py", tmp_path / "rows.jsonl")
    batch_rows = {r["impl"] for r in rows if r["mode"] == "tokenize-pack"}
    assert batch_rows == {"thuglm", "tutorial"}
    streaming = [r for r in rows if r["mode"] == "tokenize-pack-streaming"]
    assert streaming and all(r["peak_rss_mib"] > 0 and r["tokens"] > 0 for r in streaming)
    packed = [r for r in rows if r["impl"] == "thuglm" and r["mode"] == "tokenize-pack"]
    assert all(r["fill"] > 0.5 and r["x_tutorial"] > 0 for r in packed)
