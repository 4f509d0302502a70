"""`thuglm serve`: a trained ChatGLM behind an OpenAI-compatible API and a chat page, for many users at once.

An ASGI app (FastAPI, run by uvicorn; streams are server-sent events through sse-starlette):

* `POST /v1/chat/completions` — OpenAI's chat format, streamed (`"stream": true`) or not, with `usage`;
  `temperature: 0` is greedy; `max_tokens`, `top_p`, `stop`, `seed`. System messages become the system text
  (`build_prompt`); earlier user/assistant pairs the history.
* `GET /v1/models` — the one model served.
* `POST /` — the official ChatGLM-6B `api.py` protocol, so its clients keep working.
* `GET /` — a chat page (`web/`): streaming answers, the conversation kept by the page, sampling settings.

Every request goes to one `ContinuousBatcher` (batching.py), which decodes all active requests together; a request
that waits for a slot beyond `max_queued` is answered 429. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`.

The official `api.py` listens on 0.0.0.0 without authentication. Here the default host is 127.0.0.1; `--api-key`
(or THUGLM_API_KEY) requires `Authorization: Bearer KEY` on the API, and another host without a key is warned about.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ThuglmError
from ..models.tokenization_chatglm import CLEANUP_REPLACEMENTS
from .batching import ContinuousBatcher, GenerationRequest, PromptTooLongError, QueueFullError, Sampling
from .chat import build_prompt, process_response

logger = logging.getLogger("thuglm.serve")

DEFAULT_HOST = "127.0.0.1"
API_KEY_ENV = "THUGLM_API_KEY"
WEB_DIR = Path(__file__).with_name("web")
# ChatGLM-6B's own chat defaults (the official web demo's), used when a request leaves them out.
DEFAULT_TEMPERATURE = 0.95
DEFAULT_TOP_P = 0.7


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeError(ThuglmError, ValueError):
    """A `thuglm serve` setting that cannot work here; the message says which and what to do."""


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP status, message, type and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# ---- request bodies --------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]  # ChatGLM-6B reads text only
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for system
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    @property
    def is_system(self) -> bool:
        return self.role in ("system", "developer")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(default=DEFAULT_TOP_P, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice: more would be as many requests


class OfficialRequest(BaseModel):
    """The official api.py body."""

    prompt: str
    history: list[tuple[str, str]] = []
    max_length: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    temperature: float | None = Field(default=None, ge=0)


# What a malformed field should look like, added to the validation message.
FIELD_SHAPES = {
    "messages": "a non-empty list of {role: system | user | assistant, content: text} objects",
    "history": "a list of [query, response] pairs of strings",
    "stop": "a string or a list of strings",
}


def conversation(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]], str | None]:
    """(query, history, system text) from OpenAI messages: the last user message is the query."""
    if messages[-1].role != "user":
        raise ApiError(400, "`messages` must end with a `user` message: it is the question to answer", param="messages")
    system = "\n".join(m.text for m in messages if m.is_system) or None
    dialogue = [m for m in messages[:-1] if not m.is_system]
    history: list[tuple[str, str]] = []
    index = 0
    while index < len(dialogue):
        if index + 1 < len(dialogue) and dialogue[index].role == "user" and dialogue[index + 1].role == "assistant":
            history.append((dialogue[index].text, dialogue[index + 1].text))
            index += 2
        else:
            raise ApiError(400, "earlier `messages` must alternate user, assistant (ChatGLM's rounds); message "
                                f"{index} of the dialogue is a `{dialogue[index].role}` out of turn", param="messages")
    return messages[-1].text, history, system


# ---- turning tokens into text -----------------------------------------------------------------------------------
# What `process_response` changes depending on text still to come: a half-width mark before a hanzi, a placeholder.
HALF_WIDTH_PUNCTUATION = ",!:;?"
TRAINING_TIME = "[[训练时间]]"


class TextStream:
    """The answer's text as tokens arrive: what is safe to show now, cut at a stop string, post-processed.

    `process_response` changes a half-width mark by its neighbours (`,` before a hanzi becomes `，`) and replaces a
    placeholder, and a half-decoded multi-byte piece shows as U+FFFD; so a trailing mark, U+FFFD, and any tail that
    could still grow into a stop string or the placeholder are held back until more text comes. The streamed deltas
    therefore join into the final text.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was found: the answer ends before it
        # decode's clean-up joins `x '` + `m` into `x'm`: a tail that may still become one of these is held back.
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.cleanup = tuple(spaced for spaced, _ in CLEANUP_REPLACEMENTS) if cleans_up else ()

    def text(self) -> str:
        text = process_response(self.tokenizer.decode(self.token_ids))
        for stop in self.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, self.stopped = text[:cut], True
        return text

    def add(self, token_ids: list[int]) -> str:
        """The new text that is final, after `token_ids`."""
        self.token_ids.extend(token_ids)
        text = self.text()
        if not self.stopped:
            text = text.rstrip("\ufffd")
            hold = 1 if text[-1:] in HALF_WIDTH_PUNCTUATION else 0
            for pending in (*self.stop, TRAINING_TIME, *self.cleanup):
                hold = max(hold, *(k for k in range(1, len(pending)) if text.endswith(pending[:k])), 0)
            text = text[: len(text) - hold]
        return self._delta(text)

    def finish(self) -> str:
        return self._delta(self.text())

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):  # a change before what was shown; show nothing more until consistent
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ChatService:
    """Prompts to token streams: a tokenizer and a continuous batcher around whatever model `load_for_inference` gave."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 512, slots: int = 16, max_seq_len: int | None = None,
                 max_queued: int = 64, model_name: str = "chatglm-6b", static_decode: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.model_name = model_name
        self.created = int(time.time())
        self.open_generations: set[Generation] = set()  # submitted and not yet closed (logged)
        end_ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        self.batcher = ContinuousBatcher(model, end_ids if end_ids is not None else tokenizer.eos_token_id,
                                         slots=slots, capacity=max_seq_len, max_queued=max_queued,
                                         static_decode=static_decode)

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def generate(self, prompt: str, sampling: Sampling, stop: list[str]) -> Generation:
        """Submit `prompt` to the batcher (ApiError 429 when the waiting room is full, 400 when it does not fit)."""
        return Generation(self, prompt, sampling, stop)


class Generation:
    """One answer being generated: submitted on creation, its text read with `stream`, ended with `cancel`.

    `cancel` is synchronous, so that it also runs where an await would not: in the `finally` of a task that the
    server cancels (a client gone, a shutdown past its drain time).
    """

    def __init__(self, service: ChatService, prompt: str, sampling: Sampling, stop: list[str]):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()  # unbounded: the scheduler never waits on a slow reader

        def deliver(token_ids: list[int], finish_reason: str | None) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, (token_ids, finish_reason))

        tokenizer = service.tokenizer
        prompt_ids = tokenizer([prompt])["input_ids"][0]
        gmask = tokenizer.gmask_token_id
        mask_position = prompt_ids.index(gmask) if gmask in prompt_ids else len(prompt_ids) - 2
        self.request = GenerationRequest(prompt_ids, mask_position, sampling, deliver)
        self.text = TextStream(tokenizer, stop)
        self.prompt_tokens = len(prompt_ids)
        self.generated = 0
        self.started = time.perf_counter()
        self.first_text_at: float | None = None
        self.completion: Completion | None = None
        self._logged = False
        try:
            service.batcher.submit(self.request)
        except QueueFullError as error:
            raise ApiError(429, str(error), type="rate_limit_error", code="rate_limit_exceeded") from None
        except PromptTooLongError as error:
            raise ApiError(400, str(error), code="context_length_exceeded", param="messages") from None
        self.service = service
        service.open_generations.add(self)

    async def stream(self, client: Request | None = None) -> AsyncIterator[str]:
        """The answer's new text as it grows; `self.completion` is set once it ends.

        Without a stream to write to, a gone client is noticed by asking `client` once a second.
        """
        while True:
            try:
                token_ids, finish_reason = await asyncio.wait_for(self.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if client is not None and await client.is_disconnected():
                    self.cancel()
                    return
                continue
            self.generated += len(token_ids)
            delta = self.text.add(token_ids)
            if self.text.stopped:
                finish_reason = "stop"
            if finish_reason is not None:
                self.cancel()  # a stop string ends it here: the scheduler frees the slot at its next step
                if finish_reason.startswith("error"):
                    raise ApiError(500, f"generation failed: {finish_reason[len('error: '):]}", type="server_error")
                if finish_reason == "cancelled":
                    raise ApiError(503, "the server is shutting down; retry on another server or later",
                                   type="server_error", code="server_shutting_down")
                delta += self.text.finish()
                self.completion = Completion(self.text.sent, finish_reason, self.prompt_tokens, self.generated)
            if delta:
                self.first_text_at = self.first_text_at or time.perf_counter()
                yield delta
            if self.completion is not None:
                return

    async def complete(self, client: Request, route: str) -> Completion:
        """The whole answer, for a request that is not streamed; the request's line is logged however it ends."""
        try:
            async for _ in self.stream(client):
                pass
        finally:
            self.close(route, streamed=False)
        if self.completion is None:  # the client left; nobody reads this answer
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
        return self.completion

    def cancel(self) -> None:
        self.request.cancel()

    def close(self, route: str, streamed: bool) -> None:
        """Free the slot (if still held) and log the request's one line."""
        self.cancel()
        if not self._logged:
            self._logged = True
            log_request(route, self.started, self.first_text_at, self.completion, streamed)
        self.service.open_generations.discard(self)


class EventStreamResponse(EventSourceResponse):
    """sse-starlette's response, with a callback run however the response ends: sent, client gone, or cancelled by
    the server's shutdown (a generator's own `finally` would wait for garbage collection in that case)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sampling_of(body: ChatCompletionRequest, default_max_new_tokens: int) -> Sampling:
    return Sampling(max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_new_tokens,
                    temperature=body.temperature, top_p=body.top_p, seed=body.seed)


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with the key the server was "
                            f"started with (--api-key or {API_KEY_ENV})", code="invalid_api_key")


def create_app(service: ChatService, api_key: str | None = None) -> FastAPI:
    """The ASGI app. Its lifespan starts the batcher's thread and, on shutdown, cancels whatever is left."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            # uvicorn gets here once the drain time is over, right after cancelling the requests still running, and
            # ends the process soon after: stop the batcher off the event loop, so that the cancelled requests run
            # their cleanup meanwhile, and give them a moment to log their line.
            await asyncio.to_thread(service.stop)
            for _ in range(100):
                if not service.open_generations:
                    break
                await asyncio.sleep(0.02)

    app = FastAPI(title="thuglm serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        else:
            message = f"`{where}`: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid body")
            field = where.split(".")[0]
            if field in FIELD_SHAPES:
                message += f" ({field} is {FIELD_SHAPES[field]})"
        return ApiError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = ("no route " + request.url.path + ": the API is POST /v1/chat/completions, GET /v1/models and "
                   "POST / (the official api.py protocol); GET / is the chat page") if error.status_code == 404 \
            else str(error.detail)
        return ApiError(error.status_code, message, code="not_found" if error.status_code == 404 else None).response()

    def authorized(request: Request) -> None:
        check_api_key(request, api_key)

    @app.get("/v1/models")
    async def models(request: Request):
        authorized(request)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "thuglm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        authorized(request)
        query, history, system = conversation(body.messages)
        prompt = build_prompt(query, history, system=system)
        sampling = sampling_of(body, service.max_new_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body.model or service.model_name
        generation = service.generate(prompt, sampling, stop)  # a full queue or a long prompt: an HTTP error

        if not body.stream:
            completion = await generation.complete(request, "/v1/chat/completions")
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "finish_reason": completion.finish_reason}],
                "usage": completion.usage(),
            }

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            return json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": choices, **extra}, ensure_ascii=False)

        async def events():
            try:
                yield {"data": chunk({"role": "assistant", "content": ""})}
                async for delta in generation.stream():
                    yield {"data": chunk({"content": delta})}
                completion = generation.completion
                yield {"data": chunk({}, completion.finish_reason)}
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield {"data": json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                               "created": created, "model": model, "choices": [],
                                               "usage": completion.usage()})}
                yield {"data": "[DONE]"}
            except ApiError as error:  # after the stream began: OpenAI's error shape as an event
                yield {"data": json.dumps({"error": {"message": error.message, "type": error.type,
                                                     "param": error.param, "code": error.code}})}

        return EventStreamResponse(events(), on_close=lambda: generation.close("/v1/chat/completions", streamed=True),
                                   ping=15)

    @app.post("/")
    async def official(body: OfficialRequest, request: Request):
        """The official api.py: `max_length` counts prompt and answer together, as there."""
        authorized(request)
        history = [tuple(turn) for turn in body.history]
        prompt = build_prompt(body.prompt, history)
        prompt_tokens = len(service.tokenizer([prompt])["input_ids"][0])
        max_length = body.max_length or 2048
        if max_length <= prompt_tokens:
            raise ApiError(400, f"`max_length` {max_length} leaves no room for an answer after the {prompt_tokens}-token "
                                "prompt: it counts prompt and answer together", param="max_length")
        temperature = body.temperature if body.temperature is not None else DEFAULT_TEMPERATURE
        sampling = Sampling(max_new_tokens=max_length - prompt_tokens, temperature=temperature,
                            top_p=body.top_p or DEFAULT_TOP_P)
        completion = await service.generate(prompt, sampling, []).complete(request, "/")
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        turns = [list(turn) for turn in history] + [[body.prompt, completion.text]]
        return {"response": completion.text, "history": turns, "status": 200, "time": now}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def log_request(route: str, started: float, first_at: float | None, completion: Completion | None,
                streamed: bool) -> None:
    """One line a request: latency, time to first token, tokens and how it ended."""
    latency = time.perf_counter() - started
    ttft = f"{first_at - started:.3f}s" if first_at else "-"
    if completion is None:
        logger.info("%s stream=%s ended early (client gone, cancelled at shutdown, or failed) after %.3fs", route, streamed, latency)
        return
    logger.info("%s stream=%s latency=%.3fs ttft=%s prompt_tokens=%d completion_tokens=%d tokens/s=%.1f finish=%s",
                route, streamed, latency, ttft, completion.prompt_tokens, completion.completion_tokens,
                completion.completion_tokens / latency if latency else 0.0, completion.finish_reason)


def resolve_api_key(api_key: str | None, environ=None) -> str | None:
    """--api-key, else THUGLM_API_KEY, else None (no authentication)."""
    import os

    environ = os.environ if environ is None else environ
    return api_key or environ.get(API_KEY_ENV) or None


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this machine can use the model. Pass "
            "--api-key KEY (or set %s), or keep the default --host 127.0.0.1.", host, API_KEY_ENV,
        )


def make_server(service: ChatService, host: str = DEFAULT_HOST, port: int = 8000, api_key: str | None = None,
                drain_seconds: float = 30.0):
    """A uvicorn server for the app. On SIGTERM or Ctrl-C uvicorn stops accepting, lets in-flight requests finish for
    up to `drain_seconds`, then cancels the rest (their slots are freed and the batcher stops)."""
    import uvicorn

    warn_if_exposed(host, api_key)
    config = uvicorn.Config(create_app(service, api_key), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=drain_seconds, access_log=False)
    return uvicorn.Server(config)
