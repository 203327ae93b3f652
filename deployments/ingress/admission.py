"""Admission control: at most `limit` requests in flight, at most `max_queued` waiting, the rest
rejected at once (429). Requests are admitted in arrival order."""

from __future__ import annotations

import asyncio
from collections import deque

from deployments.ingress.errors import Overloaded


class AdmissionLimiter:
    def __init__(self, limit: int, max_queued: int) -> None:
        if limit < 1 or max_queued < 0:
            raise ValueError("limit must be >= 1 and max_queued >= 0")
        self.limit = limit
        self.max_queued = max_queued
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Returns once admitted; raises Overloaded when the queue is full too."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise Overloaded(
                f"Too many requests: {self.in_flight} in flight (MAX_CONCURRENCY) and "
                f"{len(self._waiters)} queued (MAX_QUEUED_REQUESTS); retry later"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over: in_flight already counts us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # admitted and cancelled in the same instant: give the slot back
            elif waiter in self._waiters:  # release() may already have dropped it (cancelled first)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next waiter
                return
        self.in_flight -= 1
