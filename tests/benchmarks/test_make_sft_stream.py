"""benchmarks/make_sft_stream.py: the FP8 curve's stream is deterministic, nearly all distinct, and its answers follow
from its instructions (what makes it learnable by rule rather than by heart)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make(path: Path, seed: int) -> list[dict]:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_sft_stream.py"), str(path), "--rows", "2000",
                    "--seed", str(seed)], check=True, capture_output=True, timeout=120)
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_stream_is_deterministic_distinct_and_answers_by_rule(tmp_path):
    rows = make(tmp_path / "a.json", seed=0)
    assert rows == make(tmp_path / "b.json", seed=0)
    assert rows != make(tmp_path / "c.json", seed=1)
    assert len({json.dumps(row) for row in rows}) > 0.98 * len(rows)
    kinds = {"sum": 0, "difference": 0, "reversed": 0}
    for row in rows:
        if match := re.fullmatch(r"计算 (\d+) 加 (\d+)。", row["instruction"]):
            a, b = map(int, match.groups())
            assert row["output"] == f"{a} 加 {b} 等于 {a + b}。"
            kinds["sum"] += 1
        elif match := re.fullmatch(r"计算 (\d+) 减 (\d+)。", row["instruction"]):
            a, b = map(int, match.groups())
            assert row["output"] == f"{a} 减 {b} 等于 {a - b}。" and a >= b
            kinds["difference"] += 1
        elif row["instruction"] == "把下面的文字倒过来写。":
            assert row["output"] == row["input"][::-1] and row["input"]
            kinds["reversed"] += 1
    assert min(kinds.values()) > 0.1 * len(rows)
