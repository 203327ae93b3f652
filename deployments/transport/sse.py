"""The one parser of the engine's server-sent events (vLLM's streamed bodies): the ingress's
end-of-stream checks and the RunPod format's batches both read events here. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def split_sse(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Whole SSE events (without their blank-line terminator) and the incomplete rest."""
    *events, rest = buffer.split(b"\n\n")
    return [e for e in events if e.strip()], rest


def last_event(part: bytes) -> bytes | None:
    """The last event in a part, whole or not (a stream's last part may lack its blank line)."""
    events, rest = split_sse(part)
    if rest.strip():
        events.append(rest)
    return events[-1] if events else None


def event_name(event: bytes) -> bytes | None:
    """The `event:` name of one event (Responses and Messages streams name theirs); None without."""
    first_line = event.lstrip(b"\r\n").split(b"\n", 1)[0].strip()
    return first_line[len(b"event:"):].strip() if first_line.startswith(b"event:") else None


def event_data(event: bytes) -> str | None:
    """The data of one SSE event (its `data:` lines joined; an `event:` line may come first, as in
    Responses and Messages streams); None when it has none."""
    lines = [line[5:].strip() for line in event.decode("utf-8").splitlines() if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def event_payload(event: bytes) -> dict[str, Any] | None:
    """The JSON of one `data:` event; None for `[DONE]` (and an event without data)."""
    data = event_data(event)
    if data is None or data == "[DONE]":
        return None
    return json.loads(data)


def iter_events(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON events of a byte stream cut anywhere."""
    buffer = b""
    for chunk in chunks:
        events, buffer = split_sse(buffer + chunk)
        for event in events:
            payload = event_payload(event)
            if payload is not None:
                yield payload
