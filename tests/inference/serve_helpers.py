"""A real `thuglm serve` app on a free local port, in a thread, for the serve tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from thuglm.inference.serve import ChatService, create_app


@contextlib.contextmanager
def running_server(service: ChatService, api_key: str | None = None):
    """Yields the base URL (http://127.0.0.1:PORT) while uvicorn serves the app; shuts it down after."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
