"""`thuglm serve`: a trained ChatGLM behind a small HTTP API, on this machine only unless told otherwise.

Two routes, both JSON over POST:

* `/` — the official ChatGLM-6B `api.py` protocol, so existing clients keep working:
  `{"prompt", "history", "max_length", "top_p", "temperature"}` -> `{"response", "history", "status", "time"}`;
* `/v1/chat/completions` — the OpenAI chat format (`messages`, `max_tokens`, `temperature`, `top_p`), without
  streaming: the last user message is the query, earlier user/assistant pairs the history.

The official `api.py` listens on 0.0.0.0, which puts an unauthenticated model on every network the machine is on.
Here the default host is 127.0.0.1; another host must be asked for with `--host`, and a warning says what it opens.
One model answers one request at a time (a lock), which is what a single GPU does anyway.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("thuglm.serve")

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 1 << 20


class RequestError(ValueError):
    """A request the client must fix; answered with 400 and the message."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatService:
    """What the routes do, apart from HTTP: a model, its tokenizer and a lock."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def chat(self, query: str, history: list[tuple[str, str]], **sampling) -> tuple[str, list[tuple[str, str]]]:
        with self.lock:
            return self.model.chat(self.tokenizer, query, history=history, **sampling)

    def official(self, body: dict) -> dict:
        """The official api.py's request and answer."""
        query = _text(body, "prompt")
        history = _history(body.get("history") or [])
        sampling = {"max_length": body.get("max_length") or 2048, "top_p": body.get("top_p") or 0.7,
                    "temperature": body.get("temperature") or 0.95}
        response, history = self.chat(query, history, **sampling)
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return {"response": response, "history": [list(turn) for turn in history], "status": 200, "time": now}

    def openai(self, body: dict) -> dict:
        """An OpenAI `chat.completion` object for `messages`."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("`messages` must be a non-empty list of {role, content} objects")
        turns = [(_text(message, "role"), _text(message, "content")) for message in messages if isinstance(message, dict)]
        if len(turns) != len(messages) or turns[-1][0] != "user":
            raise RequestError("`messages` must be {role, content} objects ending with a `user` message")
        dialogue = [(role, content) for role, content in turns if role in ("user", "assistant")]
        history = [(dialogue[i][1], dialogue[i + 1][1]) for i in range(0, len(dialogue) - 1, 2)
                   if dialogue[i][0] == "user" and dialogue[i + 1][0] == "assistant"]
        temperature = body.get("temperature", 0.95)
        sampling = {"max_new_tokens": body.get("max_tokens") or self.max_new_tokens, "max_length": None,
                    "top_p": body.get("top_p", 0.7), "do_sample": bool(temperature),
                    "temperature": temperature or 1.0}
        response, _ = self.chat(turns[-1][1], history, **sampling)
        return {
            "id": f"chatcmpl-{time.time_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "chatglm-6b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": response}, "finish_reason": "stop"}],
        }


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise RequestError(f"`{key}` must be a string")
    return value


def _history(value) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(part, str) for part in turn)
        for turn in value
    ):
        raise RequestError("`history` must be a list of [query, response] pairs of strings")
    return [tuple(turn) for turn in value]


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    routes = {"/": service.official, "/v1/chat/completions": service.openai}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            route = routes.get(self.path.split("?")[0])
            if route is None:
                return self._answer(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}; POST / or /v1/chat/completions"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request body over 1 MiB"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                return self._answer(HTTPStatus.OK, route(body))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._answer(HTTPStatus.BAD_REQUEST, {"error": "the body is not valid JSON"})
            except RequestError as error:
                return self._answer(HTTPStatus.BAD_REQUEST, {"error": str(error)})

        def _answer(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            logger.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(service: ChatService, host: str = DEFAULT_HOST, port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound but not yet serving (port 0 picks a free port: see `server.server_address`)."""
    if not is_loopback(host):
        logger.warning(
            "listening on %s: anyone who can reach this machine on port %d can use the model (there is no "
            "authentication). Use the default --host 127.0.0.1 unless that is what you want.", host, port,
        )
    return ThreadingHTTPServer((host, port), make_handler(service))
