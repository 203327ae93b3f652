"""Whether an engine's SSE stream finished or was cut: a stream that stops before its route's
closing event lost its engine mid-response, and the caller must get an error, not what looks like
a finished answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments.ingress.errors import EngineUnavailable
from deployments.transport.sse import event_name, last_event

SSE_END = b"data: [DONE]\n\n"
# The events a Responses API stream ends with: vLLM sends no `data: [DONE]` there.
RESPONSES_FINAL_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed", b"error"})
# And an Anthropic Messages stream.
MESSAGES_FINAL_EVENTS = frozenset({b"message_stop", b"error"})


class StreamCut(EngineUnavailable):
    """The engine's SSE stream stopped before its closing event."""


def ends_with_done(last_part: bytes) -> bool:
    """Chat and completion streams: vLLM ends every one with `data: [DONE]`, failed ones too."""
    return last_part.endswith(SSE_END)


def _ends_with_event(last_part: bytes, names: frozenset[bytes]) -> bool:
    event = last_event(last_part)
    return event is not None and event_name(event) in names


def ends_with_final_response_event(last_part: bytes) -> bool:
    """Responses API streams: the last event is `response.completed` (or a failure's own event)."""
    return _ends_with_event(last_part, RESPONSES_FINAL_EVENTS)


def ends_with_message_stop(last_part: bytes) -> bool:
    """Anthropic Messages streams: the last event is `message_stop` (or `error`)."""
    return _ends_with_event(last_part, MESSAGES_FINAL_EVENTS)


# Per route, how a finished stream ends (ends_with_done for the others).
STREAM_END_CHECKS: dict[str, Callable[[bytes], bool]] = {
    "/v1/responses": ends_with_final_response_event,
    "/v1/messages": ends_with_message_stop,
}


async def whole_stream(first_part: bytes, stream: Any, route: str) -> AsyncIterator[bytes]:
    """The engine's SSE parts of a stream on `route`; a StreamCut after them if they stop short."""
    finished = STREAM_END_CHECKS.get(route, ends_with_done)
    last = first_part
    yield first_part
    async for part in stream:
        last = part or last  # the body's closing message is usually empty
        yield part
    if not finished(last):
        raise StreamCut("The engine's stream stopped before it finished; retry the request.")
