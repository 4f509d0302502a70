"""`compile: true` compiles every layer in place and trains to the losses of the eager layers.

On the CPU the layers are compiled with dynamo's "eager" backend (the same tracing, no inductor build, which takes
minutes on two cores); what a GPU gains from inductor is in benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thuglm.cli import main
from thuglm.models.modeling_chatglm import ChatGLMBlock
from thuglm.training import methods, recipe

from .test_resume import loss_history
from .test_train_e2e import ALPACA, base_settings, write_config


@pytest.fixture
def compiled_models(monkeypatch) -> list:
    monkeypatch.setattr(methods, "COMPILE_BACKEND", "eager")
    seen = []

    def recording(model, gradient_checkpointing, **kwargs):
        seen.append((model, gradient_checkpointing))
        return methods.compile_blocks(model, gradient_checkpointing, **kwargs)

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


@pytest.mark.parametrize(("packing", "expected"), [(False, 3), (True, 4)], ids=["unpacked", "packed"])
def test_layers_compile_once_a_variant_not_once_a_row_length(tmp_path, monkeypatch, packing, expected):
    """Unpacked rows (each batch padded to its longest: here 60 tokens and shorter, and a short last batch) get a
    graph for any length at once. Three graphs in all: the first layer's input needs no gradient, the others' do,
    and evaluation runs without gradients. Made for the first batch's shape, dynamo compiled again at each new
    length and batch size (6 graphs on this run; torch.compile's limit is 8, past which a layer runs uncompiled).
    Packed rows all have max_seq_len tokens: graphs for that one shape (and a fourth here, for the evaluation's last
    batch of one row)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(methods, "COMPILE_BACKEND", counting_backend)
    torch.compiler.reset()  # dynamo's caches and the shapes it saw belong to the layer's code, across tests
    values = base_settings(tmp_path, max_steps=12, max_seq_len=60, compile=True, report_to=[], save_steps=100,
                           eval_steps=6, packing=packing)
    values["data"].update(files=[str(ALPACA)], format="alpaca", validation_split=0.1)
    assert main(["train", str(write_config(tmp_path, **values))]) == 0
    assert len(graphs) == expected


def test_compile_is_refused_under_fsdp_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    values = base_settings(tmp_path, compile=True, report_to=[])
    assert main(["train", str(write_config(tmp_path, **values))]) == 2
    assert "`compile: true`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
