"""The body of streamed responses, engine replica -> ingress replica, one socket write per engine step.

Why: through Serve's streamed call, every SSE part of every stream is its own gRPC message, and on
a small machine each one wakes gRPC's thread and then the event loop, in the engine replica and
again in the ingress (bench/README: ~6 context switches per token, where bare vLLM's server makes
~1). Here, every engine replica keeps one TCP connection to each ingress replica that calls it,
and the parts produced in one turn of its event loop (one engine step carries a token of every
running stream) go out in one write and are read in one read.

What stays with Serve: the call itself. The ingress still calls the engine deployment through its
handle, a streamed call that lives as long as the response: Serve picks the replica, counts the
request against `max_ongoing_requests`, cancels it (so vLLM aborts) when the client leaves, and
fails it when the replica dies. The call yields the response head (status, headers, first part)
as before, then, when the body is over, a `BodyEnd` with the number of parts that went through
the channel; the ingress takes that many from the channel before it ends the stream.

Wire format: the connecting side first sends the ingress's token (random, per ingress replica,
handed to the engine in each call), then records `!QI` (stream id, length) + bytes.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from deployments.ingress.errors import EngineUnavailable, ReaderStalled
from deployments.ingress.shared_fetch import SharedFetch
from deployments.transport.asgi_bridge import ResponseHead, stream_asgi

RECORD_HEADER = struct.Struct("!QI")
TOKEN_BYTES = 16
# After the call said how many parts were sent, how long the rest may take to arrive. They left
# before the call's last message did; only a broken connection keeps them away.
LATE_PARTS_TIMEOUT_S = 30.0
# The inbox listens on the node's address, so anything that reaches it may connect: a connection
# that hasn't sent the token within this long is closed, and past this many such connections at
# once, new ones are closed on arrival (an engine replica sends its token with its first write).
AUTH_TIMEOUT_S = 5.0
MAX_UNAUTHENTICATED = 64


@dataclass(frozen=True)
class ReplyTo:
    """Where an engine replica sends a stream's body parts: the ingress's channel, and the stream."""

    host: str
    port: int
    token: bytes
    stream_id: int


@dataclass(frozen=True)
class BodyEnd:
    """The streamed call's last item: how many body parts went through the channel."""

    parts: int


class ChannelBroken(EngineUnavailable):
    """The channel carrying a stream's body closed before the stream ended."""


# --- ingress side -------------------------------------------------------------------------------
class _StreamQueue:
    """The parts of one stream, in order, and then its end (a BodyEnd or an exception)."""

    __slots__ = ("items", "waiter", "carrier", "buffered", "abort")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        # The connection its parts came on: the stream can't end well once that one closes.
        self.carrier: _InboxConnection | None = None
        self.buffered = 0  # bytes of parts not yet read
        self.abort: Any = None  # cancels the stream's engine call (set once the call is made)

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.items.popleft()
        if type(item) is bytes:
            self.buffered -= len(item)
        return item


class StreamInbox:
    """Ingress side: a server on the node's address that engine replicas connect to, and the streams
    waiting for their parts. Started on first use (the ingress's constructor has no event loop)."""

    def __init__(self, host: str, max_buffered: int = 4 << 20, auth_timeout_s: float = AUTH_TIMEOUT_S,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED) -> None:
        self._host = host
        self.auth_timeout_s = auth_timeout_s
        self.max_unauthenticated = max_unauthenticated
        # Bytes of one stream's parts its reader may leave unread (STREAM_BUFFER_BYTES): past that
        # the stream is aborted, so a client that stops reading can't pile its output up here.
        self._max_buffered = max_buffered
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self.unauthenticated: set[_InboxConnection] = set()
        self._streams: dict[int, _StreamQueue] = {}
        self._next_id = 0
        self._server = SharedFetch(self._start_server)

    async def _start_server(self) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(lambda: _InboxConnection(self), self._host, 0)

    async def open(self) -> tuple[ReplyTo, _StreamQueue]:
        server = await self._server.get()
        self._next_id += 1
        queue = self._streams[self._next_id] = _StreamQueue()
        port = server.sockets[0].getsockname()[1]
        return ReplyTo(self._host, port, self._token, self._next_id), queue

    def close(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def accepts(self, token: bytes) -> bool:
        return hmac.compare_digest(token, self._token)

    def deliver(self, stream_id: int, part: bytes, carrier: _InboxConnection | None) -> bool:
        queue = self._streams.get(stream_id)
        if queue is None:  # the stream was closed (client left): its late parts are dropped
            return False
        queue.carrier = carrier
        queue.buffered += len(part)
        if queue.buffered > self._max_buffered:
            # Its reader fell too far behind: the stream ends after what it holds, later parts are
            # dropped, and the engine stops generating them.
            self.close(stream_id)
            queue.put(ReaderStalled(
                f"The client fell more than {self._max_buffered} bytes behind the stream (STREAM_BUFFER_BYTES); "
                "the request was aborted."
            ))
            if queue.abort is not None:
                queue.abort()
            return False
        queue.put(part)
        return True

    def break_streams(self, carrier: _InboxConnection) -> None:
        """The open streams whose parts came on `carrier`, which closed."""
        for queue in self._streams.values():
            if queue.carrier is carrier:
                queue.put(ChannelBroken("The connection carrying the engine's stream closed; retry the request."))

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        if self._server.value is not None:
            self._server.value.close()


class _InboxConnection(asyncio.Protocol):
    """One engine replica's connection: splits its bytes into records and hands out the parts."""

    def __init__(self, inbox: StreamInbox) -> None:
        self._inbox = inbox
        self._buffer = bytearray()
        self._authenticated = False
        self._transport: asyncio.Transport | None = None
        self._auth_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        inbox = self._inbox
        if len(inbox.unauthenticated) >= inbox.max_unauthenticated:
            transport.abort()  # type: ignore[attr-defined]
            return
        inbox.unauthenticated.add(self)
        self._auth_timer = asyncio.get_running_loop().call_later(
            inbox.auth_timeout_s, transport.abort  # type: ignore[attr-defined]
        )

    def _stop_waiting(self) -> None:
        self._inbox.unauthenticated.discard(self)
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._authenticated:
            if len(buffer) < TOKEN_BYTES:
                return
            if not self._inbox.accepts(bytes(buffer[:TOKEN_BYTES])):
                assert self._transport is not None
                self._transport.close()
                buffer.clear()
                return
            self._authenticated = True
            self._stop_waiting()
            del buffer[:TOKEN_BYTES]
        position, size = 0, len(buffer)
        header = RECORD_HEADER.size
        while size - position >= header:
            stream_id, length = RECORD_HEADER.unpack_from(buffer, position)
            end = position + header + length
            if end > size:
                break
            self._inbox.deliver(stream_id, bytes(buffer[position + header:end]), self)
            position = end
        if position:
            del buffer[:position]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._inbox.break_streams(self)


class ChanneledStream:
    """The engine's answer to one call, read like Serve's streamed response (`__anext__`, `async
    for`, `cancel()`): first the ResponseHead from the call, then the body parts from the channel."""

    def __init__(self, inbox: StreamInbox, call: Any, method: str, path: str,
                 headers: list[tuple[str, str]], body: bytes, routing: dict[str, Any] | None = None) -> None:
        self._inbox = inbox
        self._call_method = call
        self._request = (method, path, headers, body)
        self._routing = routing or {}  # keyword arguments only the engine's request router reads
        self._call: Any = None
        self._reply_to: ReplyTo | None = None
        self._queue: _StreamQueue | None = None
        self._end_task: asyncio.Task[None] | None = None
        self._expected: int | None = None
        self._received = 0
        self._cancelled = False

    def __aiter__(self) -> ChanneledStream:
        return self

    async def __anext__(self) -> ResponseHead | bytes:
        if self._call is None:
            return await self._head()
        queue = self._queue
        if queue is None:
            raise StopAsyncIteration
        while True:
            if self._expected is not None:
                if self._received >= self._expected:
                    self._close()
                    raise StopAsyncIteration
                try:
                    item = await asyncio.wait_for(queue.get(), LATE_PARTS_TIMEOUT_S)
                except TimeoutError:
                    item = ChannelBroken(f"{self._expected - self._received} parts of the engine's stream "
                                         "never arrived; retry the request.")
            else:
                item = await queue.get()
            if type(item) is bytes:
                self._received += 1
                return item
            if isinstance(item, BodyEnd):
                self._expected = item.parts
                continue
            self._close()
            raise item

    async def _head(self) -> ResponseHead:
        self._reply_to, self._queue = await self._inbox.open()
        if self._cancelled:
            self._close()
            raise asyncio.CancelledError
        self._call = self._call_method.remote(*self._request, self._reply_to, **self._routing)
        try:
            head = await self._call.__anext__()
        except BaseException:
            self._call.cancel()  # cancelled while waiting (client gone): the engine must not go on
            self._close()
            raise
        if head[3]:  # more parts follow: the call's last item says how many
            self._end_task = asyncio.ensure_future(self._await_end(self._queue))
            self._queue.abort = self._cancel_call
        else:
            self._close()
        return head

    async def _await_end(self, queue: _StreamQueue) -> None:
        try:
            end = await self._call.__anext__()
        except StopAsyncIteration:
            queue.put(ChannelBroken("The engine's call ended without closing its stream; retry the request."))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the replica died, or the engine failed the stream
            queue.put(exc)
        else:
            queue.put(end)

    def _close(self) -> None:
        if self._reply_to is not None:
            self._inbox.close(self._reply_to.stream_id)
        self._queue = None

    def _cancel_call(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._end_task is not None and not self._end_task.done():
            self._end_task.cancel()

    def expire(self, exc: BaseException) -> None:
        """A deadline passed: the call is cancelled (vLLM aborts the request), and the reader gets
        `exc` after the parts that already arrived."""
        queue = self._queue
        self._cancel_call()
        if queue is not None:
            queue.put(exc)

    def cancel(self) -> None:
        """The client left or the stream ended: the call is cancelled (vLLM aborts the request)."""
        self._cancelled = True
        self._cancel_call()
        self._close()


class ServeStream:
    """The engine's answer to one call as Serve's own streamed call carries it (STREAM_TRANSPORT=
    serve): the ResponseHead, then every body part as a message of the call. ChanneledStream's
    interface, so the ingress reads either the same way."""

    def __init__(self, call: Any, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                 routing: dict[str, Any] | None = None) -> None:
        self._call_method = call
        self._request = (method, path, headers, body)
        self._routing = routing or {}
        self._call: Any = None
        self._failure: BaseException | None = None
        self._cancelled = False

    def __aiter__(self) -> ServeStream:
        return self

    async def __anext__(self) -> ResponseHead | bytes:
        if self._failure is not None:
            raise self._failure
        if self._call is None:
            if self._cancelled:
                raise asyncio.CancelledError
            self._call = self._call_method.remote(*self._request, **self._routing)
        try:
            return await self._call.__anext__()
        except (StopAsyncIteration, asyncio.CancelledError):
            raise
        except Exception:
            if self._failure is not None:  # expired: the call's cancellation is the deadline's 504
                raise self._failure from None
            raise

    def expire(self, exc: BaseException) -> None:
        """A deadline passed: the call is cancelled (vLLM aborts the request); the reader gets `exc`."""
        self._failure = exc
        if self._call is not None:
            self._call.cancel()

    def cancel(self) -> None:
        """The client left or the stream ended: the call is cancelled (vLLM aborts the request)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


# --- engine side --------------------------------------------------------------------------------
class _Sender(asyncio.Protocol):
    """One connection to an ingress replica replica. Parts written in one turn of the event loop leave in one
    write; while the socket is full, streams wait before taking their next part (vLLM meanwhile
    merges the tokens that arrive into fewer events, as it does behind a slow HTTP client)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def _broken(self) -> ChannelBroken:
        # A new exception per stream: one instance raised in many tasks would gather their tracebacks.
        return ChannelBroken(str(self.error))

    def send(self, stream_id: int, part: bytes) -> None:
        if self.error is not None:
            raise self._broken()
        self._pending.append(RECORD_HEADER.pack(stream_id, len(part)))
        self._pending.append(part)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self.error is None and self._transport is not None:
            pending, self._pending = self._pending, []
            self._transport.writelines(pending)

    async def writable(self) -> None:
        """Returns at once unless the socket is full; raises once the connection is gone."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.error is not None:
            raise self._broken()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = ChannelBroken(f"The connection to the ingress closed: {exc!r}")
        self._pending.clear()
        self._writable.set()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ReplyChannels:
    """Engine side: one connection per ingress replica, opened on first use and reopened after it
    closes (an ingress replica replica that restarted has a new address and token)."""

    def __init__(self) -> None:
        self._senders: dict[tuple[str, int, bytes], SharedFetch[_Sender]] = {}

    async def sender(self, reply_to: ReplyTo) -> _Sender:
        key = (reply_to.host, reply_to.port, reply_to.token)
        connection = self._senders.get(key)
        if connection is None or (connection.value is not None and connection.value.error is not None):
            connection = self._senders[key] = SharedFetch(partial(self._connect, reply_to))
        return await connection.get()

    @staticmethod
    async def _connect(reply_to: ReplyTo) -> _Sender:
        try:
            _, sender = await asyncio.get_running_loop().create_connection(_Sender, reply_to.host, reply_to.port)
        except OSError as exc:
            raise ChannelBroken(f"This engine replica can't reach its ingress replica's stream channel at "
                                f"{reply_to.host}:{reply_to.port}: {exc}") from exc
        assert sender._transport is not None
        sender._transport.write(reply_to.token)
        return sender

    def forwarder(self, reply_to: ReplyTo) -> StreamForwarder:
        return StreamForwarder(self, reply_to)

    async def answer(
        self, app: Any, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
        reply_to: ReplyTo | None, replica_header: tuple[str, str],
        fix_head: Callable[[ResponseHead], ResponseHead] | None = None,
    ) -> AsyncIterator[ResponseHead | bytes | BodyEnd]:
        """An engine replica's answer to one ingress call, served by its ASGI `app`: the ResponseHead
        (after `fix_head`, with the replica's header), then the body's other parts, as items of the
        call or, with `reply_to`, through the ingress's channel and then a BodyEnd."""
        forward = None if reply_to is None else self.forwarder(reply_to)
        items = stream_asgi(app, method, path, headers, body, forward=forward)
        head = await items.__anext__()
        status, response_headers, first_part, more = fix_head(head) if fix_head is not None else head
        yield status, [*response_headers, replica_header], first_part, more
        async for item in items:  # none with `forward`: it takes them
            yield item
        if forward is not None and more:
            yield BodyEnd(forward.sent)

    def close(self) -> None:
        for connection in self._senders.values():
            if connection.value is not None:
                connection.value.close()
        self._senders.clear()


class StreamForwarder:
    """One stream's body parts into its ingress replica's channel (connected on the first part: a response
    that has only a head never needs it); counts what it sent, for the call's BodyEnd."""

    def __init__(self, channels: ReplyChannels, reply_to: ReplyTo) -> None:
        self._channels = channels
        self._reply_to = reply_to
        self._sender: _Sender | None = None
        self.sent = 0

    async def __call__(self, part: bytes) -> None:
        sender = self._sender
        if sender is None:
            sender = self._sender = await self._channels.sender(self._reply_to)
        await sender.writable()
        sender.send(self._reply_to.stream_id, part)
        self.sent += 1
