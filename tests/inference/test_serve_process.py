"""`thuglm serve` as a process: SIGTERM lets an answer in flight finish (or cancels it past --drain-seconds), the
process exits cleanly, and every request logs one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir, drain_seconds: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "thuglm", "serve", str(model_dir), "--port", str(port), "--max-batch", "2",
         "--max-seq-len", "2048", "--drain-seconds", str(drain_seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            break
    process.kill()
    pytest.fail("thuglm serve did not start: " + process.communicate()[0][-3000:])


def stream_then_terminate(process, url: str, max_tokens: int) -> list[dict]:
    """Starts a streamed answer, sends SIGTERM after its first content, and reads the stream to its end."""
    body = {"messages": [{"role": "user", "content": "写一首关于月亮的诗"}], "stream": True, "max_tokens": max_tokens,
            "temperature": 0}
    events = []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                events.append({"done": True} if data == "[DONE]" else json.loads(data))
                if len(events) == 2:
                    process.send_signal(signal.SIGTERM)
    except httpx.RemoteProtocolError:  # a cancelled answer: the server closed the connection mid-stream
        events.append({"cut": True})
    return events


@pytest.mark.parametrize("drain_seconds", [60.0, 0.2])
def test_sigterm_drains_or_cancels_and_logs_each_request(base_dir, drain_seconds):
    process, url = start_server(base_dir, drain_seconds)
    try:
        events = stream_then_terminate(process, url, max_tokens=2000 if drain_seconds < 1 else 60)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn shuts down, then re-raises the signal it caught, so the exit status is SIGTERM's, as for any process
    # that SIGTERM ends. The one traceback allowed is uvicorn's report of the request it cancelled past the drain.
    assert process.returncode in (0, -signal.SIGTERM), output[-3000:]
    assert output.count("Traceback") == output.count("CancelledError: Task cancelled, timeout graceful shutdown"), output
    finishes = [e["choices"][0]["finish_reason"] for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
    if drain_seconds > 1:  # the answer in flight ran to its end, then the server exited
        assert finishes == ["length"] and events[-1] == {"done": True}
        assert "/v1/chat/completions stream=True latency=" in output and "completion_tokens=60" in output
    else:  # cut short: the stream ends without finishing and the request's line says so
        assert finishes == [] and events[-1] == {"cut": True} and "ended early" in output
    assert output.count("/v1/chat/completions stream=True") == 1
