"""Ctrl-C during `thuglm train`: one line naming the checkpoint to resume from, exit status 130, no half-written
checkpoint, a second Ctrl-C stops at once, and under `--nproc` every process stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import Trainer

from thuglm.cli import main
from thuglm.training.checkpoints import STAGING_DIR

from .test_resume import checkpoint_complete
from .test_train_e2e import base_settings, write_config

INTERRUPTED = re.compile(r"^thuglm: interrupted at step (\d+); the newest complete checkpoint is (checkpoint-\d+) "
                         r"\(resume with resume_from_checkpoint=true\)$")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def long_run(tmp_path: Path, **overrides) -> Path:
    values = base_settings(tmp_path, method="lora", max_steps=5000, save_steps=3, eval_steps=1000, report_to=[],
                           **overrides)
    values["data"]["validation_split"] = 0.0
    return write_config(tmp_path, **values)


def default_sigint() -> None:
    """The child takes SIGINT as a terminal delivers it, also where the test runner's shell ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(log: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    """`thuglm train ARGS` with its stderr in `log`: a pipe nobody reads while it trains would fill and block it."""
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "thuglm", "train", *args], stdout=subprocess.DEVNULL,
                                stderr=stderr, env=ENV, preexec_fn=default_sigint, start_new_session=new_session)


def wait_for(checkpoint: Path, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (checkpoint / "trainer_state.json").is_file():  # checkpoints appear whole, by a rename
        assert process.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} within {timeout} s"
        time.sleep(0.05)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_ctrl_c_stops_with_one_line_and_status_130_then_the_run_resumes(tmp_path):
    out = tmp_path / "out"
    config, log = long_run(tmp_path), tmp_path / "stderr.txt"
    process = start(log, str(config))
    try:
        wait_for(out / "checkpoint-3", process, log)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    stderr = log.read_text()
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    match = INTERRUPTED.match(last_line(stderr))
    assert match, stderr[-2000:]
    step, newest = int(match.group(1)), match.group(2)
    assert step >= 3
    assert (out / newest).is_dir() and checkpoint_complete(out / newest)
    assert newest == max((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))
    assert not (out / STAGING_DIR).exists() and not (out / "metrics.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "thuglm", "train", str(config), "max_steps=8",
                              "resume_from_checkpoint=true"], check=False, capture_output=True, text=True, env=ENV,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / newest}" in resumed.stderr  # the log names the checkpoint


def test_ctrl_c_while_a_checkpoint_is_written_leaves_the_previous_one_newest(tmp_path, monkeypatch, capsys):
    """The save of checkpoint-6 is interrupted after it has written part of its files into the staging folder."""
    original = Trainer._save_checkpoint

    def interrupted_save(self, model, trial):
        if self.state.global_step < 6:
            return original(self, model, trial)
        staging = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", interrupted_save)
    out = tmp_path / "out"
    assert main(["train", str(long_run(tmp_path))]) == 130
    assert last_line(capsys.readouterr().err) == (
        "thuglm: interrupted at step 6; the newest complete checkpoint is checkpoint-3 "
        "(resume with resume_from_checkpoint=true)")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "."))) == ["checkpoint-3"]


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch, capsys):
    original = Trainer.training_step

    def interrupted_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    assert main(["train", str(long_run(tmp_path))]) == 130
    assert last_line(capsys.readouterr().err) == (
        "thuglm: interrupted at step 2; no checkpoint had been written yet, so a new run starts from the beginning")


SIGNALS_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from thuglm.training.interrupts import stop_on_signals
    with stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            print("first", flush=True)
            os.kill(os.getpid(), signal.SIG{echo})  # arrives with the first, as torchrun's copy of a Ctrl-C does
            time.sleep({pause})
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("still running", flush=True)
    sys.exit(3)
""")


@pytest.mark.parametrize("echo", ["INT", "TERM"])
def test_a_second_signal_stops_at_once_and_a_simultaneous_copy_does_not(echo):
    ran = subprocess.run([sys.executable, "-c", SIGNALS_SCRIPT.format(echo=echo, pause=1.0)], check=False,
                         capture_output=True, text=True, timeout=30, preexec_fn=default_sigint)
    assert ran.returncode == 130, ran.stderr
    assert ran.stdout.split() == ["first"]  # the copy within SAME_INTERRUPT_S was ignored; the later one stopped it
    assert ran.stderr.strip() == "thuglm: stopped"


def test_nproc_ctrl_c_stops_every_process(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the launcher and both workers."""
    out = tmp_path / "out"
    config = long_run(tmp_path, batch_size=2, global_batch_size=4, lora={"dropout": 0.0})
    log = tmp_path / "stderr.txt"
    process = start(log, "--nproc", "2", str(config), new_session=True)
    try:
        wait_for(out / "checkpoint-3", process, log, timeout=280)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=90)
    finally:
        process.kill()
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-3000:]
    assert len([line for line in stderr.splitlines() if "interrupted at step" in line]) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / STAGING_DIR).exists()
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no worker is left running
        os.killpg(process.pid, 0)
