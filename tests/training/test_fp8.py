"""`precision: fp8` (training/fp8.py): refused with the reason where FP8 cannot run, and the conversion of a LoRA
model's base to torchao's Float8Linear, checked on the CPU with torchao's emulation of the FP8 product."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
import yaml

from thuglm.cli import main
from thuglm.training import fp8, methods, recipe

from .test_train_e2e import OFFICIAL_TINY, assert_losses_fall, base_settings, write_config

# The conversion tests (those taking `emulated`) need torchao, the [fp8] extra, which the test extra leaves out:
# transformers imports torchao whenever it is installed, and on a CPU-only torch that import writes warnings to
# stderr (its CUDA kernels do not load) in every thuglm process. The refusals need no torchao.

BASE_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def is_float8(module: torch.nn.Module) -> bool:
    """torchao's Float8Linear (its class is not public API: torchao.float8 exports the conversion only)."""
    return type(module).__name__ == "Float8Linear" and isinstance(module, torch.nn.Linear)


def fp8_settings(tmp_path, **overrides) -> dict:
    values = {"method": "lora", "precision": "fp8", "compile": True, "report_to": []}
    return base_settings(tmp_path, **{**values, **overrides})


def test_fp8_on_a_machine_without_fp8_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    assert not torch.cuda.is_available()
    assert main(["train", str(write_config(tmp_path, **fp8_settings(tmp_path)))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "precision fp8 cannot run here: this machine has no CUDA GPU" in err and "use precision bf16" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("capability", "name"), [((8, 6), "NVIDIA GeForce RTX 3090"), ((8, 0), "NVIDIA A100")])
def test_a_gpu_older_than_ada_is_named_with_its_compute_capability(capability, name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    with pytest.raises(fp8.ConfigError, match=rf"{name} has compute capability {capability[0]}\.{capability[1]}"):
        fp8.require_fp8()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    real_find_spec = fp8.importlib.util.find_spec
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: object() if name == "torchao" else real_find_spec(name))
    assert fp8.require_fp8() == "bf16"  # an H100 with torchao: the run goes on as a bf16 run


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 9))
    real_find_spec = fp8.importlib.util.find_spec
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: None if name == "torchao" else real_find_spec(name))
    with pytest.raises(fp8.ConfigError, match=r'pip install "thuglm\[fp8\]"'):
        fp8.require_fp8()


@pytest.mark.parametrize(("overrides", "named"), [
    ({"compile": False}, "compile false"),
    ({"method": "full"}, "method full"),
    ({"quantization": {"bits": 4}}, "quantization.bits 4"),
])
def test_fp8_needs_lora_on_a_bf16_base_compiled(overrides, named, tmp_path, capsys):
    assert main(["train", str(write_config(tmp_path, **fp8_settings(tmp_path, **overrides)))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`precision: fp8`" in err and named in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def emulated(monkeypatch):
    if importlib.util.find_spec("torchao") is None:
        pytest.skip('the FP8 conversion needs torchao: pip install -e ".[fp8]"')
    monkeypatch.setattr(fp8, "EMULATE", True)


def lora_model(tmp_path, **lora):
    config = recipe.load_config(str(write_config(tmp_path, **fp8_settings(tmp_path, **lora))), [])
    model = methods.load_base_model(OFFICIAL_TINY, torch.bfloat16, "sdpa")
    return methods.prepare_for_method(model, config)


def test_the_base_linears_become_float8_and_the_adapters_and_output_layer_stay_bf16(tmp_path, emulated):
    model = lora_model(tmp_path)
    converted = fp8.convert_base_to_fp8(model)
    layers = model.base_model.model.transformer.layers
    assert len(converted) == len(BASE_LINEARS) * len(layers)
    for layer in layers:
        for wrapped in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h,
                        layer.mlp.dense_4h_to_h):
            assert is_float8(wrapped.base_layer) and not wrapped.base_layer.weight.requires_grad
            assert type(wrapped.lora_A["default"]) is torch.nn.Linear  # what trains keeps bf16 LoRA's precision
            assert type(wrapped.lora_B["default"]) is torch.nn.Linear
    lm_head = model.base_model.model.lm_head
    assert type(lm_head) is torch.nn.Linear  # the chunked loss multiplies its weight directly
    assert lm_head.weight.data_ptr() == model.base_model.model.transformer.word_embeddings.weight.data_ptr()


def test_a_layer_no_adapter_targets_multiplies_in_fp8_too(tmp_path, emulated):
    model = lora_model(tmp_path, lora={"target_modules": ["query_key_value"]})
    converted = fp8.convert_base_to_fp8(model)
    layer = model.base_model.model.transformer.layers[0]
    assert is_float8(layer.attention.query_key_value.base_layer)
    assert is_float8(layer.mlp.dense_h_to_4h) and is_float8(layer.attention.dense)
    assert len(converted) == len(BASE_LINEARS) * len(model.base_model.model.transformer.layers)


def test_only_the_adapters_get_gradients_and_the_loss_stays_near_bf16s(tmp_path, emulated):
    torch.manual_seed(0)
    ids = torch.randint(20, 200, (2, 32))
    reference = lora_model(tmp_path)
    ids[:, 8], ids[:, 9] = reference.config.gmask_token_id, reference.config.bos_token_id  # [gMASK] <sop>
    labels = ids.clone()
    labels[:, :10] = -100
    model = lora_model(tmp_path)
    model.load_state_dict(reference.state_dict())
    fp8.convert_base_to_fp8(model)
    expected = reference(input_ids=ids, labels=labels).loss
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - expected.item()) < 0.02 * abs(expected.item())
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert with_grad == {name for name, p in model.named_parameters() if p.requires_grad}


def test_thuglm_train_with_fp8_trains_a_plain_lora_adapter(tmp_path, emulated, monkeypatch, caplog):
    """The recipe's path on the CPU: the refusal bypassed (it is tested above) and the product emulated; compiled
    with the tests' eager backend. What comes out is a LoRA adapter like any other, and the loss falls."""
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda: None)
    monkeypatch.setattr(methods, "COMPILE_BACKEND", "eager")
    settings = fp8_settings(tmp_path, save_steps=0)
    settings.pop("eval_steps")
    caplog.set_level(logging.INFO, logger="thuglm.train")
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    assert "precision fp8: 8 linear layers of the base multiply in FP8" in caplog.text
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert_losses_fall(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8
    # Recorded as fp8, so that the run's own thuglm_train.yaml repeats it (it runs as bf16 with an FP8 base).
    assert metrics["precision"] == "fp8"
    assert yaml.safe_load((out / "thuglm_train.yaml").read_text())["precision"] == "fp8"
