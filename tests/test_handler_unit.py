"""The RunPod worker's pure parts: the local test API port, the health watchdog, the job handler.
Nothing here connects to Ray: status, exit, sleep, the clock and the router handle are fakes."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from typing import Any

import pytest

import handler.worker as worker
from configs.ray_env import HANDLE_SERIALIZATION
from handler.worker import (
    DEFAULT_LOCAL_API_PORT,
    HEALTH_POLL_S,
    make_handler,
    start_health_watch,
    watch_health,
    with_default_local_port,
)

# --- with_default_local_port ---------------------------------------------------------------------


def test_default_port_added_for_the_local_api():
    assert DEFAULT_LOCAL_API_PORT == "8001"
    assert with_default_local_port(["handler.py", "--rp_serve_api"]) == [
        "handler.py", "--rp_serve_api", "--rp_api_port", "8001"]


@pytest.mark.parametrize(
    "argv",
    [
        ["handler.py", "--rp_serve_api", "--rp_api_port", "9000"],
        ["handler.py", "--rp_api_port", "9000", "--rp_serve_api"],
        ["handler.py", "--rp_serve_api", "--rp_api_port=9000"],
    ],
)
def test_an_explicit_port_is_kept(argv: list[str]):
    assert with_default_local_port(list(argv)) == argv


@pytest.mark.parametrize(
    "argv",
    [
        ["handler.py"],
        [],
        ["handler.py", "--test_input", '{"input": {"prompt": "hi"}}'],
        ["handler.py", "--rp_api_port", "9000"],
    ],
)
def test_no_port_without_the_local_api(argv: list[str]):
    assert with_default_local_port(list(argv)) == argv


def test_argv_is_not_mutated():
    argv = ["handler.py", "--rp_serve_api"]
    with_default_local_port(argv)
    assert argv == ["handler.py", "--rp_serve_api"]


# --- watch_health ------------------------------------------------------------------------------------


class StopWatch(Exception):
    """Ends watch_health's endless loop once the scripted statuses run out."""


class FakeWorld:
    """A scripted app status, a clock advanced only by sleep(), and a recorded exit()."""

    def __init__(self, statuses: list[str | None]) -> None:
        self.statuses = list(statuses)
        self.now = 1000.0
        self.exits: list[tuple[int, float]] = []
        self.polls: list[tuple[float, str | None]] = []
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def status(self) -> str | None:
        if not self.statuses:
            raise StopWatch
        status = self.statuses.pop(0)
        self.polls.append((self.now, status))
        return status

    def exit(self, code: int) -> None:
        self.exits.append((code, self.now))


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch):
    def make(statuses: list[str | None]) -> FakeWorld:
        fake = FakeWorld(statuses)
        # Only handler.worker's view of `time`: pytest's own clock stays real.
        monkeypatch.setattr(worker, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep))
        return fake

    return make


def run_watch(fake: FakeWorld, deadline_s: float) -> None:
    try:
        watch_health(deadline_s, status=fake.status, exit=fake.exit, wait=fake.sleep)
    except StopWatch:
        pass


def test_healthy_app_never_exits(world):
    fake = world(["RUNNING"] * 50)
    run_watch(fake, deadline_s=12)
    assert fake.exits == []
    assert len(fake.polls) == 50
    assert set(fake.sleeps) == {HEALTH_POLL_S}  # it sleeps before each poll


def test_exits_only_after_the_deadline(world):
    assert HEALTH_POLL_S == 5.0
    # Polls at +5 (RUNNING), +10 (unhealthy from here), +15 (5 s), +20 (10 s), +25 (15 s > 12 s: exit).
    fake = world(["RUNNING"] + ["UNHEALTHY"] * 10)
    run_watch(fake, deadline_s=12)
    assert fake.exits == [(1, 1025.0)]
    assert len(fake.polls) == 5  # returns right after exit (os._exit never returns anyway)


def test_not_exactly_at_the_deadline(world):
    # Unhealthy since +5; +15 is exactly 10 s later: not past the deadline yet; +20 is.
    fake = world(["UNHEALTHY"] * 10)
    run_watch(fake, deadline_s=10)
    assert fake.exits == [(1, 1020.0)]


def test_the_watch_stops_and_is_joined_before_ray_shuts_down(monkeypatch: pytest.MonkeyPatch):
    """The stop hook (registered with atexit) ends the thread: no serve.status() can run after it,
    so nothing reconnects to Ray from an exiting interpreter."""
    hooks: list = []
    monkeypatch.setattr(worker, "atexit", types.SimpleNamespace(register=hooks.append))
    polls: list[float] = []
    finished = threading.Event()

    def watch(deadline_s: float, wait) -> None:
        assert deadline_s == 7
        while not wait(0.01):
            polls.append(time.monotonic())
        finished.set()

    stop = start_health_watch(7, watch=watch)
    assert hooks == [stop]
    deadline = time.monotonic() + 5
    while not polls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert polls, "the watch never polled"
    stop()  # returns only once the thread has ended
    assert finished.is_set()
    count = len(polls)
    time.sleep(0.05)
    assert len(polls) == count


def test_the_real_watch_returns_when_its_wait_says_stop():
    calls: list[str] = []
    watch_health(10, status=lambda: calls.append("status") or "RUNNING", exit=lambda code: calls.append("exit"),
                 wait=lambda seconds: True)
    assert calls == []


def test_no_exit_while_within_the_deadline(world):
    fake = world(["RUNNING", "UNHEALTHY", "DEPLOYING", None, "UNHEALTHY"])  # 15 s unhealthy at the end
    run_watch(fake, deadline_s=20)
    assert fake.exits == []


def test_healthy_again_resets_the_timer(world):
    # Unhealthy at +10, +15, +20 (10 s <= 12), RUNNING at +25 resets; unhealthy again from +30:
    # +35 (5 s), +40 (10 s), +45 (15 s > 12 s) -> exit at +45, not at +25.
    fake = world(["RUNNING", "UNHEALTHY", "UNHEALTHY", "UNHEALTHY", "RUNNING"] + ["UNHEALTHY"] * 10)
    run_watch(fake, deadline_s=12)
    assert fake.exits == [(1, 1045.0)]


def test_flapping_never_exits(world):
    fake = world(["UNHEALTHY", "UNHEALTHY", "RUNNING"] * 20)
    run_watch(fake, deadline_s=8)
    assert fake.exits == []


def test_any_non_running_status_counts_as_unhealthy(world):
    # None: Serve not reachable; DEPLOY_FAILED, DEPLOYING, UNHEALTHY: not serving.
    fake = world([None, "DEPLOY_FAILED", "DEPLOYING", "UNHEALTHY", "NOT_STARTED"])
    run_watch(fake, deadline_s=12)
    assert fake.exits == [(1, 1020.0)]


# --- make_handler ------------------------------------------------------------------------------------


class FakeResponses:
    def __init__(self, outputs: list[Any], hang: bool = False, fail: Exception | None = None) -> None:
        self.outputs = outputs
        self.hang = hang
        self.fail = fail
        self.cancelled = False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for output in self.outputs:
            yield output
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


class FakeRouter:
    """router.options(stream=True).native.remote(input, id) -> a streaming response."""

    def __init__(self, responses: FakeResponses) -> None:
        self.responses = responses
        self.options_seen: list[dict[str, Any]] = []
        self.calls: list[tuple[Any, str]] = []
        self.native = types.SimpleNamespace(remote=self._remote)

    def options(self, **kwargs: Any) -> FakeRouter:
        self.options_seen.append(kwargs)
        return self

    def _remote(self, job_input: Any, job_id: str) -> FakeResponses:
        self.calls.append((job_input, job_id))
        return self.responses


def test_handler_streams_the_router_outputs():
    outputs = [{"choices": [{"tokens": ["a"]}]}, {"choices": [{"tokens": ["b"]}]}]
    router = FakeRouter(FakeResponses(outputs))
    handler = make_handler(router)
    # The handle is configured lazily, inside the loop that runs the jobs (Serve's throughput
    # mode binds a handle's router to the loop that first uses it), and only once.
    assert router.options_seen == []

    async def main() -> list[Any]:
        first = [item async for item in handler({"id": "job-1", "input": {"prompt": "hi"}})]
        second = [item async for item in handler({"id": "job-2", "input": {"prompt": "yo"}})]
        return first + second

    assert asyncio.run(main()) == outputs + outputs
    assert router.options_seen == [{"stream": True, **HANDLE_SERIALIZATION}]
    assert router.calls == [({"prompt": "hi"}, "job-1"), ({"prompt": "yo"}, "job-2")]
    assert router.responses.cancelled  # always released, even after a normal end


def test_a_failed_router_call_ends_the_job_with_one_sentence():
    """A router replica that dies mid-job: the outputs so far, then an error the job fails with."""
    died = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: ...")
    router = FakeRouter(FakeResponses([{"choices": [{"tokens": ["a"]}]}], fail=died))

    async def main() -> list[Any]:
        return [item async for item in make_handler(router)({"id": "j", "input": {"prompt": "x"}})]

    first, last = asyncio.run(main())
    assert first == {"choices": [{"tokens": ["a"]}]}
    assert last == {"error": "The job's ingress call failed (RuntimeError: The actor died unexpectedly before "
                             "finishing this task.); the job did not finish and can be retried."}
    assert router.responses.cancelled


def test_handler_passes_a_missing_input_and_id_through():
    router = FakeRouter(FakeResponses([]))

    async def main() -> list[Any]:
        return [item async for item in make_handler(router)({})]

    assert asyncio.run(main()) == []
    assert router.calls == [(None, "")]


def test_a_cancelled_job_cancels_the_router_call():
    router = FakeRouter(FakeResponses([{"choices": [{"tokens": ["a"]}]}], hang=True))

    async def main() -> None:
        gen = make_handler(router)({"id": "j", "input": {"prompt": "x"}})
        assert await anext(gen) == {"choices": [{"tokens": ["a"]}]}
        task = asyncio.create_task(anext(gen))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()

    asyncio.run(main())
    assert router.responses.cancelled


def test_a_job_stopped_outside_the_generator_still_cancels_the_router_call():
    """RunPod's stop cancels the job's task; when that lands while the task awaits something else
    (the SDK's upload of an output), the handler's generator is left suspended at its yield."""
    router = FakeRouter(FakeResponses([{"choices": [{"tokens": ["a"]}]}], hang=True))
    uploading = asyncio.Event()

    async def job() -> None:
        gen = make_handler(router)({"id": "j", "input": {"prompt": "x"}})
        async for _ in gen:  # as runpod's handle_job does: each output, then its upload
            uploading.set()
            await asyncio.Event().wait()

    async def main() -> bool:
        task = asyncio.create_task(job())
        await uploading.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return router.responses.cancelled

    assert asyncio.run(main())  # cancelled when the task ended, not at garbage collection
