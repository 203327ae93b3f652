"""Calls an ASGI app in-process and streams its response: how the engine replica runs vLLM's own
OpenAI server (its FastAPI app) without a socket, a second HTTP parse or uvicorn.

The first item carries the status, headers and the first body part together (one hop for a
non-streaming response); after that, one item per body part. The app's send() returns once the
consumer has taken the message, as a socket's backpressure would: a consumer that keeps up gets
every token at once, and a busy one makes vLLM merge the tokens that arrive meanwhile into one
event. There is no fixed batching delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

# (status, headers, first body part, more parts follow)
ResponseHead = tuple[int, list[tuple[str, str]], bytes, bool]


def _scope(method: str, path: str, query: bytes, headers: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }


async def stream_asgi(
    app: Any, method: str, path: str, headers: list[tuple[str, str]], body: bytes, query: bytes = b""
) -> AsyncIterator[ResponseHead | bytes]:
    """Yields a ResponseHead, then bytes. Closing the iterator tells the app the client left
    (http.disconnect) and cancels it, which is how vLLM learns to abort the request."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    taken = asyncio.Event()  # set by the consumer on every message it takes
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.put_nowait(message)
        # Backpressure, as a socket gives it: return only once the consumer has taken the message.
        # While the app waits here, vLLM merges the outputs that arrive into one pending delta, so a
        # busy replica builds and ships one event for several tokens instead of one per token. An
        # idle replica's consumer takes each message at once: no delay, no fixed batching.
        while not messages.empty():
            taken.clear()
            await taken.wait()

    async def run() -> None:
        try:
            await app(_scope(method, path, query, headers), receive, send)
        except Exception as exc:  # the app failed outside its own exception handlers
            messages.put_nowait({"type": "bridge.error", "error": exc})
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        start = await messages.get()
        if start is None or start["type"] != "http.response.start":
            error = start.get("error") if start else None
            raise RuntimeError(f"the engine's server ended without a response: {error!r}")
        status = start["status"]
        response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])]
        taken.set()
        first, more = await _next_body(messages, taken)
        yield (status, response_headers, first, more)
        while more:
            part, more = await _next_body(messages, taken)
            yield part
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


def _body_of(message: dict[str, Any] | None) -> tuple[bytes, bool]:
    if message is None:  # the app returned, or was cancelled, before finishing its body
        raise RuntimeError("the engine's server stopped before finishing its response")
    if message["type"] == "bridge.error":
        raise RuntimeError(f"the engine's server failed mid-response: {message['error']!r}")
    return message.get("body", b""), bool(message.get("more_body", False))


async def _next_body(messages: asyncio.Queue[dict[str, Any] | None], taken: asyncio.Event
                     ) -> tuple[bytes, bool]:
    message = await messages.get()
    taken.set()
    return _body_of(message)
