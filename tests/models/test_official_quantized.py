"""The official int4 / int8 / int4-qe checkpoints load natively and compute with the official dequantization.

The fixtures are the tiny official checkpoint converted by tests/fixtures/make_official_quantized.py (our script,
written from the official quantization.py's formulas element by element); the reference dequantization is that
script's transcription of the official extraction kernels, independent of thuglm's vectorised unpacking.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.inference import load_for_inference
from thuglm.models.quantization import (
    OfficialCheckpointError,
    OfficialQuantizedEmbedding,
    OfficialQuantizedHead,
    OfficialQuantizedLinear,
    pack_int4,
    unpack_int4,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
from make_official_quantized import OFFICIAL_TINY, official_dequantize, write_official_quantized

VARIANTS = {"int8": (8, False), "int4": (4, False), "int4-qe": (4, True)}
IDS = torch.tensor([[20, 31, 47, 6, 9, 52, 88], [3, 3, 25, 99, 6, 9, 12]])
MASK = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("official-quantized")
    return {name: write_official_quantized(root / name, bits, emb) for name, (bits, emb) in VARIANTS.items()}


def test_int4_packing_is_the_official_nibble_order():
    q = torch.tensor([[1, -2, -8, 7, 0, -1, 5, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    # (q[2j] << 4) | (q[2j+1] & 15) as a signed char: 0x1E, 0x87, 0x0F, 0x53
    assert packed.tolist() == [[0x1E, 0x87 - 256, 0x0F, 0x53]]
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[None]
    assert torch.equal(unpack_int4(pack_int4(every)), every)
    scale = torch.tensor([0.5], dtype=torch.float16)
    assert torch.equal(official_dequantize(packed, scale, 4), q.float() * 0.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantized_weights_are_the_official_ones(folders, variant):
    bits, embeddings = VARIANTS[variant]
    model = AutoModelForCausalLM.from_pretrained(folders[variant])
    state = torch.load(folders[variant] / "pytorch_model.bin", weights_only=True)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (OfficialQuantizedLinear,
                                                                              OfficialQuantizedEmbedding))}
    assert len(modules) == 4 * model.config.num_layers + embeddings
    for name, module in modules.items():
        assert torch.equal(module.weight, state[f"{name}.weight"]), name
        expected = official_dequantize(state[f"{name}.weight"], state[f"{name}.weight_scale"], bits)
        from thuglm.models.quantization import dequantize_rows

        assert torch.equal(dequantize_rows(module.weight, module.weight_scale, bits), expected), name
    assert isinstance(model.lm_head, OfficialQuantizedHead) == embeddings


def dequantized_reference(folder: Path, bits: int) -> torch.nn.Module:
    """The fp32 model whose weights are the official dequantization of the folder's (everything else as stored)."""
    model = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY).eval()
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"{name}_scale" in state:
                param.copy_(official_dequantize(state[name], state[f"{name}_scale"], bits))
            elif name in state:
                param.copy_(state[name].float())
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_generation_are_the_official_dequantized_model(folders, variant):
    bits, _ = VARIANTS[variant]
    model = AutoModelForCausalLM.from_pretrained(folders[variant], dtype=torch.float32).eval()
    reference = dequantized_reference(folders[variant], bits)
    with torch.no_grad():
        got, expected = model(IDS, attention_mask=MASK).logits, reference(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(IDS[:1], **greedy), reference.generate(IDS[:1], **greedy))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_scales_in_fp32(folders, dtype):
    model = AutoModelForCausalLM.from_pretrained(folders["int4"], dtype=dtype).eval()
    linear = model.transformer.layers[0].mlp.dense_h_to_4h
    assert linear.weight.dtype == torch.int8 and linear.weight_scale.dtype == torch.float32
    fp32 = AutoModelForCausalLM.from_pretrained(folders["int4"], dtype=torch.float32).eval()
    with torch.no_grad():
        got, expected = model(IDS).logits.float(), fp32(IDS).logits
    assert ((got - expected).norm() / expected.norm()) < 0.05


def test_the_int8_kernel_computes_the_dequantized_matmul(folders):
    model = AutoModelForCausalLM.from_pretrained(folders["int8"], dtype=torch.float32).eval()
    linear = model.transformer.layers[1].attention.query_key_value
    x = torch.randn(5, linear.in_features)
    with torch.no_grad():
        got = linear(x)
    assert linear._int8_kernel, "torch._weight_int8pack_mm was not used on the CPU"
    expected = x @ linear.dequantized_weight().T + linear.bias
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def break_checkpoint(folder: Path, out: Path, key: str, value=None) -> Path:
    import shutil

    shutil.copytree(folder, out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    if value is None:
        del state[key]
    else:
        state[key] = value
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_a_missing_weight_scale_is_named(folders, tmp_path, capsys):
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight_scale"
    broken = break_checkpoint(folders["int4"], tmp_path / "broken", key)
    with pytest.raises(OfficialCheckpointError, match=key.replace(".", r"\.")):
        load_for_inference(broken, device="cpu")
    monkeypatch_stdin = io.StringIO("你好\n")
    sys.stdin, saved = monkeypatch_stdin, sys.stdin
    try:
        assert main(["chat", str(broken)]) == 2
    finally:
        sys.stdin = saved
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("thuglm:")]
    assert len(errors) == 1 and key in errors[0], errors


def test_a_corrupt_weight_scale_is_named(folders, tmp_path):
    key = "transformer.layers.0.attention.dense.weight_scale"
    state = torch.load(folders["int4"] / "pytorch_model.bin", weights_only=True)
    nan = state[key].clone()
    nan[3] = float("nan")
    broken = break_checkpoint(folders["int4"], tmp_path / "nan", key, nan)
    with pytest.raises(OfficialCheckpointError, match=rf"{key.replace('.', '[.]')} holds NaN"):
        load_for_inference(broken, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(broken)  # the Auto API: named at the first forward pass
    with pytest.raises(OfficialCheckpointError, match=key.replace(".", "[.]")):
        model(IDS)


def test_chat_runs_the_int4_folder_and_quantize_on_it_is_refused(folders, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", str(folders["int4-qe"]), "--greedy", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.count("ChatGLM：") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", str(folders["int4"]), "--quantize", "4"]) == 2
    err = capsys.readouterr().err
    assert "already an int4 checkpoint" in err and "drop --quantize 4" in err


@pytest.mark.parametrize(("overrides", "message"), [
    ([], "`method: lora` cannot train: use `method: ptuning`"),
    (["quantization.bits=4"], "quantized already: remove the `quantization` section"),
])
def test_lora_on_an_official_int4_folder_is_refused_with_the_fix(folders, tmp_path, capsys, overrides, message):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = ["train", str(config), f"model={folders['int4']}", f"data.files={OFFICIAL_TINY / 'config.json'}",
            f"output_dir={tmp_path / 'out'}", *overrides]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("thuglm:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_int4_qe_follows_the_model_dtype(folders):
    model = AutoModelForCausalLM.from_pretrained(folders["int4-qe"], dtype=torch.bfloat16).eval()
    assert model.transformer.word_embeddings(IDS).dtype == torch.bfloat16
    model = model.to(torch.float32)
    with torch.no_grad():
        assert model(IDS).logits.dtype == torch.float32


def test_serve_batches_an_int4_qe_model_in_its_dtype(folders):
    from thuglm.inference.batching import ContinuousBatcher
    from thuglm.inference.serve import ChatService

    from ..inference.serve_helpers import running_server
    from ..inference.test_serve_batching import ask

    tokenizer, model = load_for_inference(folders["int4-qe"], device="cpu", dtype="bf16")
    assert ContinuousBatcher(model, tokenizer.eos_token_id, slots=1, capacity=64).dtype == torch.bfloat16
    tokenizer, model = load_for_inference(folders["int4-qe"], device="cpu")
    expected = model.chat(tokenizer, "你好", do_sample=False, max_length=None, max_new_tokens=6)[0]
    service = ChatService(model, tokenizer, max_new_tokens=6, slots=2, max_seq_len=128)
    with running_server(service) as url:
        assert ask(url, "你好", 6) == expected
