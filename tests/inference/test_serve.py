"""`thuglm serve`: the official api.py protocol and OpenAI's chat route answer as `model.chat` does; 127.0.0.1 only."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from thuglm.cli import build_parser
from thuglm.inference.loading import load_for_inference
from thuglm.inference.serve import ChatService, is_loopback, make_server


@pytest.fixture(scope="module")
def server(output_dir):
    tokenizer, model = load_for_inference(output_dir)  # a LoRA run's output folder, as users serve it
    server = make_server(ChatService(model, tokenizer, max_new_tokens=12), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, model, tokenizer
    server.shutdown()
    server.server_close()


def post(server, path: str, body) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_listens_on_loopback_by_default(server):
    assert server[0].server_address[0] == "127.0.0.1"
    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_official_protocol_answers_as_model_chat(server):
    server, model, tokenizer = server
    history = [["你好", "你好！"]]
    status, answer = post(server, "/", {"prompt": "春天适合做什么？", "history": history, "max_length": 64,
                                       "temperature": 0.01, "top_p": 0.01})
    assert status == 200 and answer["status"] == 200 and answer["time"]
    expected, expected_history = model.chat(tokenizer, "春天适合做什么？", history=[tuple(t) for t in history],
                                            max_length=64, do_sample=False)
    assert answer["response"] == expected  # top_p 0.01 keeps only the most likely token: greedy
    assert answer["history"] == [list(turn) for turn in expected_history]


def test_openai_route_answers_as_model_chat(server):
    server, model, tokenizer = server
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "介绍一下长城。"}]
    status, answer = post(server, "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 12})
    assert status == 200 and answer["object"] == "chat.completion"
    expected, _ = model.chat(tokenizer, "介绍一下长城。", history=[("你好", "你好！")], max_length=None,
                             max_new_tokens=12, do_sample=False)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/", b"{not json", 400, "not valid JSON"),
        ("/", {"history": []}, 400, "`prompt` must be a string"),
        ("/", {"prompt": "hi", "history": [["only one"]]}, 400, "`history` must be a list"),
        ("/v1/chat/completions", {"messages": []}, 400, "non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "ending with a `user`"),
        ("/nope", {}, 404, "no route"),
    ],
)
def test_bad_requests_get_a_clear_answer(server, path, body, status, fragment):
    got_status, answer = post(server[0], path, body)
    assert got_status == status and fragment in answer["error"]
