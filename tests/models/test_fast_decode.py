"""The fast decoding path (static cache, decode-step mask, compiled step) gives the plain path's tokens exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from thuglm.models.decoding import sample_without_host_sync
from thuglm.models.masking import glm_attention_mask, glm_decode_mask, glm_static_cache_mask
from thuglm.models.modeling_chatglm import fast_decoding_kwargs

PROMPTS = ["你好", "请介绍一下北京的天气和历史"]
GREEDY = {"max_new_tokens": 10, "do_sample": False, "eos_token_id": None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["b1", "left-padded-b2"])
def test_static_cache_greedy_equals_dynamic_and_no_cache(model, tokenizer, attn, prompts):
    model.set_attn_implementation(attn)
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    kwargs = {**GREEDY, "pad_token_id": tokenizer.pad_token_id}
    static = model.generate(**batch, cache_implementation="static", **kwargs)
    dynamic = model.generate(**batch, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(static, dynamic)
    assert torch.equal(static, uncached)


def test_static_cache_larger_than_needed_changes_nothing(model, tokenizer):
    """A cache sized for later, longer calls (max_cache_len) masks its unwritten slots."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    kwargs = {**GREEDY, "pad_token_id": tokenizer.pad_token_id}
    roomy = model.generate(**batch, cache_implementation="static", max_cache_len=64, **kwargs)
    assert torch.equal(roomy, model.generate(**batch, **kwargs))


def test_forward_with_a_static_cache_and_a_2d_mask(model, tokenizer):
    """Called directly (no generate), the model builds the static-cache mask itself from the 2D mask."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    full = model(**batch).logits
    cache = StaticCache(config=model.config, max_cache_len=32)
    out = model(**batch, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(out.logits, full, rtol=1e-5, atol=1e-5)


def test_decode_mask_equals_the_full_rule():
    """One decoded token: the cheap mask is the general rule's last row, for padding, packing and a padding query."""
    masks = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]])
    position_ids = torch.tensor([[[3], [2]], [[1], [2]], [[0], [0]]])  # a generated token (block position > 0)
    full = glm_attention_mask(position_ids, masks, past_length=5, dtype=torch.float32)
    assert torch.equal(glm_decode_mask(masks, torch.float32), full)
    static = glm_static_cache_mask(position_ids, masks, cache_length=9, dtype=torch.float32)
    assert torch.equal(static[..., :6], full)
    assert (static[..., 6:] == torch.finfo(torch.float32).min).all()


def compiled_decode_step(model, batch, cache_len: int = 24):
    """Prefill `batch` into a static cache, then run one greedy decode step with the static-cache mask through
    `torch.compile(fullgraph=True)` (which fails on a graph break). Returns the step's output, its token, the
    attention_mask and position_ids of the rows with that token appended, and the cache."""
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    prefill = model(**batch, past_key_values=cache, use_cache=True)
    token = prefill.logits[:, -1:].argmax(-1)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
    position_ids = batch["position_ids"][..., -1:] + torch.tensor([0, 1])[None, :, None]
    step_mask = glm_static_cache_mask(position_ids, attention_mask, cache_len, model.dtype)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(input_ids=token, attention_mask=step_mask, position_ids=position_ids, past_key_values=cache)
    positions = torch.cat([batch["position_ids"], position_ids], dim=-1)
    return out, token, attention_mask, positions, cache


def test_decode_step_compiles_without_graph_breaks(model, tokenizer):
    """The decode step under a static cache traces as one graph (what CUDA-graph decoding on a GPU needs)."""
    model.set_attn_implementation("sdpa")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    out, *_, cache = compiled_decode_step(model, batch)
    assert out.logits.shape[:2] == (len(PROMPTS), 1)
    assert int(cache.get_seq_length()) == batch["input_ids"].shape[1] + 1
    assert model._can_compile_fullgraph


def test_fast_decoding_is_chosen_on_cuda_only_and_never_over_the_callers_choice():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fast_decoding_kwargs(cpu, 30, {"max_new_tokens": 100}) == {}
    # Cache sizes round up to a multiple of 256, so chat turns of different lengths share one compiled step.
    static = {"cache_implementation": "static", "custom_generate": sample_without_host_sync}
    assert fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 100}) == {**static, "max_cache_len": 256}
    assert fast_decoding_kwargs(cuda, 30, {"max_length": 2048}) == {**static, "max_cache_len": 2048}
    assert fast_decoding_kwargs(cuda, 300, {}, default_max_length=20)["max_cache_len"] == 256
    choices = ({"cache_implementation": "dynamic"}, {"use_cache": False}, {"past_key_values": None}, {"num_beams": 4})
    for chosen in choices:
        assert fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 100, **chosen}) == {}


def test_chat_asks_for_the_fast_path_through_generate(model, tokenizer, monkeypatch):
    """model.chat passes the fast-path arguments on to generate (checked on CPU by pretending to be on CUDA)."""
    seen = {}
    real_generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    on_cuda = lambda length, kwargs: fast_decoding_kwargs("cuda", length, kwargs)
    monkeypatch.setattr(model, "fast_decoding_kwargs", on_cuda)
    plain, _ = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8)
    assert seen["cache_implementation"] == "static"
    monkeypatch.undo()
    assert model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8)[0] == plain
