import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from thuglm.data import causal_lm_sample
from thuglm.models import ChatGLMConfig, ChatGLMForConditionalGeneration, MissingGlmTokensError

from ..conftest import random_weights

PROMPTS = ["你好 世界", "今天天气很好\n明天也好", "春天"]


def test_auto_classes_load_the_folder_without_remote_code(tiny_dir):
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "chatglm"
    assert type(AutoModelForCausalLM.from_pretrained(tiny_dir)).__name__ == "ChatGLMForConditionalGeneration"
    # The official README loads with AutoModel and calls .chat(): AutoModel keeps giving the generation class.
    assert hasattr(AutoModel.from_pretrained(tiny_dir), "chat")
    assert type(AutoTokenizer.from_pretrained(tiny_dir)).__name__ == "ChatGLMTokenizer"


def test_lm_head_is_tied_to_the_embeddings(model):
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_eager_and_sdpa_agree(model, tokenizer, tiny_dir):
    sdpa = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(model.state_dict())
    assert (model.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    eager_logits = model(**batch).logits[real]
    sdpa_logits = sdpa(**batch).logits[real]
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_logits(model, tokenizer):
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    logits = model(**batch).logits
    for row, prompt in enumerate(PROMPTS):
        alone = model(**tokenizer(prompt, return_tensors="pt")).logits[0]
        torch.testing.assert_close(logits[row, -alone.shape[0] :], alone, rtol=1e-5, atol=1e-5)


def test_causal_guarantee_after_sop(model, tokenizer):
    """For [gMASK] <sop> t1..tn, changing t(k+1) leaves the logits at positions <= k unchanged."""
    text = tokenizer.encode_text(["今天天气很好，我们去公园散步吧"])[0]
    sample = causal_lm_sample(text, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    ids = torch.tensor([sample["input_ids"]])
    base = model(input_ids=ids).logits
    for k in range(2, ids.shape[1] - 1):
        changed = ids.clone()
        changed[0, k + 1] = (changed[0, k + 1] + 7) % tokenizer.vocab_size
        logits = model(input_ids=changed).logits
        torch.testing.assert_close(logits[0, : k + 1], base[0, : k + 1], rtol=0, atol=0)
        assert not torch.allclose(logits[0, k + 1 :], base[0, k + 1 :])


def test_context_is_bidirectional(model, tokenizer):
    """Before <sop> GLM sees both ways: changing the last text token changes the first token's output."""
    ids = tokenizer("今天天气很好", return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -3] = (changed[0, -3] + 7) % tokenizer.vocab_size
    assert not torch.allclose(model(input_ids=ids).logits[0, 0], model(input_ids=changed).logits[0, 0])


def test_packed_rows_give_the_per_sample_losses(model, tokenizer):
    texts = ["春眠不觉晓", "处处闻啼鸟，夜来风雨声", "花落知多少"]
    ids = tokenizer.encode_text(texts)
    samples = [causal_lm_sample(t, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
               for t in ids]
    packed_ids = torch.tensor([sum((s["input_ids"] for s in samples), [])])
    packed_mask = torch.tensor([sum(([i + 1] * len(s["input_ids"]) for i, s in enumerate(samples)), [])])
    packed_logits = model(input_ids=packed_ids, attention_mask=packed_mask).logits[0]
    start = 0
    for sample in samples:
        alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
        end = start + alone.shape[0]
        torch.testing.assert_close(packed_logits[start:end], alone, rtol=1e-5, atol=1e-5)
        start = end


def test_loss_matches_a_hand_computed_shifted_cross_entropy(model, tokenizer):
    sample = causal_lm_sample(tokenizer.encode_text(["床前明月光"])[0], tokenizer.gmask_token_id,
                              tokenizer.bos_token_id, tokenizer.eos_token_id)
    ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
    out = model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_missing_sop_gives_a_clear_error(model, tokenizer):
    ids = torch.tensor([tokenizer.encode_text(["没有特殊符号"])[0]])
    with pytest.raises(MissingGlmTokensError, match=r"\[gMASK\] <sop>"):
        model(input_ids=ids)


def test_generate_with_and_without_cache_agree(model, tokenizer):
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(**batch, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 12
    # Batched generation equals generating each prompt alone.
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(**tokenizer(prompt, return_tensors="pt"), **kwargs)[0]
        assert cached[row, -alone.shape[0] :].tolist() == alone.tolist()
    # Positions from input_ids alone (no tokenizer position_ids) give the same tokens.
    derived = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    assert torch.equal(derived, cached)


def test_generation_positions_follow_the_official_rule(model, tokenizer):
    """Each generated token keeps the [gMASK] position and advances the block position by one."""
    batch = tokenizer("你好", return_tensors="pt")
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    hook.remove()
    prompt_positions = batch["position_ids"][0]
    gmask_position, last_block = prompt_positions[0, -1].item(), prompt_positions[1, -1].item()
    assert [step[0, :, -1].tolist() for step in seen[1:]] == [
        [gmask_position, last_block + 1],
        [gmask_position, last_block + 2],
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_computes_the_official_per_half_products_bit_for_bit(dtype):
    """apply_glm_rotary (both halves, query and key at once) against the official formula: each half rotated by its
    own position, `x * cos + cat(-x2, x1) * sin`, then concatenated. Equal bits, not a tolerance: the same products."""
    from thuglm.models.modeling_chatglm import ChatGLMRotaryEmbedding, apply_glm_rotary

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    head_dim, generator = 128, torch.Generator().manual_seed(0)
    rotary = ChatGLMRotaryEmbedding(ChatGLMConfig(hidden_size=head_dim * 4, num_attention_heads=4))
    position_ids = torch.stack([torch.randint(0, 2048, (2, 50), generator=generator),
                                torch.randint(0, 100, (2, 50), generator=generator)], dim=1)
    query_key = torch.randn(2, 50, 4, 2, head_dim, generator=generator).to(dtype)  # [batch, seq, heads, (q, k), d]
    freqs = position_ids[..., None].float() * rotary.inv_freq(position_ids.device)
    angles = torch.cat((freqs, freqs), dim=-1)  # [batch, (position, block position), seq, head_dim / 2]
    cos, sin = angles.cos().to(dtype)[:, :, :, None, None], angles.sin().to(dtype)[:, :, :, None, None]
    official = torch.cat([half * cos[:, i] + rotate_half(half) * sin[:, i]
                          for i, half in enumerate(query_key.chunk(2, dim=-1))], dim=-1)
    assert torch.equal(apply_glm_rotary(query_key, *rotary(query_key, position_ids)), official)


def test_linear_rope_scaling_divides_every_position_by_its_factor():
    """Position interpolation: with factor 8, position 8p rotates as position p did, in both rotary halves."""
    from thuglm.models.modeling_chatglm import ChatGLMRotaryEmbedding

    official = ChatGLMRotaryEmbedding(ChatGLMConfig(hidden_size=512, num_attention_heads=4))
    stretched = ChatGLMRotaryEmbedding(ChatGLMConfig(hidden_size=512, num_attention_heads=4,
                                                     rope_parameters={"rope_type": "linear", "factor": 8}))
    positions = torch.stack([torch.arange(2048), torch.arange(2048).flip(0)])[None]  # [1, 2, seq]
    x = torch.zeros(1, 1)
    for official_table, stretched_table in zip(official(x, positions), stretched(x, positions * 8), strict=True):
        torch.testing.assert_close(stretched_table, official_table, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({}, None),
        ({"rope_parameters": {"rope_type": "default"}}, None),
        ({"rope_parameters": {"rope_type": "linear", "factor": 8}}, {"rope_type": "linear", "factor": 8.0}),
        ({"rope_scaling": {"type": "linear", "factor": 4.0}}, {"rope_type": "linear", "factor": 4.0}),  # older spelling
    ],
)
def test_rope_parameters_are_stored_in_transformers_form_and_survive_a_save(tmp_path, given, stored):
    config = ChatGLMConfig(**given)
    assert config.rope_parameters == stored
    config.save_pretrained(tmp_path)
    assert ChatGLMConfig.from_pretrained(tmp_path).rope_parameters == stored
    assert ("rope_parameters" in json.loads((tmp_path / "config.json").read_text())) == (stored is not None)


@pytest.mark.parametrize(
    ("rope_parameters", "message"),
    [({"rope_type": "yarn", "factor": 4}, "rope_type 'yarn' is not one ChatGLM runs; use one of default, linear"),
     ({"rope_type": "linear"}, "needs a factor of at least 1; got None"),
     ({"rope_type": "linear", "factor": 0.5}, "got 0.5"),
     ("linear", "rope_parameters must be a mapping such as {'rope_type': 'linear', 'factor': 8}; got 'linear'")],
)
def test_rope_parameters_chatglm_cannot_run_are_refused(rope_parameters, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ChatGLMConfig(rope_parameters=rope_parameters)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_backward(tiny_dir, tokenizer, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    assert model.dtype == dtype
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for attn in ("eager", "sdpa"):
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
        out = model(**batch, labels=labels)
        assert out.logits.dtype == dtype and torch.isfinite(out.loss)
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())
        model.zero_grad()
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(model, tokenizer, reentrant):
    """Both forms of torch's checkpoint (thuglm train takes the reentrant one, FSDP / DeepSpeed the other); a forward
    without autograd in training mode (a DPO reference) runs the layers as they are, with no checkpoint's warning."""
    import warnings

    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()

    def grads():
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(**batch, labels=labels).loss, model(**batch, labels=labels).loss)


def test_peft_lora_trains_a_step_in_bf16(tiny_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    wrapped = {name.split(".lora_A")[0].split(".")[-1] for name, _ in lora.named_parameters() if "lora_A" in name}
    assert wrapped == set(targets)
    lora.train()
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    before = lora(**batch, labels=labels).loss
    before.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = lora(**batch, labels=labels).loss
    assert torch.isfinite(before) and torch.isfinite(after) and after.item() != before.item()


def test_save_and_load_round_trip_is_exact(model, tmp_path, tokenizer):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict as the official checkpoint stores it: lm_head saved, one rotary table per layer."""
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    half_dim = model.config.head_dim // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, half_dim, 2).float() / half_dim))).half()
    for i in range(model.config.num_layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq
    return state


def write_official_config(model, folder):
    config = model.config.to_dict()
    config.update(
        architectures=["ChatGLMModel"],
        auto_map={
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("shards", [1, 3])
def test_official_bin_layout_loads(model, tmp_path, tokenizer, tiny_dir, shards):
    state = official_state_dict(model)
    names = sorted(state)
    if shards == 1:
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            filename = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            torch.save({name: state[name] for name in part}, tmp_path / filename)
            weight_map.update(dict.fromkeys(part, filename))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    write_official_config(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_bin_files_are_loaded_with_weights_only(model, tmp_path):
    """A pickle that runs code on load must be refused, not executed."""

    class Exploit:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran while loading weights')",))

    state = official_state_dict(model)
    state["transformer.final_layernorm.bias"] = Exploit()
    torch.save(state, tmp_path / "pytorch_model.bin")
    write_official_config(model, tmp_path)
    with pytest.raises(Exception) as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not isinstance(error.value, SystemExit)


def test_chat_and_stream_chat_agree(model, tokenizer):
    history = [("你好", "你好，有什么可以帮你？")]
    kwargs = dict(do_sample=False, max_length=300)
    response, new_history = model.chat(tokenizer, "春天适合做什么？", history, **kwargs)
    assert new_history == history + [("春天适合做什么？", response)]
    streamed = list(model.stream_chat(tokenizer, "春天适合做什么？", history, **kwargs))
    assert streamed and streamed[-1][0] == response
    assert all(history_so_far[-1] == ("春天适合做什么？", text) for text, history_so_far in streamed)


def test_random_init_is_used_for_fresh_models(tokenizer):
    from thuglm.models.tiny import tiny_config

    config = tiny_config(tokenizer.vocab_size, tokenizer)
    model = ChatGLMForConditionalGeneration(config)
    std = model.transformer.layers[0].attention.query_key_value.weight.std().item()
    assert 0.015 < std < 0.025
    assert torch.equal(model.transformer.layers[0].input_layernorm.weight, torch.ones(config.hidden_size))
    random_weights(model)  # the helper used by other tests works on a fresh model too


def test_stopping_a_stream_stops_generation(model, tokenizer):
    import threading

    # Compare thread objects, not counts: a thread an earlier test left behind may end meanwhile.
    before = set(threading.enumerate())
    stream = model.stream_chat(tokenizer, "你好", do_sample=False, max_length=None, max_new_tokens=200,
                               eos_token_id=None)
    next(stream)
    started = set(threading.enumerate()) - before
    assert started, "stream_chat generates on a thread of its own"
    stream.close()
    assert not any(thread.is_alive() for thread in started)


def test_ids_in_the_models_padded_vocab_tail_decode_to_nothing(model, tokenizer):
    assert model.config.vocab_size > tokenizer.vocab_size
    ids = tokenizer("你好", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids + [model.config.vocab_size - 1]) == "你好"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_autocast_keeps_padded_batches_finite(tiny_dir, tokenizer, dtype):
    """fp32 weights under autocast (what the Trainer does with bf16/fp16=True): no dtype errors, no NaN."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.autocast("cpu", dtype=dtype):
        out = model(**batch, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_half_precision_residual_stream_stays_half_where_autocast_runs_layer_norm_in_fp32(tiny_dir, tokenizer,
                                                                                            monkeypatch):
    """CUDA autocast returns layer_norm's output in fp32 (CPU autocast does not: that policy is added here).
    GLM's residual is the normalised input, so without the cast back every layer would hand the next (and gradient
    checkpointing would keep) fp32 hidden states: twice the bytes of the official code's half-precision stream."""
    layer_norm = torch.nn.functional.layer_norm

    def cuda_autocast_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        return layer_norm(x.float(), shape, None if weight is None else weight.float(),
                          None if bias is None else bias.float(), eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", cuda_autocast_layer_norm)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    plain = torch.nn.LayerNorm(8).bfloat16()
    assert plain(torch.ones(1, 8, dtype=torch.bfloat16)).dtype == torch.float32  # the policy, on a plain LayerNorm
    outputs = []
    for layer in model.transformer.layers:
        layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=labels, output_hidden_states=True)
    assert [o.dtype for o in outputs] == [torch.bfloat16] * len(model.transformer.layers)
    assert out.hidden_states[-1].dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize(
    ("override", "message"),
    [({"quantization_bit": 2}, "int4 or int8"), ({"position_encoding_2d": False}, "2D positions")],
)
def test_unsupported_configs_are_refused_with_a_reason(tokenizer, override, message):
    from thuglm.models.tiny import tiny_config

    with pytest.raises(NotImplementedError, match=message):
        ChatGLMForConditionalGeneration(tiny_config(tokenizer.vocab_size, tokenizer, **override))


def test_position_ids_of_the_wrong_shape_are_explained(model, tokenizer):
    batch = tokenizer("你好", return_tensors="pt")
    with pytest.raises(ValueError, match=r"\[batch, 2, seq\]"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"][:, 0])



def test_chat_shows_the_answer_before_the_end_token(model, tokenizer, monkeypatch):
    answer = tokenizer.encode_text(["你好"])[0]

    def fake_generate(input_ids, **kwargs):
        tail = torch.tensor([[*answer, tokenizer.eos_token_id, tokenizer.pad_token_id]])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    response, history = model.chat(tokenizer, "问", max_new_tokens=8)
    assert response == "你好" and "<eop>" not in response
    assert history == [("问", "你好")]
