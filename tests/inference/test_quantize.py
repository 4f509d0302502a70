"""`--quantize 4 | 8` of chat / generate / eval / serve / predict, and the Auto API with a BitsAndBytesConfig: the
tiny model's linears in 4 or 8 bits through bitsandbytes, on the CPU (bitsandbytes >= 0.46 runs there)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.inference import load_for_inference, quantized

bnb = pytest.importorskip("bitsandbytes", reason='--quantize needs bitsandbytes: pip install "thuglm[quant]"')

PROMPTS = ["春天来了，", "长城是"]
# Relative error of the logits against fp32 on the tiny model with its large random weights (std 0.3, hidden 64):
# 4-bit NF4 rounds each weight to one of 16 levels, LLM.int8 to one of 255 (and its inputs too).
TOLERANCE = {4: 0.5, 8: 0.1}


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_load_for_inference_quantizes_the_linears_and_keeps_the_logits(base_dir, bits):
    tokenizer, reference = load_for_inference(base_dir, device="cpu")
    _, model = load_for_inference(base_dir, device="cpu", quantize=bits)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, kind) for m in model.modules()) == 4 * model.config.num_layers
    assert type(model.lm_head) is torch.nn.Linear  # tied to the embedding, not quantized
    got = logits(model, tokenizer)
    error = relative_error(got, logits(reference, tokenizer))
    assert 0 < error < TOLERANCE[bits], error
    answer, _ = model.chat(tokenizer, "你好", do_sample=False, max_length=None, max_new_tokens=6)
    assert isinstance(answer, str)


def test_an_adapter_runs_on_a_4bit_base(base_dir, adapter_dir):
    tokenizer, reference = load_for_inference(base_dir, adapter=adapter_dir, device="cpu")
    _, model = load_for_inference(base_dir, adapter=adapter_dir, device="cpu", quantize=4)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    expected = logits(reference, tokenizer)
    plain = logits(load_for_inference(base_dir, device="cpu")[1], tokenizer)
    got = logits(model, tokenizer)
    assert relative_error(got, expected) < TOLERANCE[4]
    assert relative_error(got, expected) < relative_error(plain, expected)  # the adapter is applied


def test_the_auto_api_with_a_bitsandbytes_config(base_dir):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reference = AutoModelForCausalLM.from_pretrained(base_dir)
    assert relative_error(logits(model, tokenizer), logits(reference, tokenizer)) < TOLERANCE[4]


def test_chat_generate_and_eval_take_quantize(output_dir, base_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", str(output_dir), "--quantize", "4", "--greedy", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.count("ChatGLM：") == 1
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "你好"}\n', encoding="utf-8")
    target = tmp_path / "answers.jsonl"
    assert main(["generate", str(output_dir), "--input", str(source), "--output", str(target), "--quantize", "8",
                 "--max-new-tokens", "6"]) == 0
    assert len(target.read_text(encoding="utf-8").splitlines()) == 1
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"sentence": "春眠不觉晓，处处闻啼鸟。"}\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(base_dir), "--data", str(corpus), "--text-column", "sentence", "--quantize", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_missing_bitsandbytes_is_one_line_with_the_install_command(base_dir, monkeypatch, capsys):
    monkeypatch.setattr(quantized, "bitsandbytes_installed", lambda: False)
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", str(base_dir), "--quantize", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "thuglm[quant]"' in err, err


def test_a_gpu_bitsandbytes_cannot_use_is_one_line(monkeypatch):
    import bitsandbytes.functional as F

    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore lines")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla K80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (3, 7))
    monkeypatch.setattr(F, "quantize_4bit", no_kernel)
    with pytest.raises(quantized.QuantizationUnavailable) as error:
        quantized.require_bitsandbytes()
    message = str(error.value)
    # (On this CPU-only torch the probe's CUDA tensor fails first; either way the reason is one line.)
    assert "\n" not in message and "Tesla K80" in message and "3.7" in message, message
