"""The body channel between engine and router replicas (deployments.transport.stream_channel), over real
loopback sockets. Serve's streamed call is played by `ScriptedCall`: a unit's stand-in; the real
app's tests (test_openai_tiny, test_faults_tiny, test_guarded) are the proof end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deployments.ingress.errors import error_body
from deployments.transport.stream_channel import (
    AUTH_TIMEOUT_S,
    BodyEnd,
    ChannelBroken,
    ChanneledStream,
    ReplyChannels,
    ReplyTo,
    StreamInbox,
)

HEAD = (200, [("content-type", "text/event-stream")], b"data: first\n\n", True)


class ScriptedCall:
    """Serve's streamed handle call, played by the engine's side of the test: `remote(...)` records
    the ReplyTo and returns a response whose items the test puts in `items` (an exception is raised)."""

    def __init__(self) -> None:
        self.reply_to: asyncio.Future[ReplyTo] | None = None
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False

    def remote(self, method: str, path: str, headers: Any, body: bytes, reply_to: ReplyTo) -> ScriptedCall:
        assert self.reply_to is not None
        self.reply_to.set_result(reply_to)
        return self

    async def __anext__(self) -> Any:
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


async def relay(channels: ReplyChannels, parts: list[bytes], reply_to: ReplyTo) -> BodyEnd:
    """What the engine replica does with a stream's parts after its head (stream_asgi's forward)."""
    forward = channels.forwarder(reply_to)
    for part in parts:
        await forward(part)
    return BodyEnd(forward.sent)


async def open_stream(inbox: StreamInbox) -> tuple[ChanneledStream, ScriptedCall, asyncio.Task[Any], ReplyTo]:
    """A ChanneledStream whose head is on its way: the test then plays the engine with the ReplyTo."""
    call = ScriptedCall()
    call.reply_to = asyncio.get_running_loop().create_future()
    stream = ChanneledStream(inbox, call, "POST", "/v1/chat/completions", [], b"{}")
    head = asyncio.ensure_future(stream.__anext__())
    return stream, call, head, await call.reply_to


async def open_answered_stream(inbox: StreamInbox) -> tuple[ChanneledStream, ScriptedCall, ReplyTo]:
    """A ChanneledStream whose head has arrived: the engine's body parts come next."""
    stream, call, head, reply_to = await open_stream(inbox)
    call.items.put_nowait(HEAD)
    assert await head == HEAD
    return stream, call, reply_to


async def rest_of(stream: ChanneledStream) -> list[bytes]:
    return [part async for part in stream]


def with_channel(scenario: Callable[[StreamInbox, ReplyChannels], Awaitable[None]]) -> None:
    """Runs a scenario between a router's inbox and an engine replica's channels, both closed after
    it whatever happens."""

    async def main() -> None:
        inbox, channels = StreamInbox("127.0.0.1"), ReplyChannels()
        try:
            await scenario(inbox, channels)
        finally:
            channels.close()
            inbox.shutdown()

    asyncio.run(main())


def test_every_stream_gets_its_own_parts_in_order_and_is_closed_at_its_end():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        streams = [await open_stream(inbox) for _ in range(3)]
        assert inbox.open_streams == 3
        # The engine side: each stream's parts, interleaved in the same turns of the loop.
        relays = [
            relay(channels, [f"{n}:{i}".encode() for i in range(50)], reply_to)
            for n, (_, _, _, reply_to) in enumerate(streams)
        ]
        ends = await asyncio.gather(*relays)
        assert ends == [BodyEnd(50)] * 3
        for _, call, head, _ in streams:
            call.items.put_nowait(HEAD)
            assert await head == HEAD
            call.items.put_nowait(ends[0])
        bodies = await asyncio.gather(*(rest_of(stream) for stream, *_ in streams))
        for n, body in enumerate(bodies):
            assert body == [f"{n}:{i}".encode() for i in range(50)]
        assert inbox.open_streams == 0

    with_channel(scenario)


def test_parts_of_one_loop_turn_leave_in_one_write():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        streams = [await open_stream(inbox) for _ in range(16)]
        sender = await channels.sender(streams[0][3])
        writes = []
        transport = sender._transport
        original = transport.writelines
        transport.writelines = lambda data: (writes.append(len(data)), original(data))
        for _, _, _, reply_to in streams:  # one token of each of 16 streams, as one engine step gives
            sender.send(reply_to.stream_id, b"data: token\n\n")
        await asyncio.sleep(0)
        assert writes == [32]  # 16 records, a header and a part each, in one write
        for _, call, head, _ in streams:
            call.items.put_nowait(HEAD)
            await head
            call.items.put_nowait(BodyEnd(1))
        bodies = await asyncio.gather(*(rest_of(stream) for stream, *_ in streams))
        assert bodies == [[b"data: token\n\n"]] * 16

    with_channel(scenario)


def test_the_end_can_arrive_before_the_parts_it_counts():
    """The call and the channel are two connections: the call's BodyEnd may overtake the parts."""

    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, head, reply_to = await open_stream(inbox)
        call.items.put_nowait(HEAD)
        call.items.put_nowait(BodyEnd(3))
        assert await head == HEAD
        reading = asyncio.ensure_future(rest_of(stream))
        await asyncio.sleep(0.05)
        assert not reading.done()  # waits for the three parts
        await relay(channels, [b"a", b"b", b"c"], reply_to)
        assert await reading == [b"a", b"b", b"c"]

    with_channel(scenario)


def test_a_failed_call_ends_the_stream_with_its_error_after_the_parts_that_came():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, reply_to = await open_answered_stream(inbox)
        await relay(channels, [b"a", b"b"], reply_to)
        await asyncio.sleep(0.05)  # the parts are in
        call.items.put_nowait(RuntimeError("the replica died"))
        received = []
        with pytest.raises(RuntimeError, match="the replica died"):
            async for part in stream:
                received.append(part)
        assert received == [b"a", b"b"]
        assert inbox.open_streams == 0

    with_channel(scenario)


def test_an_expired_stream_cancels_its_call_and_ends_with_the_error_after_its_parts():
    """REQUEST_TIMEOUT mid-stream: the engine's call is cancelled (vLLM aborts), the reader gets
    what had come, then the timeout; parts that come later are dropped with the stream."""
    from deployments.ingress.errors import RequestTimeout

    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, reply_to = await open_answered_stream(inbox)
        await relay(channels, [b"a", b"b"], reply_to)
        await asyncio.sleep(0.05)  # the parts are in
        stream.expire(RequestTimeout("too late"))
        assert call.cancelled
        received = []
        with pytest.raises(RequestTimeout, match="too late"):
            async for part in stream:
                received.append(part)
        assert received == [b"a", b"b"]
        assert error_body(RequestTimeout("x"))[0] == 504
        assert inbox.open_streams == 0

    with_channel(scenario)


def test_an_expired_stream_that_had_finished_reads_to_its_end():
    """The deadline passing after the engine's last part: the answer was on time and stays whole."""
    from deployments.ingress.errors import RequestTimeout

    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, reply_to = await open_answered_stream(inbox)
        end = await relay(channels, [b"a", b"b"], reply_to)
        call.items.put_nowait(end)
        await asyncio.sleep(0.05)  # parts and end are in
        stream.expire(RequestTimeout("too late"))
        assert await rest_of(stream) == [b"a", b"b"]

    with_channel(scenario)


def test_a_reader_too_far_behind_ends_its_stream_and_its_engine_call():
    """STREAM_BUFFER_BYTES: parts a reader leaves unread are bounded; past that the stream ends with
    ReaderStalled after what it holds, later parts are dropped, and the engine's call is cancelled."""
    from deployments.ingress.errors import ReaderStalled

    async def scenario(_: StreamInbox, channels: ReplyChannels) -> None:
        inbox = StreamInbox("127.0.0.1", max_buffered=1000)
        try:
            stream, call, reply_to = await open_answered_stream(inbox)
            await relay(channels, [b"x" * 400, b"y" * 400], reply_to)
            await asyncio.sleep(0.05)
            assert not call.cancelled  # 800 bytes waiting: within the bound
            assert await stream.__anext__() == b"x" * 400  # read: 400 waiting
            await relay(channels, [b"z" * 400, b"w" * 400], reply_to)  # 1200 waiting: past it
            await asyncio.sleep(0.05)
            assert call.cancelled and inbox.open_streams == 0
            received = []
            with pytest.raises(ReaderStalled, match="STREAM_BUFFER_BYTES"):
                async for part in stream:
                    received.append(part)
            assert received == [b"y" * 400, b"z" * 400]
            assert error_body(ReaderStalled("x"))[0] == 504
        finally:
            inbox.shutdown()

    with_channel(scenario)


def test_a_closed_channel_fails_the_streams_it_carried_as_unavailable():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, _, reply_to = await open_answered_stream(inbox)
        await relay(channels, [b"a"], reply_to)
        await asyncio.sleep(0.05)
        (await channels.sender(reply_to)).close()  # the engine replica's process went away
        assert await stream.__anext__() == b"a"
        with pytest.raises(ChannelBroken) as failure:
            await stream.__anext__()
        assert error_body(failure.value)[0] == 503
        # The engine side reconnects for the next stream.
        await asyncio.sleep(0.05)
        second, call2, reply_to2 = await open_answered_stream(inbox)
        assert await relay(channels, [b"x"], reply_to2) == BodyEnd(1)
        call2.items.put_nowait(BodyEnd(1))
        assert await rest_of(second) == [b"x"]

    with_channel(scenario)


def test_a_wrong_token_gets_the_connection_closed_and_nothing_delivered():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, head, reply_to = await open_stream(inbox)
        forged = ReplyTo(reply_to.host, reply_to.port, b"x" * len(reply_to.token), reply_to.stream_id)
        forged_sender = await channels.sender(forged)
        await relay(channels, [b"forged"], forged)
        await asyncio.sleep(0.05)
        assert isinstance(forged_sender.error, ChannelBroken)  # the router closed it
        call.items.put_nowait(HEAD)
        await head
        call.items.put_nowait(BodyEnd(0))
        assert await rest_of(stream) == []

    with_channel(scenario)


def test_silent_connections_are_closed_after_the_auth_timeout_and_capped():
    """The inbox listens on the node's address: a connection that never sends the token is closed
    after AUTH_TIMEOUT_S (5 s; shortened here), and past MAX_UNAUTHENTICATED waiting at once a new
    one is closed on arrival. An engine replica's connection, token first, is unaffected."""
    assert AUTH_TIMEOUT_S <= 5

    async def main() -> None:
        inbox, channels = StreamInbox("127.0.0.1", auth_timeout_s=0.5, max_unauthenticated=2), ReplyChannels()
        try:
            stream, call, reply_to = await open_answered_stream(inbox)
            silent = [await asyncio.open_connection(reply_to.host, reply_to.port) for _ in range(3)]
            # The third found two waiting: closed at once.
            assert await asyncio.wait_for(silent[2][0].read(), 0.3) == b""
            assert len(inbox.unauthenticated) == 2
            started = asyncio.get_running_loop().time()
            for reader, _ in silent[:2]:
                assert await asyncio.wait_for(reader.read(), 2) == b""
            assert 0.4 <= asyncio.get_running_loop().time() - started < 1.5
            assert inbox.unauthenticated == set()
            # The engine's channel (token first) still delivers.
            call.items.put_nowait(await relay(channels, [b"part"], reply_to))
            assert await rest_of(stream) == [b"part"]
            for _, writer in silent:
                writer.close()
        finally:
            channels.close()
            inbox.shutdown()

    asyncio.run(main())


def test_a_cancelled_stream_cancels_its_call_and_drops_its_late_parts():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, reply_to = await open_answered_stream(inbox)
        stream.cancel()  # the client left
        assert call.cancelled
        assert inbox.open_streams == 0
        assert not inbox.deliver(reply_to.stream_id, b"late", carrier=None)

    with_channel(scenario)


def test_a_head_without_more_parts_closes_the_stream():
    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        stream, call, head, _ = await open_stream(inbox)
        call.items.put_nowait((200, [], b'{"object": "list"}', False))
        assert (await head)[2] == b'{"object": "list"}'
        assert inbox.open_streams == 0
        assert await rest_of(stream) == []

    with_channel(scenario)


def test_a_full_socket_holds_the_streams_until_it_drains():
    """While the router doesn't read, the engine's streams wait before taking their next part (so
    vLLM merges the tokens meanwhile) instead of buffering without bound."""

    async def scenario(inbox: StreamInbox, channels: ReplyChannels) -> None:
        _, _, _, reply_to = await open_stream(inbox)
        sender = await channels.sender(reply_to)
        sender.pause_writing()  # what asyncio calls once the socket's buffer is over its mark
        relaying = asyncio.ensure_future(relay(channels, [b"a", b"b"], reply_to))
        await asyncio.sleep(0.05)
        assert not relaying.done()
        sender.resume_writing()
        assert await relaying == BodyEnd(2)

    with_channel(scenario)


class _FakeCall:
    """Serve's streamed call: the items, then StopAsyncIteration; cancel() fails the next read."""

    def __init__(self, items):
        self._items = list(items)
        self.cancelled = False

    async def __anext__(self):
        if self.cancelled:
            from ray.serve.exceptions import RequestCancelledError

            raise RequestCancelledError("call")
        if not self._items:
            raise StopAsyncIteration
        return self._items.pop(0)

    def cancel(self):
        self.cancelled = True


class _FakeMethod:
    def __init__(self, items):
        self.items, self.calls = items, []

    def remote(self, *request):
        self.calls.append(_FakeCall(self.items))
        return self.calls[-1]


def test_a_serve_stream_reads_like_a_channeled_one():
    from deployments.transport.stream_channel import ServeStream

    async def main():
        method = _FakeMethod([(200, [], b"data: 1\n\n", True), b"data: 2\n\n"])
        stream = ServeStream(method, "POST", "/v1/completions", [], b"{}")
        assert method.calls == []  # the call starts with the first read, as the channel's does
        assert [item async for item in stream] == [(200, [], b"data: 1\n\n", True), b"data: 2\n\n"]

        expired = ServeStream(_FakeMethod([(200, [], b"", True), b"x"]), "POST", "/", [], b"")
        await expired.__anext__()
        expired.expire(TimeoutError("deadline"))
        try:
            await expired.__anext__()
        except TimeoutError as exc:
            assert str(exc) == "deadline"
        else:
            raise AssertionError("an expired stream must raise the deadline's error")

        cancelled_method = _FakeMethod([(200, [], b"", True)])
        cancelled = ServeStream(cancelled_method, "POST", "/", [], b"")
        await cancelled.__anext__()
        cancelled.cancel()
        assert cancelled_method.calls[0].cancelled

    asyncio.run(main())
