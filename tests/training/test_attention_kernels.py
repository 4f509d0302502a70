"""`thuglm train` on a GPU keeps SDPA off cuDNN's attention kernel (host-bound for GLM's mask; see recipe)."""

from __future__ import annotations

import pytest
import torch

from thuglm.training import recipe


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
    assert chosen == ["sdpa"]
