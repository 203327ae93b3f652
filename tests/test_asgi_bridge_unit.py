"""stream_asgi against tiny FastAPI / raw ASGI apps: the head item, streaming, backpressure, client
disconnect and an app that fails before responding. No vLLM."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.transport.asgi_bridge import stream_asgi


async def collect(app: Any, method: str = "GET", path: str = "/", body: bytes = b"",
                  headers: list[tuple[str, str]] | None = None, query: bytes = b"") -> list[Any]:
    return [item async for item in stream_asgi(app, method, path, headers or [], body, query)]


def make_app(state: dict[str, Any]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        payload = await request.json()
        return JSONResponse(
            {"got": payload, "query": request.url.query, "auth": request.headers.get("authorization")},
            status_code=201,
            headers={"X-Extra": "yes"},
        )

    @app.get("/slow-stream")
    async def slow_stream() -> StreamingResponse:
        async def chunks():
            for i in range(4):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/burst")
    async def burst() -> StreamingResponse:
        async def chunks():
            for i in range(5):
                yield f"part{i};".encode()  # no await between chunks: they queue up at once

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/endless")
    async def endless() -> StreamingResponse:
        async def chunks():
            try:
                i = 0
                while True:
                    yield f"tick{i}\n".encode()
                    i += 1
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise
            finally:
                state["closed"] = True

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


def test_json_response_is_one_head_item():
    async def main() -> None:
        app = make_app({})
        items = await collect(app, "POST", "/echo", json.dumps({"a": [1, "é"]}).encode(),
                              headers=[("Content-Type", "application/json"), ("Authorization", "Bearer k")],
                              query=b"x=1")
        assert len(items) == 1
        status, headers, body, more = items[0]
        assert status == 201
        assert more is False
        names = {k.lower(): v for k, v in headers}
        assert names["content-type"] == "application/json"
        assert names["x-extra"] == "yes"
        assert int(names["content-length"]) == len(body)
        assert json.loads(body) == {"got": {"a": [1, "é"]}, "query": "x=1", "auth": "Bearer k"}

    asyncio.run(main())


def test_not_found_comes_back_as_a_response():
    async def main() -> None:
        items = await collect(make_app({}), "GET", "/nowhere")
        assert len(items) == 1
        status, _, body, more = items[0]
        assert (status, more) == (404, False)
        assert json.loads(body) == {"detail": "Not Found"}

    asyncio.run(main())


def test_streaming_response_gives_a_head_then_bytes():
    async def main() -> None:
        items = await collect(make_app({}), "GET", "/slow-stream")
        status, headers, first, more = items[0]
        assert status == 200
        assert more is True
        assert first == b"data: 0\n\n"
        assert dict((k.lower(), v) for k, v in headers)["content-type"].startswith("text/event-stream")
        rest = items[1:]
        assert rest and all(isinstance(item, bytes) for item in rest)
        # The app pauses between chunks, so they are not all coalesced into one item.
        assert len([item for item in rest if item]) >= 2
        assert first + b"".join(rest) == b"".join(f"data: {i}\n\n".encode() for i in range(4))

    asyncio.run(main())


def test_send_returns_only_once_the_consumer_took_the_message():
    """Backpressure, as a socket gives it: the app cannot run ahead of the consumer."""

    async def main() -> None:
        returned: list[int] = []

        async def app(scope: dict, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(3):
                await send({"type": "http.response.body", "body": f"{i}".encode(), "more_body": True})
                returned.append(i)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        stream = stream_asgi(app, "GET", "/", [], b"")
        assert await anext(stream) == (200, [], b"0", True)
        for _ in range(5):
            await asyncio.sleep(0)
        assert returned == [0]  # part 1 waits in the queue; its send has not returned
        assert await anext(stream) == b"1"
        assert await anext(stream) == b"2"
        assert await anext(stream) == b""
        await stream.aclose()
        assert returned == [0, 1, 2]

    asyncio.run(main())


def token_app(tokens: int, interval_s: float, sends: list[bytes]) -> Any:
    """Like vLLM's serving code: tokens arrive on their own clock into a pending buffer (vLLM's
    RequestOutputCollector merges deltas the same way), and each send carries all that is pending."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        pending: list[bytes] = []
        arrived = asyncio.Event()

        async def engine() -> None:
            for i in range(tokens):
                pending.append(f"t{i};".encode())
                arrived.set()
                await asyncio.sleep(interval_s)

        producer = asyncio.create_task(engine())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sent = 0
        while sent < tokens:
            await arrived.wait()
            arrived.clear()
            part, sent = b"".join(pending[sent:]), len(pending)
            sends.append(part)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await producer

    return app


async def read_all(app: Any, pause_s: float) -> list[bytes]:
    parts = []
    async for item in stream_asgi(app, "GET", "/", [], b""):
        parts.append(item[2] if isinstance(item, tuple) else item)
        await asyncio.sleep(pause_s)
    return parts


def test_a_slow_consumer_gets_several_tokens_per_message_and_a_fast_one_each_token():
    async def main() -> None:
        expected = b"".join(f"t{i};".encode() for i in range(60))
        fast_sends: list[bytes] = []
        fast = await read_all(token_app(60, 0.002, fast_sends), pause_s=0)
        slow_sends: list[bytes] = []
        slow = await read_all(token_app(60, 0.002, slow_sends), pause_s=0.03)
        assert b"".join(fast) == b"".join(slow) == expected
        # The fast consumer takes each token as it comes; the slow one makes the app wait, and the
        # tokens arriving meanwhile go out together: fewer events built, fewer messages shipped.
        assert len(fast_sends) > 40
        assert len(slow_sends) < 20
        assert len(slow) == len(slow_sends) + 1  # one item per send (plus the final empty part)

    asyncio.run(main())


def test_closing_early_disconnects_and_cancels_the_app():
    async def main() -> None:
        state: dict[str, Any] = {}
        stream = stream_asgi(make_app(state), "GET", "/endless", [], b"")
        status, _, first, more = await anext(stream)
        assert (status, more) == (200, True)
        assert first == b"tick0\n"
        assert (await anext(stream)).startswith(b"tick")
        await stream.aclose()
        await asyncio.sleep(0)
        assert state.get("closed") is True
        assert state.get("cancelled") is True

    asyncio.run(main())


def test_closing_early_lets_the_app_see_the_disconnect():
    """A raw app waiting on receive() after its first chunk: closing the bridge either delivers
    http.disconnect or cancels it; either way the app is told and its task ends."""

    async def main() -> None:
        seen: dict[str, Any] = {}
        finished = asyncio.Event()

        async def app(scope: dict, receive: Any, send: Any) -> None:
            try:
                assert (await receive())["type"] == "http.request"
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"hello", "more_body": True})
                seen["message"] = (await receive())["type"]
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise
            finally:
                finished.set()

        stream = stream_asgi(app, "POST", "/", [], b"{}")
        assert await anext(stream) == (200, [], b"hello", True)
        await stream.aclose()
        await asyncio.wait_for(finished.wait(), timeout=1)
        assert seen.get("message") == "http.disconnect" or seen.get("cancelled") is True

    asyncio.run(main())


def test_a_call_cancelled_before_the_head_stops_work_that_only_a_disconnect_stops():
    """vLLM's non-streaming handlers (`with_cancellation`, vllm/entrypoints/serve/utils/api_utils.py:
    its pattern is copied below) run their work in a task of their own and cancel it only when
    receive() says http.disconnect: cancelling the app's task alone would leave the work going (the
    engine generating for a client who left). The bridge tells the app first, then cancels what is
    left. tests/test_faults_tiny.py proves it with vLLM itself."""
    work: dict[str, Any] = {}
    app = FastAPI()

    async def listen_for_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def the_work() -> dict:
        work["started"] = True
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            work["cancelled"] = True
            raise
        return {}

    @app.post("/work")
    async def with_cancellation(raw_request: Request) -> Any:
        handler_task = asyncio.create_task(the_work())
        cancellation_task = asyncio.create_task(listen_for_disconnect(raw_request))
        done, pending = await asyncio.wait([handler_task, cancellation_task], return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return handler_task.result() if handler_task in done else None

    async def main() -> None:
        consumer = asyncio.create_task(anext(stream_asgi(app, "POST", "/work", [], b"{}")))
        while not work.get("started"):
            await asyncio.sleep(0.01)
        consumer.cancel()  # Serve cancels the engine's call: the router's client left
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.sleep(0.05)
        assert work.get("cancelled") is True

    asyncio.run(main())


def test_an_app_raising_before_responding_raises_runtime_error():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        raise ValueError("engine exploded")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="engine exploded"):
            await collect(app)

    asyncio.run(main())


def test_an_app_returning_without_responding_raises_runtime_error():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        return None

    async def main() -> None:
        with pytest.raises(RuntimeError, match="without a response"):
            await collect(app)

    asyncio.run(main())


def test_an_app_failing_mid_response_raises_runtime_error():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        await asyncio.sleep(0)
        raise ValueError("mid-stream failure")

    async def main() -> None:
        stream = stream_asgi(app, "GET", "/", [], b"")
        assert await anext(stream) == (200, [], b"partial", True)
        with pytest.raises(RuntimeError, match="mid-stream failure"):
            await anext(stream)
        await stream.aclose()

    asyncio.run(main())


def test_an_app_returning_mid_body_fails_the_stream():
    """As uvicorn treats it: a response whose body never finished is an error, not a short answer."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"b", "more_body": True})

    async def main() -> None:
        stream = stream_asgi(app, "GET", "/", [], b"")
        assert await anext(stream) == (200, [], b"a", True)
        assert await anext(stream) == b"b"
        with pytest.raises(RuntimeError, match="before finishing its response"):
            await anext(stream)
        await stream.aclose()

    asyncio.run(main())


class Forwarded:
    """A `forward` target that records the parts (and fails on the `fail_at`-th one, if given)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.parts: list[bytes] = []
        self.fail_at = fail_at

    async def __call__(self, part: bytes) -> None:
        if self.fail_at is not None and len(self.parts) + 1 == self.fail_at:
            raise ConnectionError("the channel closed")
        self.parts.append(part)


def test_with_forward_the_parts_after_the_head_go_to_it_and_the_iterator_ends_with_the_body():
    async def main() -> None:
        forwarded = Forwarded()
        items = [item async for item in stream_asgi(make_app({}), "GET", "/slow-stream", [], b"",
                                                    forward=forwarded)]
        assert len(items) == 1
        _, _, first, more = items[0]
        assert (first, more) == (b"data: 0\n\n", True)
        assert forwarded.parts == [f"data: {i}\n\n".encode() for i in range(1, 4)]  # no empty closing part

    asyncio.run(main())


def test_with_forward_a_one_part_response_is_only_its_head():
    async def main() -> None:
        forwarded = Forwarded()
        items = [item async for item in stream_asgi(make_app({}), "POST", "/echo", [], b"{}", forward=forwarded)]
        assert len(items) == 1 and items[0][3] is False
        assert forwarded.parts == []

    asyncio.run(main())


def test_with_forward_an_app_failing_or_returning_mid_body_fails_the_iterator():
    async def failing(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        raise ValueError("mid-stream failure")

    async def returning(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})

    async def main() -> None:
        for app, error in ((failing, "mid-stream failure"), (returning, "before finishing its response")):
            forwarded = Forwarded()
            stream = stream_asgi(app, "GET", "/", [], b"", forward=forwarded)
            assert await anext(stream) == (200, [], b"a", True)
            with pytest.raises(RuntimeError, match=error):
                await anext(stream)
            assert forwarded.parts == [b"b"]

    asyncio.run(main())


def test_with_forward_a_failing_forward_disconnects_the_app_and_fails_the_iterator():
    """The channel to the router closed: the app is told its client left (vLLM aborts the request)
    and the call fails, so the router reports the stream as failed."""

    async def main() -> None:
        state: dict[str, Any] = {}
        stream = stream_asgi(make_app(state), "GET", "/endless", [], b"", forward=Forwarded(fail_at=3))
        assert (await anext(stream))[2] == b"tick0\n"
        with pytest.raises(RuntimeError, match="the channel closed"):
            await anext(stream)
        # The app's generator was cancelled where it waited (vLLM's aborts its request there).
        assert state.get("cancelled") is True and state.get("closed") is True

    asyncio.run(main())


def test_with_forward_closing_early_cancels_the_app():
    async def main() -> None:
        state: dict[str, Any] = {}
        forwarded = Forwarded()
        stream = stream_asgi(make_app(state), "GET", "/endless", [], b"", forward=forwarded)
        await anext(stream)
        pending = asyncio.ensure_future(anext(stream))  # waits for the app's end
        await asyncio.sleep(0.05)
        assert forwarded.parts  # meanwhile the ticks go to forward
        pending.cancel()  # how Serve stops the call when the router cancels it
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.sleep(0)
        assert state.get("cancelled") is True

    asyncio.run(main())


def test_the_scope_carries_the_request():
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def app(scope: dict, receive: Any, send: Any) -> None:
            seen["scope"] = scope
            seen["request"] = await receive()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        items = await collect(app, "POST", "/v1/chat/completions", b'{"x": 1}',
                              headers=[("X-Request-Id", "abc")], query=b"q=1")
        assert items == [(204, [], b"", False)]
        scope = seen["scope"]
        assert (scope["type"], scope["method"], scope["path"], scope["query_string"]) == (
            "http", "POST", "/v1/chat/completions", b"q=1")
        assert (b"x-request-id", b"abc") in scope["headers"]
        assert seen["request"] == {"type": "http.request", "body": b'{"x": 1}', "more_body": False}

    asyncio.run(main())


def test_http_only_middleware_is_dropped_from_the_in_process_app():
    """The engine replica drops CORS and the HTTP-metrics middleware from vLLM's app (the router is
    the HTTP server); every other middleware still wraps each request."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.middleware.cors import CORSMiddleware

    from deployments.engine.server import without_http_only_middleware

    class Marker(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            response = await call_next(request)
            response.headers["x-marker"] = "kept"
            return response

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> JSONResponse:
        return JSONResponse({"ok": True})

    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    app.add_middleware(Marker)
    origin = [("origin", "https://example.com")]
    before = dict(asyncio.run(collect(app, path="/ping", headers=origin))[0][1])
    assert before["access-control-allow-origin"] == "*" and before["x-marker"] == "kept"

    assert without_http_only_middleware(app) == ["CORSMiddleware"]
    (status, headers, first, _), *rest = asyncio.run(collect(app, path="/ping", headers=origin))
    headers = dict(headers)
    assert (status, json.loads(first + b"".join(rest))) == (200, {"ok": True})
    assert "access-control-allow-origin" not in headers and headers["x-marker"] == "kept"
