"""A training process killed with SIGKILL after a checkpoint resumes to the same losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_train_e2e import base_settings, write_config

STEPS = 40
KILL_AFTER = 10


def loss_history(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def run_train(config: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "thuglm", "train", str(config), *overrides],
        check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def checkpoint_complete(folder: Path) -> bool:
    # The Trainer writes trainer_state.json last... but rng_state and the optimizer may follow; wait for all three.
    return all((folder / name).is_file() for name in ("trainer_state.json", "optimizer.pt", "rng_state.pth"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, method):
    settings = base_settings(
        tmp_path, method=method, max_steps=STEPS, save_steps=5, eval_steps=1000, learning_rate=3e-3,
        report_to=[],
    )
    settings["data"]["validation_split"] = 0.0
    settings["lora"] = {"dropout": 0.1}  # dropout makes the RNG state part of what resume must restore
    interrupted = tmp_path / "interrupted"
    config = write_config(tmp_path, **{**settings, "output_dir": str(interrupted)})

    process = subprocess.Popen(
        [sys.executable, "-m", "thuglm", "train", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while not checkpoint_complete(interrupted / f"checkpoint-{KILL_AFTER}"):
            assert process.poll() is None, f"training ended before the kill:\n{process.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        time.sleep(0.3)  # let the process get some way past the checkpoint: its later steps are lost
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "metrics.json").exists()

    resumed = run_train(config, "resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = tmp_path / "reference"
    straight = run_train(write_config(tmp_path, **{**settings, "output_dir": str(reference)}))
    assert straight.returncode == 0, straight.stderr[-3000:]

    expected, got = loss_history(reference), loss_history(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=1e-6), step
    assert json.loads((interrupted / "metrics.json").read_text())["steps"] == STEPS


def test_resume_skips_a_checkpoint_that_was_not_completely_written(tmp_path, caplog):
    from thuglm.training.recipe import latest_complete_checkpoint

    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-15" / "optimizer.pt").write_bytes(b"half")  # killed while saving
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-15" in caplog.text
    assert latest_complete_checkpoint(tmp_path / "missing") is None
