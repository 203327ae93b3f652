"""AdmissionLimiter: slots, a bounded FIFO queue, immediate 429s, cancellation without leaks.

pytest-asyncio is not installed: each test runs its own event loop with asyncio.run.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.ingress.admission import AdmissionLimiter
from deployments.ingress.errors import Overloaded


async def settle() -> None:
    """Let every ready task run (a few loop iterations)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_two_admitted_third_waits_fourth_rejected():
    async def main() -> None:
        limiter = AdmissionLimiter(2, 1)
        await limiter.acquire()
        await limiter.acquire()
        assert (limiter.in_flight, limiter.queued) == (2, 0)

        third = asyncio.create_task(limiter.acquire())
        await settle()
        assert not third.done()
        assert (limiter.in_flight, limiter.queued) == (2, 1)

        # The fourth is rejected at once, without waiting.
        with pytest.raises(Overloaded) as info:
            await asyncio.wait_for(limiter.acquire(), timeout=1)
        assert info.value.retry_after_s == 1
        assert "MAX_CONCURRENCY" in str(info.value)
        assert (limiter.in_flight, limiter.queued) == (2, 1)

        limiter.release()  # the slot passes to the waiter: in_flight stays 2
        await settle()
        assert third.done() and third.exception() is None
        assert (limiter.in_flight, limiter.queued) == (2, 0)

        limiter.release()
        limiter.release()
        assert (limiter.in_flight, limiter.queued) == (0, 0)

    asyncio.run(main())


def test_queue_zero_rejects_as_soon_as_slots_are_full():
    async def main() -> None:
        limiter = AdmissionLimiter(1, 0)
        await limiter.acquire()
        with pytest.raises(Overloaded):
            await limiter.acquire()
        limiter.release()
        await limiter.acquire()
        assert limiter.in_flight == 1

    asyncio.run(main())


def test_release_admits_waiters_in_fifo_order():
    async def main() -> None:
        limiter = AdmissionLimiter(1, 3)
        await limiter.acquire()
        admitted: list[str] = []

        async def request(name: str) -> None:
            await limiter.acquire()
            admitted.append(name)

        tasks = []
        for name in "abc":
            tasks.append(asyncio.create_task(request(name)))
            await settle()  # queue them in this order
        assert limiter.queued == 3

        for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
            limiter.release()
            await settle()
            assert admitted == expected
            assert limiter.in_flight == 1
        assert limiter.queued == 0
        limiter.release()
        assert limiter.in_flight == 0
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_newcomer_does_not_jump_the_queue():
    async def main() -> None:
        limiter = AdmissionLimiter(1, 2)
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        limiter.release()  # handed to the waiter, which has not run yet
        newcomer = asyncio.create_task(limiter.acquire())
        await settle()
        assert waiter.done()
        assert not newcomer.done()  # the slot went to the waiter: the newcomer queues
        assert (limiter.in_flight, limiter.queued) == (1, 1)
        limiter.release()
        await settle()
        assert newcomer.done()
        limiter.release()
        assert (limiter.in_flight, limiter.queued) == (0, 0)

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue_without_leaking_a_slot():
    async def main() -> None:
        limiter = AdmissionLimiter(1, 2)
        await limiter.acquire()
        first = asyncio.create_task(limiter.acquire())
        second = asyncio.create_task(limiter.acquire())
        await settle()
        assert limiter.queued == 2

        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (limiter.in_flight, limiter.queued) == (1, 1)

        # The queue has room again, and the next release skips straight to `second`.
        limiter.release()
        await settle()
        assert second.done() and second.exception() is None
        assert (limiter.in_flight, limiter.queued) == (1, 0)
        limiter.release()
        assert (limiter.in_flight, limiter.queued) == (0, 0)

    asyncio.run(main())


def test_a_waiter_cancelled_after_being_handed_the_slot_gives_it_back():
    async def main() -> None:
        limiter = AdmissionLimiter(1, 1)
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        limiter.release()  # the slot is handed over...
        waiter.cancel()  # ...and the waiter is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (limiter.in_flight, limiter.queued) == (0, 0)
        await limiter.acquire()
        assert limiter.in_flight == 1

    asyncio.run(main())


def test_a_waiter_cancelled_just_before_a_release():
    """Cancelled, then (before it resumes) a release() skips its cancelled future: the waiter must
    still end with CancelledError, and the slot must be freed, not handed to nobody."""

    async def main() -> None:
        limiter = AdmissionLimiter(1, 1)
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        waiter.cancel()
        limiter.release()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (limiter.in_flight, limiter.queued) == (0, 0)
        await limiter.acquire()
        assert limiter.in_flight == 1

    asyncio.run(main())


def test_in_flight_returns_to_zero_after_a_burst():
    async def main() -> None:
        limiter = AdmissionLimiter(3, 20)
        peak = 0
        active = 0

        async def request(i: int) -> None:
            nonlocal peak, active
            await limiter.acquire()
            try:
                active += 1
                peak = max(peak, active)
                assert limiter.in_flight <= 3
                await asyncio.sleep(0.001 * (i % 3))
            finally:
                active -= 1
                limiter.release()

        results = await asyncio.gather(*(request(i) for i in range(23)), return_exceptions=True)
        assert all(r is None for r in results)  # 3 in flight + 20 queued: nobody rejected
        assert peak == 3
        assert (limiter.in_flight, limiter.queued) == (0, 0)

    asyncio.run(main())


def test_a_burst_beyond_the_queue_rejects_the_excess():
    async def main() -> None:
        limiter = AdmissionLimiter(2, 3)
        gate = asyncio.Event()

        async def request() -> None:
            await limiter.acquire()
            try:
                await gate.wait()
            finally:
                limiter.release()

        tasks = [asyncio.create_task(request()) for _ in range(8)]
        await settle()
        assert (limiter.in_flight, limiter.queued) == (2, 3)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, Overloaded) for r in results) == 3
        assert sum(r is None for r in results) == 5
        assert (limiter.in_flight, limiter.queued) == (0, 0)

    asyncio.run(main())


@pytest.mark.parametrize(("limit", "max_queued"), [(0, 0), (-1, 5), (1, -1), (0, -1)])
def test_constructor_rejects_bad_values(limit: int, max_queued: int):
    with pytest.raises(ValueError):
        AdmissionLimiter(limit, max_queued)


def test_constructor_accepts_edge_values():
    limiter = AdmissionLimiter(1, 0)
    assert (limiter.limit, limiter.max_queued, limiter.in_flight, limiter.queued) == (1, 0, 0, 0)
