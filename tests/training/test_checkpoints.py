"""Checkpoints are complete or absent: a kill or a full disk during a save, or a NaN loss, leaves a good one to resume.

The kill and the full disk are real: a `thuglm train` process is SIGKILLed from inside its save (after the model
and optimizer files, before the RNG and trainer state), or its file-size limit is lowered with prlimit while it
trains, so that its next save fails with EFBIG as on a full disk.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thuglm.cli import main

from .test_resume import loss_history
from .test_train_e2e import base_settings, write_config

KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
from thuglm.cli import main

original = Trainer._save_rng_state
def save_rng_state(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # model and optimizer files are written; RNG and trainer state are not
    return original(self, output_dir)
Trainer._save_rng_state = save_rng_state
sys.exit(main(sys.argv[1:]))
"""


def settings(tmp_path: Path, output_dir: Path, **overrides) -> dict:
    values = base_settings(tmp_path, method="full", max_steps=20, save_steps=5, eval_steps=1000, report_to=[],
                           learning_rate=3e-3, output_dir=str(output_dir))
    values["data"]["validation_split"] = 0.0
    values.update(overrides)
    return values


def complete_checkpoints(output_dir: Path) -> list[str]:
    found = sorted((path for path in output_dir.glob("checkpoint-*")), key=lambda path: int(path.name.split("-")[1]))
    for path in found:
        for name in ("trainer_state.json", "optimizer.pt", "rng_state.pth", "model.safetensors"):
            assert (path / name).is_file(), f"{path} lacks {name}: a checkpoint was published half-written"
    return [path.name for path in found]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The loss history of an uninterrupted run, to compare resumed runs with."""
    tmp_path = tmp_path_factory.mktemp("reference")
    out = tmp_path / "out"
    assert main(["train", str(write_config(tmp_path, **settings(tmp_path, out)))]) == 0
    assert complete_checkpoints(out) == [f"checkpoint-{step}" for step in (5, 10, 15, 20)]
    assert not (out / ".saving").exists()
    return loss_history(out)


def test_kill_during_a_save_leaves_the_previous_checkpoint_and_resume_matches(tmp_path, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path, **settings(tmp_path, out))
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, "train", str(config)], capture_output=True, text=True, timeout=300,
        check=False, env={**os.environ, "KILL_AT_STEP": "10"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / ".saving" / "checkpoint-10" / "optimizer.pt").is_file()  # the save was under way
    assert complete_checkpoints(out) == ["checkpoint-5"]  # ... and never appeared as a checkpoint

    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    assert not (out / ".saving").exists()
    got = loss_history(out)
    assert sorted(got) == sorted(reference) == list(range(1, 21))
    for step in reference:
        assert got[step] == pytest.approx(reference[step], abs=1e-6, rel=1e-6), step


def test_a_full_disk_during_a_save_stops_cleanly_and_resume_works(tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, **settings(tmp_path, out, max_steps=40))
    process = subprocess.Popen([sys.executable, "-m", "thuglm", "train", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-5").is_dir():  # appears whole, by a rename
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        # From now on no file of this process may grow past 64 KiB: the next save fails as on a full disk.
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2, stderr[-3000:]
    [message] = [line for line in stderr.splitlines() if line.startswith("thuglm: ")]
    assert message.startswith("thuglm: could not write checkpoint-") and "File too large" in message, message
    kept = complete_checkpoints(out)
    assert kept and f"{kept[-1]}, is intact" in message and "resume_from_checkpoint=true" in message
    assert not (out / ".saving").exists() and not (out / "metrics.json").exists()

    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    history = loss_history(out)
    assert sorted(history) == list(range(1, 41)) and all(math.isfinite(loss) for loss in history.values())
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, **settings(tmp_path, out, max_steps=8, save_steps=2, save_total_limit=2))
    assert main(["train", str(config)]) == 0
    assert complete_checkpoints(out) == ["checkpoint-6", "checkpoint-8"]
    assert not (out / ".saving").exists()


def test_save_steps_0_writes_no_checkpoint_only_the_trained_model_and_still_evaluates(tmp_path):
    out = tmp_path / "out"
    values = settings(tmp_path, out, max_steps=4, save_steps=0)
    values.pop("eval_steps")
    values["data"]["validation_split"] = 0.2
    assert main(["train", str(write_config(tmp_path, **values))]) == 0
    assert complete_checkpoints(out) == []
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["eval_loss"])  # evaluated once, at the end


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, nan_at_step_7, monkeypatch):
    out = tmp_path / "out"
    config = write_config(tmp_path, **settings(tmp_path, out, max_steps=12))
    assert main(["train", str(config)]) == 2
    [message] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("thuglm: ")]
    assert message.startswith("thuglm: step 7: the loss became nan") and "checkpoint-5" in message, message
    assert "on_nan=skip" in message
    assert complete_checkpoints(out) == ["checkpoint-5"] and not (out / "metrics.json").exists()
    weights = load_file(out / "checkpoint-5" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())

    monkeypatch.undo()  # the bad batch is fixed: resume from the good checkpoint
    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12


def test_on_nan_skip_skips_the_step_and_counts_it(tmp_path, nan_at_step_7, caplog):
    out = tmp_path / "out"
    config = write_config(tmp_path, **settings(tmp_path, out, max_steps=12, on_nan="skip"))
    assert main(["train", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["steps"] == 12
    assert "step 7: the loss became nan; skipped this optimizer step" in caplog.text
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert math.isfinite(metrics["final_train_loss"])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_trained_files_follow_the_umask(tmp_path, umask):
    """safetensors writes 0600 whatever the umask: the adapter, in the output and in each checkpoint, would be
    unreadable to the other users and services the trained model is for."""
    settings = base_settings(tmp_path, method="lora", max_steps=2, save_steps=2, eval_steps=1000, report_to=[])
    settings["data"]["validation_split"] = 0.0
    previous = os.umask(umask)
    try:
        assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    finally:
        os.umask(previous)
    out = Path(settings["output_dir"])
    for weights in (out / "adapter_model.safetensors", out / "checkpoint-2" / "adapter_model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask, weights
    assert stat.S_IMODE((out / "checkpoint-2").stat().st_mode) == 0o777 & ~umask
