"""`thuglm serve` through the OpenAI Python SDK and plain HTTP: answers as `model.chat` gives them, streamed equal to
not streamed, usage, models, errors in OpenAI's shape, the official api.py protocol, authentication, 127.0.0.1."""

from __future__ import annotations

import httpx
import openai
import pytest

from thuglm.cli import build_parser
from thuglm.inference.chat import build_prompt
from thuglm.inference.loading import load_for_inference
from thuglm.inference.serve import ChatService, TextStream, is_loopback, resolve_api_key, warn_if_exposed

from .serve_helpers import running_server

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(output_dir):
    tokenizer, model = load_for_inference(output_dir)  # a LoRA run's output folder, as users serve it
    service = ChatService(model, tokenizer, max_new_tokens=MAX_TOKENS, slots=4, max_seq_len=256,
                          model_name="tiny-lora")
    with running_server(service) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_chat(model, tokenizer, query, history=(), max_new_tokens=MAX_TOKENS):
    answer, _ = model.chat(tokenizer, query, history=list(history), max_length=None, max_new_tokens=max_new_tokens,
                           do_sample=False)
    return answer


MESSAGES = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "介绍一下长城。"}]


def test_listens_on_loopback_by_default_and_reads_the_key_from_the_environment():
    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert resolve_api_key(None, {"THUGLM_API_KEY": "k1"}) == "k1"
    assert resolve_api_key("k2", {"THUGLM_API_KEY": "k1"}) == "k2"
    assert resolve_api_key(None, {}) is None


def test_cuda_graphs_are_refused_without_a_gpu(tiny_dir, capsys):
    from thuglm.cli import main

    assert main(["serve", str(tiny_dir), "--cuda-graphs"]) == 2
    assert "--cuda-graphs captures the decode step on a CUDA device" in capsys.readouterr().err


def test_another_host_without_a_key_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="thuglm.serve"):
        warn_if_exposed("127.0.0.1", None)
        warn_if_exposed("0.0.0.0", "key")
        assert not caplog.records
        warn_if_exposed("0.0.0.0", None)
    assert len(caplog.records) == 1 and "--api-key" in caplog.records[0].getMessage()


def test_openai_sdk_answer_is_model_chat_with_usage(served, client):
    _, model, tokenizer = served
    completion = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, temperature=0,
                                                max_tokens=MAX_TOKENS)
    expected = greedy_chat(model, tokenizer, "介绍一下长城。", [("你好", "你好！")])
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(tokenizer([build_prompt("介绍一下长城。", [("你好", "你好！")])])["input_ids"][0])
    assert completion.usage.prompt_tokens == prompt_tokens
    assert 0 < completion.usage.completion_tokens <= MAX_TOKENS
    assert completion.usage.total_tokens == prompt_tokens + completion.usage.completion_tokens


def test_streamed_answer_equals_the_unstreamed_one_under_greedy(client):
    plain = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    chunks = list(client.chat.completions.create(model="tiny-lora", messages=MESSAGES, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the answer came in one piece: it was not streamed"
    assert "".join(deltas) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_system_text_goes_before_the_first_round(served, client):
    tokenizer = served[2]
    messages = [{"role": "system", "content": "你是一个诗人。"}, *MESSAGES]
    completion = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    prompt = build_prompt("介绍一下长城。", [("你好", "你好！")], system="你是一个诗人。")
    assert prompt.startswith("你是一个诗人。\n[Round 0]")
    assert completion.usage.prompt_tokens == len(tokenizer([prompt])["input_ids"][0])
    # The same conversation in content parts, with OpenAI's newer "developer" role for the system text.
    parts = [{"role": "developer", "content": [{"type": "text", "text": "你是一个诗人。"}]},
             *({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES)]
    same = client.chat.completions.create(model="m", messages=parts, temperature=0, max_tokens=MAX_TOKENS)
    assert same.usage == completion.usage and same.choices[0].message.content == completion.choices[0].message.content


def test_stop_string_cuts_the_answer_before_it(served, client):
    full = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    text = full.choices[0].message.content
    stop = text[2:4]
    assert len(stop) == 2, f"the greedy answer {text!r} is too short to test a stop string"
    cut = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.find(stop)]


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.chat.completions.create(model="m", messages=MESSAGES, temperature=1.0, top_p=1.0,
                                              max_tokens=MAX_TOKENS, seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1, "four seeds gave one answer: sampling ignores the seed"


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-lora"]
    assert models.data[0].object == "model"


def test_official_protocol_answers_as_model_chat(served):
    url, model, tokenizer = served
    history = [["你好", "你好！"]]
    response = httpx.post(url + "/", json={"prompt": "春天适合做什么？", "history": history, "max_length": 64,
                                          "temperature": 0.01, "top_p": 0.01}, timeout=60)
    answer = response.json()
    assert response.status_code == 200 and answer["status"] == 200 and answer["time"]
    expected, expected_history = model.chat(tokenizer, "春天适合做什么？", history=[tuple(t) for t in history],
                                            max_length=64, do_sample=False)
    assert answer["response"] == expected  # top_p 0.01 keeps only the most likely token: greedy
    assert answer["history"] == [list(turn) for turn in expected_history]


def test_sdk_errors_have_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "x"}])
    assert "end with a `user` message" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[])
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=0)
    assert "max_tokens" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "长" * 400}])
    assert caught.value.body["code"] == "context_length_exceeded" and "--max-seq-len" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/", b"{not json", 400, "not valid JSON"),
        ("/", {"history": []}, 400, "`prompt`"),
        ("/", {"prompt": "hi", "history": [["only one"]]}, 400, "history is a list of [query, response] pairs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "`n`"),
        ("/v1/nope", {}, 404, "no route /v1/nope"),
    ],
)
def test_bad_requests_get_a_clear_answer(served, path, body, status, fragment):
    content = body if isinstance(body, bytes) else None
    response = httpx.post(served[0] + path, content=content, json=None if content else body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    error = response.json()["error"]
    assert response.status_code == status and fragment in error["message"]
    assert {"message", "type", "param", "code"} <= error.keys()


def test_api_key_guards_the_api_but_not_the_page(output_dir):
    tokenizer, model = load_for_inference(output_dir)
    service = ChatService(model, tokenizer, max_new_tokens=4, slots=1, max_seq_len=128)
    with running_server(service, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert "--api-key" in caught.value.body["message"] and caught.value.body["code"] == "invalid_api_key"
        assert httpx.post(url + "/", json={"prompt": "hi"}).status_code == 401
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="m", messages=MESSAGES, temperature=0).choices[0].message.content
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<title>ChatGLM" in page.text
        assert httpx.get(url + "/static/chat.js").status_code == 200


def test_a_full_queue_answers_429(output_dir):
    tokenizer, model = load_for_inference(output_dir)
    service = ChatService(model, tokenizer, max_new_tokens=4, slots=1, max_seq_len=128, max_queued=0)
    with running_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=MESSAGES)
        assert "--max-queued" in caught.value.body["message"]


def test_streamed_text_is_final_text(tokenizer):
    """Deltas never show text that post-processing changes later (`,` before a hanzi becomes `，`)."""
    stream = TextStream(tokenizer, stop=[])
    ids = tokenizer.encode("好,天气 hello,世界!", add_special_tokens=False)
    pieces = [stream.add([token]) for token in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text() == "好，天气 hello，世界！"


@pytest.mark.parametrize("text", ["I 'm here , he 's ok . right ?", "do n't stop ' em !"])
def test_streamed_text_is_final_text_after_the_clean_up_of_spaces(tokenizer, text):
    """decode joins `I '` + `m` into `I'm` (the official clean-up): the stream holds such a tail back until it is final."""
    stream = TextStream(tokenizer, stop=[])
    pieces = [stream.add([token]) for token in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text() == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
