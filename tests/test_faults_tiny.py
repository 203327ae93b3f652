"""Client disconnects and engine death on the single-replica tiny app: the engine aborts what nobody
reads, callers see errors (never a hang), and the service recovers by itself."""

from __future__ import annotations

import concurrent.futures as futures
import time
from pathlib import Path

import httpx
import psutil
import pytest
from ray import serve

from deployments.process_title import ANCHOR
from tests.faults import (
    drain,
    engine_process_pid,
    kill_engine_process,
    open_stream,
    replica_ids,
    replica_process,
    sse_lines,
    vllm_processes,
    wait_until,
)


@pytest.fixture(scope="module")
def app(tiny_app):
    return tiny_app


def engine_running(app) -> int:
    return serve.get_deployment_handle("EngineServer", app.name).running_requests.remote().result()


def test_stream_lines_split_only_where_sse_does():
    """A token's text may hold U+0085 or U+2028 raw inside the JSON; httpx's iter_lines() would cut the
    event there (it follows str.splitlines) and the fault tests' JSON parse would fail for no fault."""
    event = 'data: {"text":"a\u2028b\x85c"}'.encode()
    parts = [event[:12], event[12:] + b"\r\n\r", b"\ndata: [DONE]\n\n"]
    response = httpx.Response(200, content=iter(parts))
    assert list(sse_lines(response)) == [event.decode(), "", "data: [DONE]", ""]


def test_client_disconnect_aborts_the_request_in_the_engine(app):
    client, response, _ = open_stream(app.base_url, {}, max_tokens=480)
    assert engine_running(app) == 1
    response.close()
    client.close()
    aborted_in = wait_until(lambda: engine_running(app) == 0, timeout=5, interval=0.1)
    print(f"\n[faults] disconnect -> engine abort in {aborted_in:.2f} s")


def test_engine_core_is_forked_from_a_preloaded_fork_server_with_the_replica_environment(app):
    """deployments.engine_core_process: the engine core skips spawn's second vLLM import, yet runs
    with the environment vLLM set for it in the replica after the fork server had started."""
    (replica,) = replica_ids(app.name)
    replica_proc = replica_process(app.name, replica)
    core = psutil.Process(engine_process_pid(app.name, replica))
    forkserver = core.parent()
    assert "multiprocessing.forkserver" in " ".join(forkserver.cmdline())
    assert forkserver.parent().pid == replica_proc.pid
    # vLLM's CPU platform sets LOCAL_WORLD_SIZE in the replica while it builds the engine config,
    # after the fork server started: the fork server's environment lacks it, the engine core's
    # workers (spawned by the engine core, from its environment) have it.
    assert "LOCAL_WORLD_SIZE" not in forkserver.environ()
    (worker,) = vllm_processes(core.children(), "Worker")
    assert worker.environ()["LOCAL_WORLD_SIZE"] == "1"
    # Each started with deployments.process_title's anchor as its first variable, whatever order
    # Ray gave the replica's environment: what keeps vLLM's titles (found above) from being lost.
    for process in (forkserver, core, worker):
        first = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"=", 1)[0].decode()
        assert first == ANCHOR, (process.pid, first)


def test_engine_process_death_fails_in_flight_requests_and_the_app_recovers(app):
    (replica,) = replica_ids(app.name)  # the tiny app has one engine replica
    engine_pid = engine_process_pid(app.name, replica)
    client, response, lines = open_stream(app.base_url, {}, max_tokens=480)
    assert response.headers["x-engine-replica"] == replica
    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{app.base_url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "fox", "max_tokens": 480, "ignore_eos": True})
        time.sleep(0.05)  # the non-streaming request reaches the engine; the stream is mid-way
        killed_at = time.monotonic()
        kill_engine_process(engine_pid)
        tokens, error, done = drain(lines)  # must end, not hang (30 s read timeout)
        ended_in = time.monotonic() - killed_at
        non_streaming = pending.result()
    client.close()
    assert error is not None, f"the stream ended without an error event ({tokens} tokens, [DONE]: {done})"
    assert ended_in < 10
    assert non_streaming.status_code in (500, 503)
    assert non_streaming.json()["error"]["code"] == non_streaming.status_code
    # While the replica is being replaced, callers get a 503 envelope, not a hang.
    during = httpx.post(f"{app.base_url}/v1/completions", timeout=60,
                        json={"model": "tiny", "prompt": "fox", "max_tokens": 2})
    assert during.status_code in (200, 503), during.text

    def serves() -> bool:
        try:
            r = httpx.post(f"{app.base_url}/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "fox", "max_tokens": 2})
            return r.status_code == 200 and r.headers.get("x-engine-replica") != replica
        except httpx.HTTPError:
            return False

    recovered_in = wait_until(serves, timeout=240, interval=2)
    print(f"\n[faults] engine process killed: stream ended in {ended_in:.1f} s, "
          f"service recovered in {recovered_in + ended_in:.0f} s")
    assert httpx.get(f"{app.base_url}/health", timeout=10).status_code == 200
