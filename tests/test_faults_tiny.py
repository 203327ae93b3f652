"""Client disconnects and engine death on the single-replica tiny app: the engine aborts what nobody
reads, callers see errors (never a hang), and the service recovers by itself."""

from __future__ import annotations

import concurrent.futures as futures
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from ray import serve

from deployments.engine.process_title import ANCHOR
from tests.apps import SERVE_PORT
from tests.faults import (
    drain,
    engine_process_pid,
    kill_engine_process,
    open_stream,
    replica_actor,
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


def served_by_another_replica(app, replica: str) -> bool:
    """A request succeeds, answered by an engine replica other than `replica` (its replacement)."""
    try:
        r = httpx.post(f"{app.base_url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "fox", "max_tokens": 2})
        return r.status_code == 200 and r.headers.get("x-engine-replica") != replica
    except httpx.HTTPError:
        return False


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


def small_request_latency(app) -> float:
    started = time.monotonic()
    r = httpx.post(f"{app.base_url}/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "fox"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    return time.monotonic() - started


def test_non_streaming_requests_whose_clients_left_are_aborted(app):
    """24 non-streaming requests of every generating route, most of them many seconds of engine
    work, whose clients give up after 1 s, and a RunPod job cancelled by its caller: the engine
    drops them all within 5 s (as `vllm serve` does), and the next request is about as fast as on
    an idle engine."""
    idle = min(small_request_latency(app) for _ in range(3))
    long = {"model": "tiny", "max_tokens": 480, "ignore_eos": True}
    bodies = [
        ("/v1/chat/completions", {**long, "messages": [{"role": "user", "content": "fox"}], "n": 16}),
        ("/v1/completions", {**long, "prompt": "fox", "n": 16}),
        ("/v1/responses", {"model": "tiny", "input": "fox", "max_output_tokens": 480}),
        ("/v1/messages", {"model": "tiny", "max_tokens": 480, "messages": [{"role": "user", "content": "fox"}]}),
    ] * 6

    def abandoned(path: str, body: dict) -> str:
        try:
            r = httpx.post(f"{app.base_url}{path}", json=body, timeout=1.0)
            return f"answered {r.status_code}"
        except httpx.TimeoutException:
            return "gave up"

    # And a RunPod job (non-streaming) whose caller cancels it: the worker's handle call ends.
    job = app.router().options(stream=True).native.remote(
        {"prompt": "fox", "sampling_params": {"max_tokens": 480, "ignore_eos": True, "n": 16}}, uuid.uuid4().hex)
    with futures.ThreadPoolExecutor(len(bodies)) as pool:
        outcomes = list(pool.map(lambda pb: abandoned(*pb), bodies))
    job.cancel()
    left_at = time.monotonic()
    assert outcomes.count("gave up") >= 12, outcomes  # the n=16 ones at least outlast the client
    drained_in = wait_until(lambda: engine_running(app) == 0, timeout=5, interval=0.1)
    after = small_request_latency(app)
    print(f"\n[faults] 24 abandoned non-streaming requests ({outcomes.count('gave up')} gave up): "
          f"engine idle {drained_in + time.monotonic() - left_at - after:.1f} s after the clients left; "
          f"next request {after * 1000:.0f} ms (idle {idle * 1000:.0f} ms)")
    assert after < 2 * idle + 0.25


def unread_stream(app, body: dict) -> socket.socket:
    """A streaming request whose client never reads a byte of the answer (a tiny receive buffer)."""
    payload = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", SERVE_PORT))
    sock.sendall(f"POST /{app.name}/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_streams_nobody_reads_cost_bounded_memory_and_give_their_slots_back(app):
    """16 streams whose clients never read, each asking for ~12 MB of output (n=128 x 480 tokens):
    the router's memory stays bounded, the engine aborts them, their slots come back, and other
    clients are served meanwhile. On this box the sockets' buffers (a few MB per connection on
    loopback) take in what the tiny model writes before REQUEST_TIMEOUT, which is then what ends
    them; STREAM_BUFFER_BYTES and STREAM_STALL_TIMEOUT are exercised over real sockets in
    test_stream_channel_unit and test_ingress_unit."""
    settings = app.settings
    (router,) = replica_ids(app.name, "Ingress")
    router_process = replica_process(app.name, router, "Ingress")
    rss_before = router_process.memory_info().rss
    body = {"model": "tiny", "prompt": "fox", "max_tokens": 480, "ignore_eos": True, "n": 128, "stream": True}
    sockets = [unread_stream(app, body) for _ in range(16)]
    try:
        peak = rss_before

        def aborted() -> bool:
            nonlocal peak
            peak = max(peak, router_process.memory_info().rss)
            return engine_running(app) == 0

        wait_until(lambda: engine_running(app) > 0, timeout=30, interval=0.1)
        aborted_in = wait_until(aborted, timeout=60, interval=0.2)
        admission = app.router().admission
        # Other clients are served while the unread streams still hold their connections (and,
        # until STREAM_STALL_TIMEOUT or their relay's end frees them, their slots).
        served = httpx.post(f"{app.base_url}/v1/completions", timeout=60,
                            json={"model": "tiny", "prompt": "fox", "max_tokens": 4})
        assert served.status_code == 200, served.text
        freed_in = wait_until(lambda: admission.remote().result()["in_flight"] == 0,
                              timeout=settings.STREAM_STALL_TIMEOUT * 1.25 + 15, interval=0.5)
    finally:
        for sock in sockets:
            sock.close()
    growth_mib = (peak - rss_before) / 2**20
    bound_mib = 16 * settings.STREAM_BUFFER_BYTES / 2**20 + 32
    print(f"\n[faults] 16 unread streams: engine aborted them in {aborted_in:.1f} s, slots back in "
          f"{aborted_in + freed_in:.1f} s, router RSS +{growth_mib:.1f} MiB (bound {bound_mib:.0f})")
    assert growth_mib < bound_mib
    assert httpx.post(f"{app.base_url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "fox", "max_tokens": 4}).status_code == 200


def test_a_router_killed_mid_stream_cuts_it_and_every_caller_gets_an_answer(app):
    """The single router replica dies under a stream: the stream is cut (no end chunk, no [DONE]),
    callers meanwhile get a 503 envelope or are held until Serve's new router serves them (never
    a text/plain body, a 404 or a hang), the engine aborts the orphaned request, and new requests
    succeed on the new router."""
    (router,) = replica_ids(app.name, "Ingress")
    process = replica_process(app.name, router, "Ingress")
    actor = replica_actor(app.name, router, "Ingress")
    sock = unread_stream(app, {"model": "tiny", "prompt": "fox", "max_tokens": 480, "ignore_eos": True,
                               "n": 128, "stream": True})
    answers: list[tuple[int, str, str | None, dict | None]] = []
    stop = threading.Event()

    def call() -> None:
        while not stop.is_set():
            try:
                r = httpx.post(f"{app.base_url}/v1/completions", timeout=60,
                               json={"model": "tiny", "prompt": "fox", "max_tokens": 2})
                body = r.json() if r.status_code != 200 else None
                answers.append((r.status_code, r.headers.get("content-type", ""),
                                r.headers.get("x-ingress-replica"), body))
            except httpx.HTTPError as exc:  # a request on its way as the replica died: told at once
                answers.append((0, type(exc).__name__, None, None))
            time.sleep(0.05)

    try:
        wait_until(lambda: engine_running(app) > 0, timeout=30, interval=0.1)
        callers = [threading.Thread(target=call) for _ in range(3)]
        for caller in callers:
            caller.start()
        ray.kill(actor, no_restart=True)
        killed_at = time.monotonic()
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
        cut_in = time.monotonic() - killed_at
        process.wait(timeout=30)
        recovered_in = wait_until(lambda: any(a[2] not in (None, router) for a in answers[-3:]),
                                  timeout=120, interval=0.5)
        stop.set()
        for caller in callers:
            caller.join(timeout=90)
    finally:
        stop.set()
        sock.close()
    assert b"data: [DONE]" not in received and not received.endswith(b"0\r\n\r\n")
    assert cut_in < 10
    wrong = [a for a in answers if a[0] not in (0, 200, 503)
             or (a[0] == 503 and (a[1] != "application/json" or a[3]["error"]["code"] != 503))]
    assert not wrong, wrong
    assert wait_until(lambda: engine_running(app) == 0, timeout=30, interval=0.2) < 30
    counts = {status: sum(1 for a in answers if a[0] == status) for status in {a[0] for a in answers}}
    print(f"\n[faults] router killed mid-stream: cut in {cut_in:.2f} s, a new router served "
          f"{recovered_in:.0f} s later; callers meanwhile: {counts} (0: connection closed)")


def test_engine_core_is_forked_from_a_preloaded_fork_server_with_the_replica_environment(app):
    """deployments.engine.core_process: the engine core skips spawn's second vLLM import, yet runs
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
    # Each started with deployments.engine.process_title's anchor as its first variable, whatever order
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

    recovered_in = wait_until(lambda: served_by_another_replica(app, replica), timeout=240, interval=2)
    print(f"\n[faults] engine process killed: stream ended in {ended_in:.1f} s, "
          f"service recovered in {recovered_in + ended_in:.0f} s")
    assert httpx.get(f"{app.base_url}/health", timeout=10).status_code == 200


def test_a_hung_engine_ends_requests_with_504_turns_unhealthy_and_is_replaced(app):
    """The engine core stops (SIGSTOP) without dying: requests end with a 504 at REQUEST_TIMEOUT
    (their calls cancelled, as a disconnect's are: vLLM aborts them); /health says 503 at once;
    Serve's health check (the engine core must answer a probe within 20 s) has the replica
    replaced; the new one serves."""
    timeout = app.settings.REQUEST_TIMEOUT
    (replica,) = replica_ids(app.name)
    core = psutil.Process(engine_process_pid(app.name, replica))
    health = f"{app.base_url}/health"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "fox"}], "max_tokens": 8}
    core.suspend()
    try:
        stopped_at = time.monotonic()
        with futures.ThreadPoolExecutor(3) as pool:
            streamed = pool.submit(httpx.post, f"{app.base_url}/v1/chat/completions", timeout=timeout + 60,
                                   json={**chat, "stream": True})
            whole = pool.submit(httpx.post, f"{app.base_url}/v1/chat/completions", timeout=timeout + 60, json=chat)
            job = pool.submit(lambda: list(app.router().options(stream=True).native.remote(
                {"prompt": "fox", "sampling_params": {"max_tokens": 8}}, uuid.uuid4().hex)))
            unhealthy_in = wait_until(lambda: httpx.get(health, timeout=30).status_code == 503, timeout=15)
            for response in (streamed.result(), whole.result()):
                assert response.status_code == 504, response.text
                error = response.json()["error"]
                assert error["code"] == 504 and "REQUEST_TIMEOUT" in error["message"]
            [output] = job.result()
            assert "REQUEST_TIMEOUT" in output["error"]
            ended_in = time.monotonic() - stopped_at
        assert timeout - 1 <= ended_in < timeout + 10

        recovered_in = wait_until(lambda: served_by_another_replica(app, replica), timeout=300, interval=2)
    finally:
        if core.is_running():  # Serve's replacement of the replica usually took it along
            core.kill()  # a stopped process takes SIGKILL; it would otherwise hold its memory
    print(f"\n[faults] engine hung: /health 503 in {unhealthy_in:.1f} s, requests 504 in {ended_in:.1f} s, "
          f"replaced and serving in {recovered_in + ended_in:.0f} s")
    assert httpx.get(health, timeout=10).status_code == 200
