"""`thuglm train`'s attention: what `attn_implementation: auto` stands for, and SDPA kept off cuDNN's kernel on a GPU
(host-bound for GLM's mask; see recipe)."""

from __future__ import annotations

import pytest
import torch

from thuglm.training import recipe
from thuglm.training.config import DataConfig, TrainConfig, resolve_defaults


@pytest.mark.parametrize(("attn_implementation", "on_gpu", "turned_off"),
                         [("sdpa", True, True), ("sdpa", False, False), ("eager", True, False),
                          ("flex_attention", True, False)])
def test_cudnn_attention_is_turned_off_for_sdpa_on_a_gpu_only(monkeypatch, attn_implementation, on_gpu, turned_off):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    recipe.choose_attention_kernels(attn_implementation)
    assert calls == ([False] if turned_off else [])


def test_train_chooses_the_kernels_before_building_anything(tmp_path, monkeypatch):
    from .test_train_e2e import base_settings, write_config

    chosen = []
    monkeypatch.setattr(recipe, "choose_attention_kernels", chosen.append)
    config = write_config(tmp_path, **base_settings(tmp_path, max_steps=1, report_to=[]))
    recipe.train(recipe.load_config(str(config), []))
    assert chosen == ["sdpa"]  # auto, on a CPU


@pytest.mark.parametrize(("overrides", "gpu", "expected"), [
    ({"compile": True}, (9, 0), "flex_attention"),
    ({"compile": True}, (8, 0), "flex_attention"),
    ({"compile": True}, (7, 5), "sdpa"),  # before Ampere: not measured
    ({"compile": True}, None, "sdpa"),  # a CPU: no flex_attention backward
    ({"compile": False}, (9, 0), "sdpa"),  # uncompiled: flex_attention's kernel is generated only in a graph
    ({"compile": True, "gradient_checkpointing": True}, (9, 0), "sdpa"),  # not measured to pay
    ({"compile": True, "packing": False}, (9, 0), "sdpa"),  # a new row length each batch: measured slower
    ({"compile": True, "data": DataConfig(format="alpaca")}, (9, 0), "sdpa"),  # alpaca is unpacked by default
    ({"compile": True, "data": DataConfig(format="alpaca"), "packing": True}, (9, 0), "flex_attention"),
    ({"compile": True, "attn_implementation": "sdpa"}, (9, 0), "sdpa"),  # what the user chose is kept
    ({"attn_implementation": "flex_attention"}, None, "flex_attention"),
    ({"attn_implementation": "eager", "compile": True}, (9, 0), "eager"),
])
def test_auto_attention_is_flex_attention_only_for_packed_rows_in_compiled_layers_on_a_recent_gpu(
        monkeypatch, overrides, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu)
    config = TrainConfig(**overrides)
    resolve_defaults(config)  # as load_config does: packing's default follows the data's format
    assert recipe.resolve_attention(config) == expected


def test_train_loads_the_model_with_the_attention_auto_chose(tmp_path, monkeypatch):
    from thuglm.training import methods

    from .test_train_e2e import base_settings, write_config

    loaded, load_base_model = [], methods.load_base_model
    monkeypatch.setattr(recipe, "resolve_attention", lambda config: "eager")
    monkeypatch.setattr(methods, "load_base_model", lambda model_dir, dtype, attn_implementation, **kwargs:
                        loaded.append(attn_implementation) or load_base_model(model_dir, dtype, attn_implementation,
                                                                               **kwargs))
    config = write_config(tmp_path, **base_settings(tmp_path, max_steps=1, report_to=[]))
    recipe.train(recipe.load_config(str(config), []))
    assert loaded == ["eager"]
