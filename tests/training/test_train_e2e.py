"""`thuglm train` end to end through the CLI, on the tiny model in the official checkpoint layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.inference.loading import load_for_inference
from thuglm.training import recipe
from thuglm.training.demo import resource_path

OFFICIAL_TINY = Path(__file__).parents[1] / "fixtures" / "official_tiny"
CORPUS = resource_path("corpus")
ALPACA = resource_path("alpaca", "instructions.json")


def write_config(folder: Path, **settings) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
    return path


def base_settings(tmp_path: Path, **overrides) -> dict:
    settings = {
        "model": str(OFFICIAL_TINY),
        "data": {"files": [str(CORPUS)], "validation_split": 0.05, "cache_dir": str(tmp_path / "hf-cache")},
        "output_dir": str(tmp_path / "out"),
        "max_seq_len": 64,
        "max_steps": 8,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 4,
        "eval_steps": 4,
        "precision": "fp32",
        "seed": 0,
    }
    settings.update(overrides)
    return settings


def short_lora_run_config(folder: Path, steps: int, **overrides):
    """A LoRA run of `steps` steps in a new `folder` with nothing beside the steps: the loss logged at step 1 only,
    no checkpoint, no evaluation; runs of different lengths then differ only by their extra steps."""
    folder.mkdir()
    values = base_settings(folder, method="lora", max_steps=steps, logging_steps=1000, save_steps=0, report_to=[],
                           **overrides)
    values.pop("eval_steps")
    values["data"]["validation_split"] = 0.0
    return recipe.load_config(str(write_config(folder, **values)), [])


def train_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def assert_losses_fall(output_dir: Path) -> None:
    losses = train_losses(output_dir)
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def assert_common_outputs(output_dir: Path, method: str, steps: int = 8) -> dict:
    for name in ("ice_text.model", "tokenizer_config.json", "thuglm_train.yaml", "trainer_state.json", "metrics.json",
                 "loss.png", "checkpoint-4", "checkpoint-8"):
        assert (output_dir / name).exists(), name
    assert list((output_dir / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in ("train_loss", "final_train_loss", "eval_loss", "perplexity", "tokens_per_s", "peak_memory_gib"):
        assert metrics[key] is not None, key
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["method"] == method and metrics["steps"] == steps and metrics["tokens_per_s"] > 0
    resolved = yaml.safe_load((output_dir / "thuglm_train.yaml").read_text())
    assert resolved["method"] == method and resolved["packing"] is True and resolved["precision"] == "fp32"
    return metrics


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora")
    config = write_config(tmp_path, **base_settings(tmp_path, method="lora"))
    assert main(["train", str(config)]) == 0
    return tmp_path / "out"


def test_lora_run_writes_every_output_and_the_loss_falls(lora_run):
    assert (lora_run / "adapter_config.json").is_file()
    assert (lora_run / "adapter_model.safetensors").is_file()
    assert not (lora_run / "model.safetensors").exists()
    assert_common_outputs(lora_run, "lora")
    assert_losses_fall(lora_run)


def test_lora_adapter_loads_with_plain_peft_and_merges_to_the_same_logits(lora_run, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY)
    tuned = PeftModel.from_pretrained(base, lora_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(lora_run)
    batch = tokenizer(["春天来了，", "长城是"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = tuned(**batch).logits
        plain = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY).eval()(**batch).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter changed something

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--base", str(OFFICIAL_TINY), "--adapter", str(lora_run), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_full_run_saves_a_standalone_model(tmp_path):
    config = write_config(tmp_path, **base_settings(tmp_path, method="full", learning_rate=3e-3))
    assert main(["train", str(config)]) == 0
    output_dir = tmp_path / "out"
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "config.json").is_file()
    assert_common_outputs(output_dir, "full")
    assert_losses_fall(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    original = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)


def test_freeze_trains_only_the_last_layers(tmp_path):
    settings = base_settings(tmp_path, method="freeze", max_steps=2, save_steps=2, freeze={"trainable_layers": 1})
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    original = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY).state_dict()
    changed = {name for name, value in trained.items() if not torch.equal(value, original[name])}
    assert changed and all(name.startswith("transformer.layers.1.") for name in changed), changed


def test_alpaca_lora_run(tmp_path):
    settings = base_settings(tmp_path, method="lora", max_seq_len=128)
    settings["data"] = {"files": [str(ALPACA)], "format": "alpaca", "validation_split": 0.1,
                        "cache_dir": str(tmp_path / "hf-cache")}
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    output_dir = tmp_path / "out"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["eval_loss"] is not None
    assert (output_dir / "adapter_model.safetensors").is_file()
    resolved = yaml.safe_load((output_dir / "thuglm_train.yaml").read_text())
    assert resolved["data"]["format"] == "alpaca" and resolved["packing"] is False


def test_config_errors_exit_2_without_traceback(tmp_path, capsys):
    config = write_config(tmp_path, **base_settings(tmp_path, lerning_rate=1e-3))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key `lerning_rate`. Did you mean `learning_rate`?" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_true_without_checkpoint_is_an_error(tmp_path, capsys):
    config = write_config(tmp_path, **base_settings(tmp_path, resume_from_checkpoint=True))
    assert main(["train", str(config)]) == 2
    assert "has no checkpoint-N folder" in capsys.readouterr().err


def test_model_folder_without_weights_exits_2_with_the_fix(tmp_path, capsys):
    model_dir = tmp_path / "half-copied"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((OFFICIAL_TINY / "config.json").read_text())
    assert main(["train", str(write_config(tmp_path, **base_settings(tmp_path, model=str(model_dir))))]) == 2
    err = capsys.readouterr().err
    assert "has a config.json but no weights" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_rope_scaling_trains_rows_past_the_context_and_every_loader_stretches_the_base_alike(tmp_path, capsys):
    """The tiny base knows 512 positions; rows of 1024 are refused, then trained with `rope_scaling: linear`. The
    adapter's folders record the stretch, and loading (chat, generate, serve, merge) applies it to the base."""
    settings = base_settings(tmp_path, method="lora", max_seq_len=1024, batch_size=1, max_steps=2, save_steps=1)
    settings["data"]["validation_split"] = 0
    assert main(["train", str(write_config(tmp_path, **settings))]) == 2
    assert "or add `rope_scaling: linear`" in capsys.readouterr().err and not (tmp_path / "out").exists()

    assert main(["train", str(write_config(tmp_path, **settings, rope_scaling="linear"))]) == 0
    out = tmp_path / "out"
    stretched = {"max_sequence_length": 1024, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert json.loads((folder / "thuglm_base_config.json").read_text()) == stretched, folder

    tokenizer, tuned = load_for_inference(out / "checkpoint-2", dtype="fp32", device="cpu")
    assert tuned.config.max_sequence_length == 1024 and tuned.config.rope_factor == 2.0
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--out", str(merged_dir)]) == 0
    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert {key: merged_config[key] for key in stretched} == stretched
    batch = tokenizer(["春天来了，" * 150], return_tensors="pt")  # past the 512 positions the base knew
    assert batch["input_ids"].shape[1] > 512
    unstretched = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY), out).eval()
    with torch.no_grad():
        expected = tuned(**batch).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(**batch).logits
        assert (unstretched(**batch).logits - expected).abs().max() > 1e-3  # the stretch changes the answer
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
