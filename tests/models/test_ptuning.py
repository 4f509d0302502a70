"""P-Tuning v2 in the model: the prefix encoder, its keys and values in every layer, the widened mask, loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, DynamicCache

from tests.conftest import random_weights
from thuglm.models import ChatGLMForConditionalGeneration
from thuglm.models.masking import glm_attention_mask, glm_block_mask
from thuglm.models.prefix import (
    PREFIX_KEY,
    is_ptuning_folder,
    load_prefix_state_dict,
    save_prefix_checkpoint,
)

P = 3
PROMPTS = ["你好", "请介绍一下北京的天气和历史"]


def ptuned(tiny_dir, projection: bool = False, attn: str = "eager", seed: int = 0):
    config = AutoConfig.from_pretrained(tiny_dir, pre_seq_len=P, prefix_projection=projection)
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, attn_implementation=attn)
    random_weights(model, seed=seed)
    with torch.no_grad():  # a prefix strong enough to change the outputs visibly
        model.transformer.prefix_encoder.embedding.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    return model.eval()


@pytest.fixture(params=[False, True], ids=["plain", "projection"])
def projection(request):
    return request.param


def test_official_names_shapes_and_initialisation(tiny_dir, projection):
    config = AutoConfig.from_pretrained(tiny_dir, pre_seq_len=P, prefix_projection=projection)
    model = AutoModel.from_pretrained(tiny_dir, config=config)
    names = {name: tuple(p.shape) for name, p in model.named_parameters() if "prefix" in name}
    h, width = config.hidden_size, 2 * config.num_layers * config.hidden_size
    if projection:
        assert names == {f"{PREFIX_KEY}embedding.weight": (P, h), f"{PREFIX_KEY}trans.0.weight": (h, h),
                         f"{PREFIX_KEY}trans.0.bias": (h,), f"{PREFIX_KEY}trans.2.weight": (width, h),
                         f"{PREFIX_KEY}trans.2.bias": (width,)}
    else:
        assert names == {f"{PREFIX_KEY}embedding.weight": (P, width)}
    # torch's defaults, as the official PrefixEncoder starts: N(0, 1) slots (not the model's N(0, 0.02)).
    assert 0.7 < model.transformer.prefix_encoder.embedding.weight.std().item() < 1.3


def test_prefix_equals_the_same_keys_and_values_in_a_cache(tiny_dir, tokenizer, projection):
    """The prefix is what the official code makes it: per-layer past keys and values (not rotated) that every token
    sees, the text's positions unchanged. Built here independently, as a cache in front of a base model."""
    model = ptuned(tiny_dir, projection)
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    base.load_state_dict(model.state_dict(), strict=False)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        prefix = model.transformer.prefix_encoder(2, torch.float32)
        cache = DynamicCache(config=base.config)
        for layer in range(base.config.num_layers):
            cache.update(prefix[layer, 0], prefix[layer, 1], layer)
        mask = torch.cat([torch.ones(2, P, dtype=torch.long), batch["attention_mask"]], dim=1)
        actual = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                      past_key_values=cache).logits
        plain = base(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    assert (plain[real] - expected[real]).abs().max() > 1e-2  # the prefix changes the answer


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_rows_equal_each_row_alone(tiny_dir, tokenizer, attn, projection):
    model = ptuned(tiny_dir, projection, attn)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(**tokenizer([prompt], return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[row, -alone.shape[0]:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_every_attention_gives_the_eager_logits(tiny_dir, tokenizer, attn):
    """Left-padded rows with the prefix; flex attention runs its forward on the CPU too (its backward needs a GPU)."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = ptuned(tiny_dir, attn="eager")(**batch).logits[real]
        other = ptuned(tiny_dir, attn=attn)(**batch).logits[real]
    torch.testing.assert_close(other, eager, rtol=1e-5, atol=1e-4)


def test_flex_block_mask_sees_the_prefix_then_the_glm_rule(tokenizer):
    from torch.nn.attention.flex_attention import create_mask

    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    position_ids, mask = batch["position_ids"], batch["attention_mask"]
    seq = mask.shape[1]
    block = glm_block_mask(position_ids, mask, 0, prefix_length=P)
    flex = create_mask(block.mask_mod, 2, 1, seq, P + seq, device="cpu")[:, 0]
    dense = glm_attention_mask(position_ids, mask, 0, torch.float32)[:, 0] == 0
    assert torch.equal(flex, torch.cat([torch.ones(2, seq, P, dtype=torch.bool), dense], dim=-1))


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["b1", "left-padded-b2"])
def test_generate_static_dynamic_and_uncached_agree(tiny_dir, tokenizer, prompts):
    model = ptuned(tiny_dir, attn="sdpa")
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id}
    dynamic = model.generate(**batch, **kwargs)
    assert torch.equal(model.generate(**batch, cache_implementation="static", **kwargs), dynamic)
    assert torch.equal(model.generate(**batch, use_cache=False, **kwargs), dynamic)


def test_chat_and_stream_chat_answer_as_generate(tiny_dir, tokenizer):
    model = ptuned(tiny_dir)
    response, _ = model.chat(tokenizer, "你好", do_sample=False, max_length=24)
    streamed = list(model.stream_chat(tokenizer, "你好", do_sample=False, max_length=24))
    assert streamed[-1][0] == response
    ids = tokenizer(["你好"], return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_length=24)[0, ids["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert response == tokenizer.decode(out[: out.index(eos)] if eos in out else out).strip()


def test_packed_rows_equal_each_sample_alone(tiny_dir, tokenizer):
    """Every sample of a packed row sees the one prefix it would see alone: packing stays exact."""
    model = ptuned(tiny_dir)
    a = tokenizer.encode("你好")
    b = tokenizer.encode("请介绍一下北京")
    ids = torch.tensor([a + b + [tokenizer.pad_token_id] * 2])
    mask = torch.tensor([[1] * len(a) + [2] * len(b) + [0, 0]])
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[: len(a)], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[len(a): len(a) + len(b)], alone_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_prefix_the_same_gradient(tiny_dir, tokenizer, reentrant):
    model = ptuned(tiny_dir)
    model.transformer.prefix_encoder.dropout.p = 0.0  # the same forward twice
    model.requires_grad_(False)
    model.transformer.prefix_encoder.requires_grad_(True)
    ids = torch.tensor([tokenizer.encode("你好") + tokenizer.encode("北京", add_special_tokens=False)])
    labels = ids.clone()
    grads = []
    for checkpointing in (False, True):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append(model.transformer.prefix_encoder.embedding.weight.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_dropout_only_while_training(tiny_dir):
    model = ptuned(tiny_dir)
    encoder = model.transformer.prefix_encoder
    assert torch.equal(encoder(2, torch.float32), encoder(2, torch.float32))
    encoder.train()
    dropped = encoder(2, torch.float32)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.1, abs=0.05)
    assert not torch.equal(dropped[:, :, 0], dropped[:, :, 1])  # a mask per row, as the official code draws


def test_the_official_loading_recipe(tiny_dir, tokenizer, tmp_path, projection):
    """ptuning/README.md's recipe, unchanged but for trust_remote_code, loads a checkpoint in the official layout."""
    trained = ptuned(tiny_dir, projection, seed=0)
    save_prefix_checkpoint(trained, tmp_path / "ckpt")
    assert is_ptuning_folder(tmp_path / "ckpt") and not is_ptuning_folder(tiny_dir)
    state = torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=True)
    assert all(key.startswith(PREFIX_KEY) and value.dtype == torch.float32 for key, value in state.items())

    config = AutoConfig.from_pretrained(tiny_dir, pre_seq_len=P, prefix_projection=projection)
    model = AutoModel.from_pretrained(tiny_dir, config=config)
    model.load_state_dict(trained.state_dict(), strict=False)  # the same base weights
    prefix_state_dict = torch.load(tmp_path / "ckpt" / "pytorch_model.bin")
    new_prefix_state_dict = {}
    for k, v in prefix_state_dict.items():
        if k.startswith("transformer.prefix_encoder."):
            new_prefix_state_dict[k[len("transformer.prefix_encoder."):]] = v
    model.transformer.prefix_encoder.load_state_dict(new_prefix_state_dict)
    model.eval()
    ids = tokenizer(["你好"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, trained(**ids).logits)
        again = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config)
        again.load_state_dict(trained.state_dict(), strict=False)
        load_prefix_state_dict(again, tmp_path / "ckpt")
        torch.testing.assert_close(again.eval()(**ids).logits, trained(**ids).logits)


def test_fast_decoding_path_with_a_prefix_gives_the_plain_tokens(tiny_dir, tokenizer):
    """What chat uses on a GPU: a static cache and the host-sync-free loop; the prefix comes with every step."""
    from thuglm.models.decoding import sample_without_host_sync

    model = ptuned(tiny_dir, attn="sdpa")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id}
    fast = model.generate(**batch, cache_implementation="static", max_cache_len=256,
                          custom_generate=sample_without_host_sync, **kwargs)
    assert torch.equal(fast, model.generate(**batch, use_cache=False, **kwargs))


def test_decode_step_with_a_prefix_compiles_without_graph_breaks(tiny_dir, tokenizer):
    from tests.models.test_fast_decode import compiled_decode_step

    model = ptuned(tiny_dir, projection=True, attn="sdpa")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out, token, attention_mask, positions, cache = compiled_decode_step(model, batch)
        ids = torch.cat([batch["input_ids"], token], dim=1)
        plain = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1:]
    assert int(cache.get_seq_length()) == batch["input_ids"].shape[1] + 1  # the prefix is never written there
    torch.testing.assert_close(out.logits, plain, rtol=1e-5, atol=1e-5)
