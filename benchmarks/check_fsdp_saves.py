"""What FSDP runs of `thuglm train` write, checked on a machine with 2 GPUs (accelerate shards only on GPUs).

    PYTHONPATH=src python benchmarks/check_fsdp_saves.py [--record FILE]

On the 6B shape (the folder `bench_multi_gpu.py` builds), with the shipped configs:
* LoRA (`fsdp_lora.yaml`): the saved adapter holds every LoRA weight (224 tensors: 28 layers x 4 targets x A, B),
  trained (lora_B no longer zero), and peft loads it onto the base; a run stopped at step 3 and resumed to step 6
  logs the losses of an uninterrupted 6-step run (FSDP checkpoints of LoRA restore every process's shard).
* full fine-tuning (`fsdp_full.yaml`): the saved model is bf16 (not the fp32 master copies) and the tied lm_head is
  written once: ~11.5 GiB.
Prints one line per check and exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from bench_multi_gpu import REPO, command, saved_model, write_base_config
from common import build_6b_folder
from safetensors import safe_open

ROOT = Path("/tmp/thuglm-fsdp-saves")
LORA_TENSORS = 28 * 4 * 2


def train(launch: str, out: Path, model: Path, *overrides: str) -> list[float]:
    """Runs `thuglm train` on 2 GPUs under configs/accelerate/<launch>.yaml; the loss of each logged step."""
    argv = command(launch, 2, ROOT / "base.yaml", [f"model={model}", f"output_dir={out}", "max_seq_len=512",
                                                     "batch_size=2", "logging_steps=1", *overrides])
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False, timeout=400,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", help="append the checks as one JSON line to this file")
    parser.add_argument("--commit")
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    model = build_6b_folder(Path("/tmp/thuglm-multi-gpu") / "glm6b")
    write_base_config(ROOT, "bf16")
    checks: dict[str, object] = {}

    lora = ["method=lora", "learning_rate=1e-3", "warmup_ratio=0", "lr_scheduler=constant"]
    whole = train("fsdp_lora", ROOT / "lora-whole", model, *lora, "max_steps=6", "save_steps=3")
    train("fsdp_lora", ROOT / "lora-resumed", model, *lora, "max_steps=3", "save_steps=3")
    resumed = train("fsdp_lora", ROOT / "lora-resumed", model, *lora, "max_steps=6", "save_steps=3",
                    "resume_from_checkpoint=true")
    adapter = tensors(ROOT / "lora-whole" / "adapter_model.safetensors")
    checks["lora_adapter_tensors"] = len(adapter)
    checks["lora_b_trained"] = all(tensor.abs().max() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    checks["lora_losses_whole"], checks["lora_losses_resumed"] = whole, resumed
    checks["lora_resume_matches"] = len(resumed) >= 3 and all(
        abs(a - b) <= 2e-2 * abs(a) for a, b in zip(whole[-3:], resumed[-3:], strict=True))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import thuglm  # noqa: F401

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, ROOT / "lora-whole")
    lora_b = [param for name, param in loaded.named_parameters() if "lora_B" in name]
    checks["lora_loads_in_peft"] = len(lora_b) == LORA_TENSORS // 2 and all(p.abs().max() > 0 for p in lora_b)
    del base, loaded
    shutil.rmtree(ROOT / "lora-whole"), shutil.rmtree(ROOT / "lora-resumed")

    train("fsdp_full", ROOT / "full", model, "method=full", "max_steps=2", "save_steps=0", "batch_size=1")
    saved = saved_model(ROOT / "full")
    checks["full_saved_gib"], checks["full_saved_dtypes"] = saved["saved_gib"], saved["saved_dtypes"]
    checks["full_lm_head_written"] = any("lm_head.weight" in tensor_names(file)
                                         for file in (ROOT / "full").glob("*.safetensors"))
    checks["full_config_dtype"] = json.loads((ROOT / "full" / "config.json").read_text()).get("dtype")
    shutil.rmtree(ROOT / "full")

    verdict = {
        "lora adapter holds every LoRA weight": checks["lora_adapter_tensors"] == LORA_TENSORS,
        "lora adapter trained": checks["lora_b_trained"],
        "peft loads the adapter": checks["lora_loads_in_peft"],
        "lora resumed losses = uninterrupted (2e-2)": checks["lora_resume_matches"],
        "full model saved in bf16": checks["full_saved_dtypes"] == ["BF16"] and checks["full_config_dtype"] == "bfloat16",
        "tied lm_head written once": not checks["full_lm_head_written"],
    }
    for name, ok in verdict.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(json.dumps(checks))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({
                "run_id": f"fsdp-saves-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
                "date": datetime.date.today().isoformat(), "commit": args.commit, "device": torch.cuda.get_device_name(),
                "impl": "thuglm", "mode": "check-fsdp-saves", "gpus": 2, "command": "benchmarks/check_fsdp_saves.py", "passed": all(verdict.values()), **checks,
            }) + "\n")
    sys.exit(0 if all(verdict.values()) else 1)


if __name__ == "__main__":
    main()
