"""A value fetched once, when first needed, and shared by every caller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedFetch(Generic[T]):
    """The first caller starts the fetch; callers arriving meanwhile wait for the same one (a caller
    cancelled while waiting doesn't cancel it for the others). A failed fetch is the error of every
    caller that waited for it, and the next caller fetches again. Once fetched, the value is kept."""

    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._pending: asyncio.Future[T] | None = None
        self._fetched = False
        self._value: T | None = None

    @property
    def value(self) -> T | None:
        """The value once fetched, else None (for clean-up, which must not start a fetch)."""
        return self._value

    async def get(self) -> T:
        if self._fetched:
            return self._value  # type: ignore[return-value]
        pending = self._pending
        if pending is None or (pending.done() and (pending.cancelled() or pending.exception() is not None)):
            pending = self._pending = asyncio.ensure_future(self._fetch())
        value = await asyncio.shield(pending)
        self._value, self._fetched, self._pending = value, True, None
        return value
