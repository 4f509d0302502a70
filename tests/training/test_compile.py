"""`compile: true` compiles every layer in place and trains to the losses of the eager layers.

On the CPU the layers are compiled with dynamo's "eager" backend (the same tracing, no inductor build, which takes
minutes on two cores); what a GPU gains from inductor is in benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from thuglm.cli import main
from thuglm.models.modeling_chatglm import ChatGLMBlock
from thuglm.training import methods, recipe

from .test_resume import loss_history
from .test_train_e2e import base_settings, write_config


@pytest.fixture
def compiled_models(monkeypatch) -> list:
    monkeypatch.setattr(methods, "COMPILE_BACKEND", "eager")
    seen = []

    def recording(model, gradient_checkpointing):
        seen.append((model, gradient_checkpointing))
        return methods.compile_blocks(model, gradient_checkpointing)

    monkeypatch.setattr(recipe, "compile_blocks", recording)
    return seen


def run(tmp_path: Path, name: str, **overrides) -> Path:
    values = base_settings(tmp_path, output_dir=str(tmp_path / name), max_steps=4, save_steps=100, eval_steps=100,
                           report_to=[], **overrides)
    values["data"]["validation_split"] = 0.0
    folder = tmp_path / f"{name}-config"
    folder.mkdir()
    assert main(["train", str(write_config(folder, **values))]) == 0
    return tmp_path / name


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_layers_train_to_the_eager_losses(tmp_path, compiled_models, method, checkpointing):
    """With LoRA's dropout (0.05 by default): a checkpointed layer's recomputation must draw the forward's masks."""
    eager = loss_history(run(tmp_path, "eager", method=method))
    compiled = loss_history(run(tmp_path, "compiled", method=method, compile=True,
                                gradient_checkpointing=checkpointing))
    assert len(compiled_models) == 1 and compiled_models[0][1] is checkpointing
    blocks = [m for m in compiled_models[0][0].modules() if isinstance(m, ChatGLMBlock)]
    parts = [part for block in blocks for part in ((block.attention, block.mlp) if checkpointing else (block,))]
    assert blocks and all(part._compiled_call_impl is not None for part in parts)
    assert compiled.keys() == eager.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5)
    # The saved weights keep their names (no `_orig_mod.` from wrapping the model): the eager run's names.
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert load_file(tmp_path / "compiled" / weights).keys() == load_file(tmp_path / "eager" / weights).keys()


def test_compile_is_refused_under_fsdp_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    values = base_settings(tmp_path, compile=True, report_to=[])
    assert main(["train", str(write_config(tmp_path, **values))]) == 2
    assert "`compile: true`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
