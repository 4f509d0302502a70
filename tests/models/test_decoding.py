"""The decoding loop that reads the stop flag a step late returns generate's own tokens, and stays a step ahead."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from thuglm.models import decoding
from thuglm.models.decoding import sample_without_host_sync
from thuglm.models.modeling_chatglm import InvalidScoreLogitsProcessor, fast_decoding_kwargs

PROMPTS = ["你好", "请介绍一下北京的天气和历史"]


def generate_both(model, batch, **kwargs):
    torch.manual_seed(0)
    plain = model.generate(**batch, **kwargs)
    torch.manual_seed(0)
    late = model.generate(**batch, custom_generate=sample_without_host_sync, **kwargs)
    return plain, late


class Uniform(LogitsProcessor):
    """Flat scores: the tiny random model is sure of one token, so sampling needs this to draw different ones."""

    def __call__(self, input_ids, scores):
        return torch.zeros_like(scores)


class EndsAtLength(StoppingCriteria):
    """Row i finishes once the sequence is lengths[i] long; generate pads it after that, as after an end token."""

    eos_token_id = -1  # generate pads finished rows only when a criterion names an end token

    def __init__(self, lengths: list[int]):
        self.lengths = torch.tensor(lengths)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return input_ids.shape[1] >= self.lengths


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["b1", "left-padded-b2"])
def test_greedy_tokens_equal_generate(model, tokenizer, cache, prompts):
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": None, "cache_implementation": cache}
    plain, late = generate_both(model, batch, **kwargs)
    assert torch.equal(plain, late)
    assert late.shape[1] == batch["input_ids"].shape[1] + 12


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rows_ending_at_different_steps_equal_generate(model, tokenizer, cache):
    """One row ends early (its later tokens are padding); when the last row ends, the surplus step is dropped."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    length = batch["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None,
              "cache_implementation": cache, "stopping_criteria": StoppingCriteriaList([EndsAtLength([length + 3,
                                                                                                       length + 7])])}
    plain, late = generate_both(model, batch, **kwargs)
    assert torch.equal(plain, late)
    assert plain.shape[1] == length + 7
    assert plain[0, length + 3 :].eq(tokenizer.pad_token_id).all()


def test_an_end_token_ends_the_loop_where_generate_ends(model, tokenizer):
    """Sampling reaches a real end token: both loops stop after it, with the same tokens."""
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    sampling = {"do_sample": True, "pad_token_id": tokenizer.pad_token_id, "logits_processor": LogitsProcessorList([Uniform()])}
    torch.manual_seed(0)
    free = model.generate(**batch, max_new_tokens=12, eos_token_id=None, **sampling)[0, batch["input_ids"].shape[1] :]
    end = int(free[4])
    plain, late = generate_both(model, batch, max_new_tokens=12, eos_token_id=end, **sampling)
    assert torch.equal(plain, late)
    assert late[0, -1] == end and late.shape[1] <= batch["input_ids"].shape[1] + 5


def test_sampling_draws_the_same_tokens(model, tokenizer):
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 10, "do_sample": True, "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id,
              "logits_processor": LogitsProcessorList([Uniform()])}
    plain, late = generate_both(model, batch, **kwargs)
    assert torch.equal(plain, late)
    torch.manual_seed(1)
    assert not torch.equal(late, model.generate(**batch, custom_generate=sample_without_host_sync, **kwargs))


def test_the_host_reads_each_flag_only_after_queueing_the_next_step(model, tokenizer, monkeypatch):
    """Step t's flag is read after step t + 1's forward was issued: the host never waits for the step it needs."""
    events: list[str] = []
    real_read, real_record = decoding._LateFlag.read, decoding._LateFlag.record
    real_forward = model.forward

    def read(self):
        events.append("read")
        return real_read(self)

    def record(self, finished):
        events.append("record")
        return real_record(self, finished)

    monkeypatch.setattr(decoding._LateFlag, "read", read)
    monkeypatch.setattr(decoding._LateFlag, "record", record)
    monkeypatch.setattr(model, "forward", lambda *a, **k: events.append("forward") or real_forward(*a, **k))
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None,
                   pad_token_id=tokenizer.pad_token_id, custom_generate=sample_without_host_sync)
    # prefill, then per step: read the previous flag, record this one, issue the next forward.
    assert events[:4] == ["forward", "read", "record", "forward"]
    for index, event in enumerate(events):
        if event == "read" and index > 1:
            recorded = events[:index].count("record")
            assert events[:index].count("forward") == recorded + 1  # the step after the flag is already issued


def test_returned_scores_fall_back_to_generates_own_loop(model, tokenizer):
    """return_dict_in_generate needs every step's scores in step: transformers' loop runs, with the same tokens."""
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id}
    returned = model.generate(**batch, return_dict_in_generate=True, output_scores=True,
                              custom_generate=sample_without_host_sync, **kwargs)
    assert torch.equal(returned.sequences, model.generate(**batch, **kwargs)) and len(returned.scores) == 6


def test_fast_decoding_takes_the_loop_for_greedy_and_sampling_only(model):
    cuda = torch.device("cuda")
    assert fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 8})["custom_generate"] is sample_without_host_sync
    assert "custom_generate" in fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 8, "do_sample": True})
    beams = GenerationConfig(num_beams=3)
    assert "custom_generate" not in fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 8}, generation_config=beams)
    assert "custom_generate" not in fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 8, "assistant_model": model})
    assert fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 8, "custom_generate": print}) == {}
    # generate hands a custom loop no streamer: streaming keeps transformers' loop (and the static cache).
    streaming = fast_decoding_kwargs(cuda, 30, {"max_new_tokens": 8, "streamer": object()})
    assert streaming["cache_implementation"] == "static" and "custom_generate" not in streaming


def test_stream_chat_keeps_streaming_on_the_fast_path(model, tokenizer, monkeypatch):
    """Pretending to be on CUDA: stream_chat still yields token by token, and ends with chat's answer."""
    on_cuda = lambda length, kwargs: fast_decoding_kwargs("cuda", length, kwargs)
    monkeypatch.setattr(model, "fast_decoding_kwargs", on_cuda)
    answer, _ = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=6)
    steps = list(model.stream_chat(tokenizer, "你好", do_sample=False, max_new_tokens=6))
    assert len(steps) == 6 and steps[-1][0] == answer


def test_invalid_score_guard_replaces_every_row_without_an_if():
    guard = InvalidScoreLogitsProcessor()
    scores = torch.randn(2, 8)
    assert torch.equal(guard(None, scores.clone()), scores)
    scores[1, 3] = float("nan")
    replaced = guard(None, scores)
    assert torch.equal(replaced.argmax(-1), torch.tensor([5, 5]))
    assert replaced[:, 5].eq(5e4).all() and replaced.abs().sum() == 2 * 5e4
