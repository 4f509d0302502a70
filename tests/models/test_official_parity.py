"""thuglm against the official THUDM/chatglm-6b code, on outputs it produced (tests/fixtures/make_official_golden.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from thuglm.models import ChatGLMTokenizer

FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny"
TOKENIZER_GOLDEN = json.loads((FOLDER / "golden" / "tokenizer.json").read_text())
MODEL_META = json.loads((FOLDER / "golden" / "model.json").read_text())


@pytest.fixture(scope="module")
def golden():
    return load_file(str(FOLDER / "golden" / "model.safetensors"))


@pytest.fixture(scope="module")
def official_tokenizer():
    """The official folder's tokenizer, through AutoTokenizer, with no remote code."""
    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(params=["eager", "sdpa"])
def official_model(request):
    return AutoModelForCausalLM.from_pretrained(FOLDER, attn_implementation=request.param).eval()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_official_config_loads_unchanged():
    config = AutoConfig.from_pretrained(FOLDER)
    raw = json.loads((FOLDER / "config.json").read_text())
    for key in ("hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size", "layernorm_epsilon",
                "max_sequence_length", "position_encoding_2d", "vocab_size", "bos_token_id", "eos_token_id",
                "mask_token_id", "gmask_token_id", "pad_token_id"):
        assert getattr(config, key) == raw[key], key
    assert "auto_map" in raw and not hasattr(config, "auto_map")


@pytest.mark.parametrize("case", TOKENIZER_GOLDEN["texts"], ids=lambda case: repr(case["text"])[:30])
def test_token_ids_equal_the_official_tokenizer(official_tokenizer, case):
    text = case["text"]
    assert official_tokenizer.tokenize(text) == case["tokens"]
    assert official_tokenizer.encode(text) == case["ids"]
    assert official_tokenizer.encode(text, add_special_tokens=False) == case["ids_no_special"]
    assert official_tokenizer.decode(case["ids"]) == case["decoded"]
    no_cleanup = official_tokenizer.decode(case["ids"], clean_up_tokenization_spaces=False)
    assert no_cleanup == case["decoded_no_cleanup"]


def test_image_token_offset_equals_the_official_tokenizer():
    shifted = ChatGLMTokenizer(vocab_file=str(FOLDER / "ice_text.model"), num_image_tokens=20000)
    for case in TOKENIZER_GOLDEN["texts"]:
        assert shifted.encode(case["text"]) == case["ids_image20000"], case["text"]


def test_pairs_equal_the_official_tokenizer(official_tokenizer):
    for case in TOKENIZER_GOLDEN["pairs"]:
        assert official_tokenizer(case["a"], case["b"])["input_ids"] == case["ids"]


def test_padded_batch_equals_the_official_tokenizer(official_tokenizer):
    golden_batch = TOKENIZER_GOLDEN["batch"]
    batch = official_tokenizer(golden_batch["texts"], padding=True)
    assert batch["input_ids"] == golden_batch["input_ids"]
    assert batch["position_ids"] == golden_batch["position_ids"]
    # The official tokenizer returns a [1, S, S] "masked" matrix; thuglm returns the 2D padding mask it came from.
    for row, official_mask in zip(batch["attention_mask"], golden_batch["attention_mask"]):
        padded_keys = [all(column) for column in zip(*official_mask[0])]
        assert [1 - p for p in padded_keys] == row


def test_single_prompt_logits_equal_the_official_model(official_model, golden):
    for k in range(len(MODEL_META["prompts"])):
        logits = official_model(input_ids=golden[f"single_{k}_input_ids"]).logits
        assert max_rel_err(logits, golden[f"single_{k}_logits"]) <= 1e-4


def test_left_padded_batch_logits_equal_the_official_model(official_model, official_tokenizer, golden):
    batch = official_tokenizer(MODEL_META["prompts"], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], golden["batch_input_ids"])
    assert torch.equal(batch["position_ids"], golden["batch_position_ids"])
    logits = official_model(**batch).logits
    real = batch["attention_mask"].bool()  # padding positions' outputs are unused in both implementations
    assert max_rel_err(logits[real], golden["batch_logits"][real]) <= 1e-4


def test_loss_and_gradients_equal_the_official_model(official_model, golden):
    official_model.zero_grad()
    loss = official_model(input_ids=golden["loss_input_ids"], labels=golden["loss_labels"]).loss
    loss.backward()
    assert abs(loss.item() - golden["loss"].item()) <= 1e-5 * abs(golden["loss"].item())
    for name, param in official_model.named_parameters():
        expected = golden[f"grad.{name}"]
        assert max_rel_err(param.grad, expected) <= 1e-4, name


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_the_official_model(official_model, official_tokenizer, golden, use_cache):
    settings = MODEL_META["generate"]
    suffix = "cache" if use_cache else "nocache"
    single = official_tokenizer([MODEL_META["prompts"][1]], return_tensors="pt")
    out = official_model.generate(**single, use_cache=use_cache, **settings)
    assert out.tolist() == golden[f"gen_single_{suffix}"].tolist()
    batch = official_tokenizer(MODEL_META["prompts"], padding=True, return_tensors="pt")
    out = official_model.generate(**batch, use_cache=use_cache, **settings)
    assert out.tolist() == golden[f"gen_batch_{suffix}"].tolist()


def test_chat_answers_equal_the_official_chat(official_model, official_tokenizer):
    for case in MODEL_META["chat"]:
        history = [tuple(turn) for turn in case["history"]]
        response, new_history = official_model.chat(
            official_tokenizer, case["query"], history=history, do_sample=False, max_length=case["max_length"]
        )
        assert response == case["response"]
        assert new_history == history + [(case["query"], response)]


# ---- P-Tuning v2 (golden/ptuning.*: the official model with pre_seq_len, its prefix encoder seeded) -------------------
PTUNING_META = json.loads((FOLDER / "golden" / "ptuning.json").read_text())


@pytest.fixture(scope="module")
def ptuning_golden():
    return load_file(str(FOLDER / "golden" / "ptuning.safetensors"))


@pytest.fixture(params=[("plain", "eager"), ("plain", "sdpa"), ("projection", "eager"), ("projection", "sdpa")],
                ids=lambda p: "-".join(p))
def ptuned_official(request, ptuning_golden):
    """The official README's recipe: config with pre_seq_len, the base, the stripped prefix keys loaded."""
    variant, attn = request.param
    settings = PTUNING_META["variants"][variant]
    config = AutoConfig.from_pretrained(FOLDER, pre_seq_len=PTUNING_META["pre_seq_len"],
                                        prefix_projection=settings["prefix_projection"])
    model = AutoModelForCausalLM.from_pretrained(FOLDER, config=config, attn_implementation=attn)
    prefix = f"{variant}.prefix.transformer.prefix_encoder."
    model.transformer.prefix_encoder.load_state_dict(
        {key[len(prefix):]: value for key, value in ptuning_golden.items() if key.startswith(prefix)})
    return variant, model.eval()


def test_ptuning_logits_loss_and_generation_equal_the_official_model(ptuned_official, official_tokenizer,
                                                                      ptuning_golden):
    variant, model = ptuned_official
    golden = {key[len(variant) + 1:]: value for key, value in ptuning_golden.items() if key.startswith(variant + ".")}
    with torch.no_grad():
        assert max_rel_err(model(input_ids=golden["single_input_ids"]).logits, golden["single_logits"]) <= 1e-4
        batch = official_tokenizer(PTUNING_META["prompts"], padding=True, return_tensors="pt")
        assert batch["input_ids"].tolist() == PTUNING_META["batch_input_ids"]
        real = batch["attention_mask"].bool()
        assert max_rel_err(model(**batch).logits[real], golden["batch_logits"][real]) <= 1e-4
        settings = PTUNING_META["generate"]
        assert model.generate(**batch, **settings).tolist() == golden["gen_batch"].tolist()
        assert model.generate(**batch, use_cache=False, **settings).tolist() == golden["gen_batch_nocache"].tolist()
    model.zero_grad()
    loss = model(input_ids=golden["loss_input_ids"], labels=golden["loss_labels"]).loss
    loss.backward()
    assert abs(loss.item() - golden["loss"].item()) <= 1e-5 * abs(golden["loss"].item())
    for name, param in model.transformer.prefix_encoder.named_parameters():
        assert max_rel_err(param.grad, golden[f"grad.transformer.prefix_encoder.{name}"]) <= 1e-4, name
