"""Calls an ASGI app in-process and streams its response: how the engine replica runs vLLM's own
OpenAI server (its FastAPI app) without a socket, a second HTTP parse or uvicorn.

The first item carries the status, headers and the first body part together (one hop for a
non-streaming response); after that, one item per body part. The app's send() returns once the
consumer has taken the message, as a socket's backpressure would: a consumer that keeps up gets
every token at once, and a busy one makes vLLM merge the tokens that arrive meanwhile into one
event. There is no fixed batching delay.

With `forward`, the body parts after the first don't come out of the iterator: the app's own send()
hands each to `forward` (the engine's channel to the ingress, deployments.transport.stream_channel), which
saves a task switch per part; the iterator then ends when the app has sent its whole body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# (status, headers, first body part, more parts follow)
ResponseHead = tuple[int, list[tuple[str, str]], bytes, bool]

# How long a closed stream's app may take to end by itself once told its client left, before its
# task is cancelled. vLLM's non-streaming handlers run their work in a task of their own that only
# an http.disconnect stops (`with_cancellation`): cancelling the app's task at once would leave that
# task generating for nobody. With the disconnect, they end within an event-loop turn or two.
DISCONNECT_GRACE_S = 1.0


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
    app: Any, method: str, path: str, headers: list[tuple[str, str]], body: bytes, query: bytes = b"",
    forward: Callable[[bytes], Awaitable[None]] | None = None,
) -> AsyncIterator[ResponseHead | bytes]:
    """Yields a ResponseHead, then bytes (none with `forward`). Closing the iterator tells the app
    the client left (http.disconnect) and cancels it, which is how vLLM learns to abort the request."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    taken = asyncio.Event()  # set by the consumer on every message it takes
    request_sent = False
    forwarding = False  # set once the head is taken, when `forward` is given
    body_finished = False
    forward_failed: str | None = None

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal body_finished, forward_failed
        if disconnected.is_set():  # nobody reads any more: what the app still sends is dropped
            return
        if forwarding and message["type"] == "http.response.body":
            if forward_failed is not None:
                return
            # Straight to the channel, in the app's own task: its backpressure is the channel's.
            part = message.get("body", b"")
            if part:
                try:
                    await forward(part)  # type: ignore[misc]
                except Exception as exc:
                    # The ingress can't be reached: the app is told its client left, as a socket's
                    # error would tell it. Raising here instead would leave vLLM's stream generator
                    # suspended at its yield, aborted only when the garbage collector closes it.
                    forward_failed = repr(exc)
                    disconnected.set()
                    return
            body_finished = not message.get("more_body", False)
            return
        messages.put_nowait(message)
        # Backpressure, as a socket gives it: return only once the consumer has taken the message.
        # While the app waits here, vLLM merges the outputs that arrive into one pending delta, so a
        # busy replica builds and ships one event for several tokens instead of one per token. An
        # idle replica's consumer takes each message at once: no delay, no fixed batching.
        while not messages.empty() and not disconnected.is_set():
            taken.clear()
            await taken.wait()

    async def run() -> None:
        try:
            await app(_scope(method, path, query, headers), receive, send)
        except Exception as exc:  # the app failed outside its own exception handlers
            # Its description, not the exception: its traceback would hold the app's frames, and with
            # them vLLM's stream generator, whose closing is what aborts the request in the engine.
            messages.put_nowait({"type": "bridge.error", "error": repr(exc)})
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        start = await messages.get()
        if start is None or start["type"] != "http.response.start":
            error = start.get("error") if start else None
            raise RuntimeError(f"the engine's server ended without a response: {error}")
        status = start["status"]
        response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])]
        taken.set()
        first, more = await _next_body(messages, taken)
        # No await since the app was let go on: its next send() already sees this.
        forwarding = forward is not None and more
        yield (status, response_headers, first, more)
        if forwarding:
            end = await messages.get()  # None once the app returned, or the error it failed with
            if forward_failed is not None:
                raise RuntimeError(f"the engine's stream could not go on to the ingress: {forward_failed}")
            if not body_finished:
                _body_of(end)
                raise RuntimeError(f"the engine's server sent {end!r} after the head")  # not ASGI
        else:
            while more:
                part, more = await _next_body(messages, taken)
                yield part
    finally:
        disconnected.set()  # the app's receive() says http.disconnect, its send()s return at once
        taken.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            except (asyncio.CancelledError, Exception):  # TimeoutError included
                pass
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
        raise RuntimeError(f"the engine's server failed mid-response: {message['error']}")
    return message.get("body", b""), bool(message.get("more_body", False))


async def _next_body(messages: asyncio.Queue[dict[str, Any] | None], taken: asyncio.Event
                     ) -> tuple[bytes, bool]:
    message = await messages.get()
    taken.set()
    return _body_of(message)
