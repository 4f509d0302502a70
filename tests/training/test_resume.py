"""A training process killed with SIGKILL after a checkpoint resumes to the same losses as an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thuglm.cli import main

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


def run_files(output_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(output_dir)): path.read_bytes()
            for path in sorted(output_dir.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("length", ["max_steps", "epochs"])
def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, caplog, length):
    """The Trainer would train one step past max_steps (checkpoint-11, metrics.json overwritten), or at an exact
    epoch end train nothing and write train_loss 0.0."""
    settings = base_settings(tmp_path, method="lora", eval_steps=1000, report_to=[], save_steps=5, max_steps=10)
    settings["data"]["validation_split"] = 0.0
    if length == "epochs":  # 8 rows of 512 tokens, 2 a step: 4 steps an epoch, 2 epochs, checkpoints 5 and 8
        settings.update(max_steps=-1, epochs=2, max_seq_len=512, batch_size=2)
        settings["data"]["files"] = [str(Path(settings["data"]["files"][0]) / "classical_prose.csv")]
    config = write_config(tmp_path, **settings)
    out = Path(settings["output_dir"])
    assert main(["train", str(config)]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    before = run_files(out)

    caplog.clear()
    caplog.set_level(logging.INFO, logger="thuglm.train")
    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    assert run_files(out) == before
    step = state["global_step"]
    assert f"finished at step {step} of {state['max_steps']} (checkpoint-{step}): nothing to resume" in caplog.text


def test_train_loss_after_a_resume_is_the_mean_of_every_step(tmp_path, caplog):
    """A run stopped at step 4 and resumed to step 8 reports the train_loss of the 8 steps, as an uninterrupted run
    does (with a constant learning rate both take the same steps); the log names the checkpoint it resumes from."""
    settings = base_settings(tmp_path, method="lora", eval_steps=1000, report_to=[], save_steps=4, max_steps=8,
                             lr_scheduler="constant", warmup_ratio=0.0)
    settings["data"]["validation_split"] = 0.0
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = write_config(tmp_path, **settings)
    assert main(["train", str(config), f"output_dir={straight}"]) == 0
    assert main(["train", str(config), f"output_dir={resumed}", "max_steps=4"]) == 0
    caplog.clear()
    caplog.set_level(logging.INFO, logger="thuglm.train")
    assert main(["train", str(config), f"output_dir={resumed}", "resume_from_checkpoint=true"]) == 0
    assert f"resuming from {resumed / 'checkpoint-4'} (step 4 of 8)" in caplog.text

    losses = loss_history(straight)
    assert loss_history(resumed) == pytest.approx(losses, rel=1e-5)
    mean = sum(losses.values()) / len(losses)
    for run in (straight, resumed):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 8
        assert metrics["train_loss"] == pytest.approx(mean, rel=1e-4)
