"""QLoRA through `thuglm train` (`quantization: {bits: 4 | 8}`), on the CPU: bitsandbytes >= 0.46 runs its 4-bit
and 8-bit linears there, forward and backward, so CI trains the tiny model with them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from thuglm.cli import main
from thuglm.inference import quantized
from thuglm.training import recipe

from .test_train_e2e import OFFICIAL_TINY, assert_losses_fall, base_settings, train_losses, write_config

bnb = pytest.importorskip("bitsandbytes", reason='QLoRA needs bitsandbytes: pip install "thuglm[quant]"')


def qlora_settings(tmp_path, **overrides) -> dict:
    values = {"method": "lora", "quantization": {"bits": 4}, "gradient_checkpointing": True, "report_to": []}
    return base_settings(tmp_path, **{**values, **overrides})


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("qlora")
    config = write_config(tmp_path, **qlora_settings(tmp_path))
    assert main(["train", str(config)]) == 0
    return tmp_path / "out"


def test_qlora_trains_a_plain_lora_adapter_on_a_4bit_base_and_the_loss_falls(qlora_run):
    assert (qlora_run / "adapter_model.safetensors").is_file() and not (qlora_run / "model.safetensors").exists()
    assert (qlora_run / "checkpoint-4").is_dir() and (qlora_run / "checkpoint-8").is_dir()
    assert_losses_fall(qlora_run)
    metrics = json.loads((qlora_run / "metrics.json").read_text())
    assert metrics["eval_loss"] is not None and metrics["steps"] == 8
    resolved = yaml.safe_load((qlora_run / "thuglm_train.yaml").read_text())
    assert resolved["quantization"] == {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    # The adapter names the unquantized base: merge and --quantize both start from it.
    adapter_config = json.loads((qlora_run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(OFFICIAL_TINY)


def test_the_base_is_4bit_and_only_the_adapter_trains(tmp_path):
    import bitsandbytes as bnb

    config = recipe.load_config(str(write_config(tmp_path, **qlora_settings(tmp_path))), [])
    from thuglm.training.methods import load_base_model, prepare_for_method
    from thuglm.training.quantization import quantized_load_kwargs

    model = load_base_model(OFFICIAL_TINY, torch.float32, "sdpa", **quantized_load_kwargs(config, "fp32"))
    linears = [m for m in model.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * model.config.num_layers
    assert linears[0].weight.quant_type == "nf4" and linears[0].compute_dtype == torch.float32
    assert type(model.lm_head) is torch.nn.Linear  # tied to the embedding, kept whole
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    model = prepare_for_method(model, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_qlora_resumes_from_its_checkpoint(qlora_run, tmp_path):
    # Resume the finished 8-step run's step-4 checkpoint in a copy: steps 5-8 again, with the same losses.
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(qlora_run, copy)
    shutil.rmtree(copy / "checkpoint-8")
    settings = qlora_settings(tmp_path, output_dir=str(copy), resume_from_checkpoint=True)
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    first, resumed = train_losses(qlora_run), train_losses(copy)
    assert resumed[4:] == pytest.approx(first[4:], rel=1e-3)


def test_merge_of_a_qlora_run_merges_into_the_full_precision_base(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(qlora_run), "--out", str(out)]) == 0
    assert "4-bit" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_8bit_and_fp4_bases_train(tmp_path):
    for bits, kind in ((8, "nf4"), (4, "fp4")):
        folder = tmp_path / f"{bits}{kind}"
        folder.mkdir()
        settings = qlora_settings(folder, max_steps=2, save_steps=0, quantization={"bits": bits, "type": kind},
                                  gradient_checkpointing=False)
        settings.pop("eval_steps")
        assert main(["train", str(write_config(folder, **settings))]) == 0
        losses = train_losses(folder / "out")
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_qlora_trains_a_sequence_classifier_with_a_whole_head(tmp_path):
    rows = [{"text": ("春天来了，花开了。" if i % 2 else "长城是很长的墙。") * 2, "label": i % 2} for i in range(32)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    settings = qlora_settings(tmp_path, task="seq_cls", max_steps=2, save_steps=0, gradient_checkpointing=False)
    settings["data"] = {"files": [str(data)], "cache_dir": str(tmp_path / "hf-cache")}
    settings.pop("eval_steps")
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    assert main(["predict", str(tmp_path / "out"), str(data), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 32
    # and on a 4-bit base again, the trained head kept whole
    assert main(["predict", str(tmp_path / "out"), str(data), "--output", str(tmp_path / "q.jsonl"), "--quantize", "4"]) == 0
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 32


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_a_quantized_base_cannot_be_fine_tuned_whole(method, tmp_path, capsys):
    settings = qlora_settings(tmp_path, method=method)
    assert main(["train", str(write_config(tmp_path, **settings))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use `method: lora`" in err, err


def test_missing_bitsandbytes_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantized, "bitsandbytes_installed", lambda: False)
    assert main(["train", str(write_config(tmp_path, **qlora_settings(tmp_path)))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "thuglm[quant]"' in err, err
    assert not (tmp_path / "out").exists()


def test_qlora_trains_in_two_processes(tmp_path):
    # Each process loads its own 4-bit copy (on its GPU; here the CPU, gloo).
    import os
    import subprocess
    import sys

    settings = qlora_settings(tmp_path, max_steps=3, batch_size=2, save_steps=0, gradient_checkpointing=True)
    settings.pop("eval_steps")
    settings["data"]["validation_split"] = 0.0
    config = write_config(tmp_path, **settings)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "thuglm", "train", "--nproc", "2", str(config)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
