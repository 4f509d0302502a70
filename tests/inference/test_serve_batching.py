"""Many users at once: concurrent requests decode together and each gets what it gets alone (greedy); a reader that
does not read stalls no one; a closed connection frees its slot; the waiting room is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from thuglm.inference.batching import (
    CacheTooLargeError,
    ContinuousBatcher,
    GenerationRequest,
    QueueFullError,
    Sampling,
    check_cache_fits,
)
from thuglm.inference.loading import load_for_inference
from thuglm.inference.serve import ChatService

from .serve_helpers import running_server, wait_until

QUESTIONS = ["你好", "介绍一下长城。", "春天适合做什么？请详细说说。", "hello", "今天天气怎么样", "写一首关于月亮的诗"]


@pytest.fixture(scope="module")
def served(output_dir):
    tokenizer, model = load_for_inference(output_dir)
    # Fewer slots than questions: some requests wait and join the batch while others are mid-answer.
    service = ChatService(model, tokenizer, max_new_tokens=16, slots=4, max_seq_len=256)
    with running_server(service) as url:
        yield url, service


def ask(url: str, question: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=max_tokens)
    return completion.choices[0].message.content


def test_concurrent_requests_equal_each_one_alone(served):
    url = served[0]
    # Different lengths of answer, so rows finish and free slots at different steps while others decode.
    jobs = [(question, 6 + 3 * i) for i, question in enumerate(QUESTIONS)]
    alone = [ask(url, question, max_tokens) for question, max_tokens in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(url, *job), jobs))
    assert together == alone
    assert len(set(alone)) > 1, "every question got one answer: the test could not tell rows apart"


def test_fixed_shape_decode_step_gives_the_same_answers(served, output_dir):
    """The step a CUDA graph captures (every slot a row, the whole cache as the span), run eagerly on the CPU."""
    url, _ = served
    jobs = [(question, 6 + 3 * i) for i, question in enumerate(QUESTIONS)]
    alone = [ask(url, question, max_tokens) for question, max_tokens in jobs]
    tokenizer, model = load_for_inference(output_dir)
    service = ChatService(model, tokenizer, max_new_tokens=16, slots=4, max_seq_len=256, static_decode=True)
    with running_server(service) as static_url, ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(static_url, *job), jobs))
    assert together == alone


def test_an_unread_stream_stalls_no_one_and_a_closed_one_frees_its_slot(served):
    url, service = served
    body = {"messages": [{"role": "user", "content": "写一首关于月亮的诗"}], "stream": True, "max_tokens": 200,
            "temperature": 0}
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as slow:
        assert slow.status_code == 200
        next(slow.iter_lines())  # read one line, then nothing while another request runs to its end
        assert ask(url, "你好", 8) == ask(url, "你好", 8)
    # The connection is closed mid-answer: the request is cancelled and its slot freed well before 200 tokens.
    assert wait_until(lambda: service.batcher.active == 0 and not service.batcher.waiting, timeout=30)


def test_waiting_requests_are_bounded(tiny_dir):
    tokenizer, model = load_for_inference(tiny_dir)
    batcher = ContinuousBatcher(model, tokenizer.eos_token_id, slots=1, capacity=64, max_queued=2)  # not started
    prompt = tokenizer(["你好"])["input_ids"][0]

    def request():
        return GenerationRequest(prompt, prompt.index(tokenizer.gmask_token_id), Sampling(4), lambda ids, end: None)

    batcher.submit(request())
    batcher.submit(request())
    with pytest.raises(QueueFullError, match="--max-queued"):
        batcher.submit(request())


def test_stop_cancels_what_is_left(tiny_dir):
    tokenizer, model = load_for_inference(tiny_dir)
    batcher = ContinuousBatcher(model, tokenizer.eos_token_id, slots=1, capacity=64)
    prompt = tokenizer(["你好"])["input_ids"][0]
    ends: list[str] = []
    done = threading.Event()

    def deliver(ids, end):
        if end:
            ends.append(end)
            done.set()

    batcher.submit(GenerationRequest(prompt, prompt.index(tokenizer.gmask_token_id), Sampling(4), deliver))
    batcher.stop()  # never started: the waiting request is told it was cancelled
    assert done.is_set() and ends == ["cancelled"]


def test_a_kv_cache_larger_than_the_free_memory_is_refused_with_settings_that_fit():
    """ChatGLM-6B in bf16 keeps 448 KiB of keys and values a token: 16 slots of a 16,384-token context (a model
    trained with rope_scaling) need 112 GiB."""
    bytes_a_token = 2 * 28 * 4096 * 2
    check_cache_fits(16, 2048, bytes_a_token, 20 * 2**30)  # 14 GiB: fits
    with pytest.raises(CacheTooLargeError) as error:
        check_cache_fits(16, 16384, bytes_a_token, 50 * 2**30)
    assert str(error.value) == ("16 slots of 16,384 tokens need 112.0 GiB of KV cache, and this GPU has 50.0 GiB free "
                                "after the model: pass --max-batch 7 or --max-seq-len 7168 (tokens a slot)")
    with pytest.raises(CacheTooLargeError, match="pass --max-seq-len 256 .tokens a slot.$"):
        check_cache_fits(16, 16384, bytes_a_token, 2 * 2**30)  # not even one long slot
    with pytest.raises(CacheTooLargeError, match="free after the model: use a GPU with more memory$"):
        check_cache_fits(16, 16384, bytes_a_token, 2**20)
