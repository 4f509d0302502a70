"""What the benchmark scripts share: ChatGLM-6B's shape with random weights, and the commit a row measures.

Imported by the scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path); it imports thuglm only
inside the functions that need it, because the official code's worker processes import the scripts too.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# ChatGLM-6B: 28 layers, hidden 4096, 32 heads, MLP 16384, vocabulary 130,528.
SIX_B = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384,
         "max_sequence_length": 2048, "vocab_size": 130528}


def random_chatglm(config, dtype: torch.dtype, device, attn: str = "sdpa"):
    """thuglm's ChatGLM for `config`, initialised randomly (seed 0) straight in `dtype` on `device`."""
    from thuglm.models import ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ChatGLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation(attn)
    return model


def build_6b_folder(folder: Path, tokenizer_cache: Path | None = None) -> Path:
    """A model folder of the 6B shape: random bf16 weights made on the GPU, the tiny demo tokenizer beside them.

    Built once: a folder that already has a config.json is reused.
    """
    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)
    from thuglm.models import ChatGLMTokenizer
    from thuglm.models.tiny import cached_tiny_chatglm, tiny_config

    if (folder / "config.json").is_file():
        return folder
    tokenizer = ChatGLMTokenizer.from_pretrained(cached_tiny_chatglm(tokenizer_cache))
    model = random_chatglm(tiny_config(tokenizer.vocab_size, tokenizer, **SIX_B), torch.bfloat16, "cuda")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def kernel_time(prof) -> tuple[int, float]:
    """How many GPU kernels a torch.profiler run recorded, and their summed time in ms: the device's busy time,
    without the host's time to launch them."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def commit_id(cwd: Path | None = None) -> str:
    """The checkout's short commit, "+ uncommitted" when it has changes; "unknown" without git (a GPU machine's copy)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False, cwd=cwd)
    except OSError:
        return "unknown"
    head, dirty = head.stdout.strip(), dirty.stdout.strip()
    return (head + (" + uncommitted" if dirty else "")) if head else "unknown"


ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """This process's environment with thuglm's src first on PYTHONPATH, keeping what was there: on the GPU machine
    that holds the wheels it lacks (datasets, trl), installed with pip --target."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def thuglm_train_run(name: str, out: Path, overrides: list[str]) -> tuple[dict, dict | None]:
    """`thuglm train` in a subprocess, every setting an override on the command line: (the row's `wall_s`,
    `command`, `status` and, on failure, `error` with the output's last lines; the run's metrics.json or None)."""
    config = out.parent / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}\n")
    command = [sys.executable, "-m", "thuglm", "train", str(config), *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=subprocess_env())
    row = {"wall_s": round(time.perf_counter() - start, 1), "command": " ".join(command[3:])}
    metrics_file = out / "metrics.json"
    if done.returncode != 0 or not metrics_file.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**row, "status": "error", "error": " | ".join(tail)[-400:]}, None
    return {**row, "status": "ok"}, json.loads(metrics_file.read_text())
