"""The router's request lifecycle on a real Ray cluster and Serve app, with the fake engine
(deployments.engine.fake) in place of vLLM: admission and 429s, aborts on disconnect, deadlines,
error envelopes, native batching. Seconds, not minutes: `make test-fast` runs these and the unit
tests. The same behaviours are proved against real vLLM in the *_tiny and *_smol suites."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from ray import serve

from deployments.app import APP_NAME
from deployments.engine.fake import FakeEngineServer
from deployments.routing.prefix_key import prefix_route_key, rendezvous_choice
from tests.faults import wait_until
from tests.workers import free_port, start_worker, stop_worker, wait_http, worker_env

MODEL = "fake"
# The fake model writes one token every 10 ms: 1000 tokens hold a request ~10 s.
LONG = {"model": MODEL, "prompt": "fox", "max_tokens": 1000}


def start_fast_app(apps, name: str, transport: str, **settings):
    return apps.start(name, {
        "MODEL_NAME": MODEL,
        "MAX_MODEL_LEN": 4096,
        "MAX_CONCURRENCY": 2,
        "MAX_QUEUED_REQUESTS": 1,
        "MAX_N": 4,
        "REQUEST_TIMEOUT": 4,
        "STREAM_TRANSPORT": transport,
        **settings,
    }, engine_class=FakeEngineServer)


@pytest.fixture(scope="module", params=["channel", "serve"])
def app(apps, request):
    """Every lifecycle test runs on both stream transports (STREAM_TRANSPORT)."""
    name = f"fast-{request.param}"
    yield start_fast_app(apps, name, request.param)
    apps.stop(name)


@pytest.fixture(scope="module")
def llm_app(apps):
    # Named as the RunPod worker expects its app (deployments.app.APP_NAME); stopped at the end of
    # the module, before test_runpod_smol starts the real one under that name.
    yield start_fast_app(apps, APP_NAME, "channel")
    apps.stop(APP_NAME)


def engine_running(app) -> int:
    return serve.get_deployment_handle("EngineServer", app.name).running_requests.remote().result()


def in_flight(app) -> int:
    return app.router().admission.remote().result()["in_flight"]


def idle(app) -> None:
    assert wait_until(lambda: engine_running(app) == 0 and in_flight(app) == 0, timeout=10, interval=0.1) < 10


def test_the_openai_client_gets_answers_streamed_or_not(app):
    client = app.client()
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.content == "tok0 tok1 tok2 " and chat.usage.completion_tokens == 3
    stream = client.completions.create(model=MODEL, prompt="fox", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].usage.completion_tokens == 4
    idle(app)


def test_past_the_queue_a_request_gets_a_429_envelope_at_once_and_slots_come_back(app):
    """MAX_CONCURRENCY=2 run, MAX_QUEUED_REQUESTS=1 waits; the next is told at once."""
    idle(app)
    holders = [httpx.Client(timeout=30) for _ in range(2)]
    streams = []
    queued = threading.Thread(target=lambda: httpx.post(f"{app.base_url}/v1/completions", json=LONG, timeout=30))
    try:
        for client in holders:  # each returns once its answer has begun: a slot is taken
            request = client.build_request("POST", f"{app.base_url}/v1/completions", json={**LONG, "stream": True})
            streams.append(client.send(request, stream=True))
        queued.start()
        assert wait_until(lambda: app.router().admission.remote().result()["queued"] == 1, timeout=5, interval=0.05) < 5
        started = time.monotonic()
        rejected = httpx.post(f"{app.base_url}/v1/completions", json=LONG, timeout=10)
        answered_in = time.monotonic() - started
        assert rejected.status_code == 429, rejected.text
        assert rejected.json()["error"]["type"] == "RateLimitError" and rejected.headers["retry-after"] == "1"
        assert answered_in < 1.0
    finally:
        for response in streams:
            response.close()
        for client in holders:
            client.close()
        queued.join()  # it got a slot once the streams closed, and ran into REQUEST_TIMEOUT or finished
    idle(app)  # the closed streams aborted their requests and released their slots


def test_a_client_that_leaves_aborts_its_request_streaming_or_not(app):
    idle(app)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{app.base_url}/v1/completions", json={**LONG, "stream": True}) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        tokens = [json.loads(next(events)[6:])["choices"][0]["text"] for _ in range(3)]
        assert response.status_code == 200 and tokens == ["tok0 ", "tok1 ", "tok2 "]  # it is generating
    started = time.monotonic()
    idle(app)
    assert time.monotonic() - started < 5

    def give_up() -> None:
        try:
            httpx.post(f"{app.base_url}/v1/chat/completions", timeout=0.5,
                       json={"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]})
        except httpx.TimeoutException:
            pass

    waiters = [threading.Thread(target=give_up) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    started = time.monotonic()
    idle(app)
    assert time.monotonic() - started < 5


def test_past_request_timeout_the_caller_gets_a_504_envelope(app):
    answer = httpx.post(f"{app.base_url}/v1/completions", json=LONG, timeout=30)
    assert answer.status_code == 504 and answer.json()["error"]["type"] == "TimeoutError", answer.text
    idle(app)


def test_bad_input_gets_its_envelope_and_the_service_keeps_serving(app):
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        malformed = http.post("/v1/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        too_many = http.post("/v1/completions", json={**LONG, "n": 9})
        fan_out = http.post("/v1/completions", json={**LONG, "prompt": ["a"] * 300, "n": 4})
        unknown = http.post("/v1/completions", json={**LONG, "model": "nope"})
        served = http.post("/v1/completions", json={"model": MODEL, "prompt": "fox", "max_tokens": 2})
        # Runtime LoRA is off unless VLLM_ALLOW_RUNTIME_LORA_UPDATING: a 404 envelope saying so.
        no_lora = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"})
    assert no_lora.status_code == 404 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in no_lora.json()["error"]["message"]
    assert (malformed.status_code, malformed.json()["error"]["param"]) == (400, "body.1")
    assert (too_many.status_code, too_many.json()["error"]["param"]) == (400, "n")
    assert (fan_out.status_code, fan_out.json()["error"]["param"]) == (400, "prompt")
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "NotFoundError")
    assert served.status_code == 200
    idle(app)


def test_a_native_job_streams_in_batches_that_grow(app):
    native = app.router().options(stream=True).native
    batches = list(native.remote({"prompt": "fox", "stream": True, "sampling_params": {"max_tokens": 40}},
                                 uuid.uuid4().hex))
    sizes = [len(batch["choices"][0]["tokens"]) for batch in batches]
    assert sum(sizes) == 40 and sizes[0] == 1 and sizes[:3] == [1, 3, 9], sizes
    assert batches[-1]["usage"]["output"] == 40
    idle(app)


@pytest.fixture(scope="module")
def local_api(llm_app, tmp_path_factory):
    """The RunPod worker (`python -m handler`, the real runpod SDK's local test API) on this app."""
    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "local-api.log"
    process = start_worker(["--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
                           worker_env(), log)
    try:
        wait_http(f"http://127.0.0.1:{port}/docs", process, log)
        yield httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    finally:
        stop_worker(process)


def test_runpod_jobs_through_the_worker(llm_app, local_api):
    app = llm_app
    job_input = {"prompt": "fox", "sampling_params": {"max_tokens": 3}}
    [whole] = local_api.post("/runsync", json={"input": job_input}).json()["output"]
    assert whole["choices"][0]["tokens"] == ["tok0 tok1 tok2 "] and whole["usage"]["output"] == 3
    job = local_api.post("/run", json={"input": {"prompt": "fox", "stream": True,
                                                 "sampling_params": {"max_tokens": 20}}}).json()
    stream = local_api.post(f"/stream/{job['id']}").json()
    assert stream["status"] == "COMPLETED", stream
    assert [len(item["output"]["choices"][0]["tokens"]) for item in stream["stream"]] == [1, 3, 9, 7]
    bad = local_api.post("/runsync", json={"input": {"prompt": "x", "sampling_params": {"temprature": 1}}}).json()
    assert "temprature" in bad["output"][-1]["error"]
    idle(app)


def test_the_one_shot_local_test_runs_its_job_and_exits(llm_app, tmp_path):
    """`python -m handler --test_input ...` (runpod's local test) prints the job's result and exits 0,
    connecting to Ray once: nothing may reconnect from the exiting interpreter (that hung once)."""
    job = {"input": {"prompt": "fox", "sampling_params": {"max_tokens": 5}}}
    done = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps(job)], cwd=tmp_path,
                          env=worker_env(), capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "tok0 tok1 tok2 tok3 tok4 " in output and "Local testing complete" in output
    assert output.count("Connecting to existing Ray cluster") == 1, output[-3000:]
    idle(llm_app)


# --- ROUTING=prefix on two engine replicas ------------------------------------------------------------

@pytest.fixture(scope="module")
def routed_app(apps):
    yield start_fast_app(apps, "fast-routed", "serve", NUM_REPLICAS=2, MAX_CONCURRENCY=8, MAX_QUEUED_REQUESTS=8)
    apps.stop("fast-routed")


def test_prefix_routing_keeps_conversations_sessions_and_jobs_on_one_replica(routed_app):
    app = routed_app
    system = {"role": "system", "content": "Shared instructions for every conversation. " * 10}
    placed = set()
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        for conversation in range(12):
            messages = [system, {"role": "user", "content": f"question {conversation}"}]
            served = set()
            for turn in range(3):
                response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                                   "max_tokens": 2})
                assert response.status_code == 200, response.text
                served.add(response.headers["x-engine-replica"])
                messages = [*messages, {"role": "assistant", "content": "tok0 tok1 "},
                            {"role": "user", "content": f"turn {turn}"}]
            assert len(served) == 1, (conversation, served)
            placed |= served
        assert len(placed) == 2  # conversations spread over both replicas
        pinned = {http.post("/v1/completions", json={"model": MODEL, "prompt": f"other {i}", "max_tokens": 1},
                            headers={"x-session-id": "s-1"}).headers["x-engine-replica"] for i in range(8)}
        assert len(pinned) == 1
        spread = {http.post("/v1/completions", json={"model": MODEL, "prompt": f"other {i}", "max_tokens": 1}
                            ).headers["x-engine-replica"] for i in range(16)}
        assert len(spread) == 2  # the same prompts without the session: their own replicas


def test_new_conversations_go_to_the_least_loaded_replica_and_stay_there(routed_app):
    """Four conversations that rendezvous hashing alone would all put on one replica, started while
    the earlier ones still stream: two land on each replica, and each one's next turn follows it."""
    app = routed_app
    system = {"role": "system", "content": f"Instructions {uuid.uuid4().hex}. " * 8}
    with httpx.Client(base_url=app.base_url, timeout=60) as http:
        replicas = sorted({http.post("/v1/completions", json={"model": MODEL, "prompt": f"probe {i}", "max_tokens": 1}
                                     ).headers["x-engine-replica"] for i in range(16)})
        assert len(replicas) == 2
        # Conversations whose opening hashes to the same replica (what the router did before it
        # looked at load): the first 4 of those.
        openings = [[system, {"role": "user", "content": f"question {i}"}] for i in range(64)]
        same = [m for m in openings
                if rendezvous_choice(prefix_route_key({"messages": m}).anchor, replicas) == replicas[0]][:4]
        assert len(same) == 4
        placed = []
        with contextlib.ExitStack() as streams:
            for messages in same:  # each routed (its headers back) before the next starts
                response = streams.enter_context(http.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": messages, "max_tokens": 1000, "stream": True}))
                assert response.status_code == 200
                placed.append(response.headers["x-engine-replica"])
            assert sorted(placed) == sorted(replicas * 2), placed
            for messages, replica in zip(same, placed, strict=True):
                follow_up = [*messages, {"role": "assistant", "content": "tok0 "}, {"role": "user", "content": "and?"}]
                response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": follow_up,
                                                                   "max_tokens": 2})
                assert response.headers["x-engine-replica"] == replica
    idle(app)  # the streams closed: the engines abort them


# --- several models in one app (MODELS) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def models_app(apps):
    # The second in Ray Serve LLM's llm_configs shape, as its users' configs read.
    yield start_fast_app(apps, "fast-models", "channel", MODEL_NAME=None, MODELS=json.dumps([
        {"MODEL_NAME": "fake-a"},
        {"model_loading_config": {"model_id": "fake-b", "model_source": "org/fake-b"},
         "engine_kwargs": {"max_model_len": 64}},
    ]))
    apps.stop("fast-models")


def test_requests_and_jobs_reach_the_model_they_name(models_app):
    app = models_app
    assert set(serve.status().applications["fast-models"].deployments) == {
        "Ingress", "EngineServer-fake-a", "EngineServer-fake-b"}
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        def complete(**body):
            return http.post("/v1/completions", json={"prompt": "fox", "max_tokens": 2, **body})

        assert complete(model="fake-a").json()["model"] == "fake-a"
        assert complete(model="fake-b").json()["model"] == "fake-b"
        assert complete().json()["model"] == "fake-a"  # no model: the first
        unknown = complete(model="fake-c")
        assert (unknown.status_code, unknown.json()["error"]["param"]) == (404, "model")
        # Each model's own limits: fake-b's context is 64 tokens.
        assert complete(model="fake-a", max_tokens=100).status_code == 200
        assert complete(model="fake-b", max_tokens=100).json()["error"]["param"] == "max_tokens"
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["fake-a", "fake-b"]
        assert http.get("/v1/models/fake-b").json()["id"] == "fake-b"
        assert http.get("/health").status_code == 200
    router = app.router().options(stream=True)
    [job] = list(router.native.remote({"prompt": "fox", "model": "fake-b", "sampling_params": {"max_tokens": 2}}, "j1"))
    assert "error" not in job, job
    [routed] = list(router.native.remote({"openai_route": "/v1/completions",
                                          "openai_input": {"model": "fake-b", "prompt": "fox", "max_tokens": 2}}, "j2"))
    assert routed["model"] == "fake-b"
    [listed] = list(router.native.remote({"openai_route": "/v1/models"}, "j4"))
    assert [m["id"] for m in listed["data"]] == ["fake-a", "fake-b"]
    [refused] = list(router.native.remote({"prompt": "fox", "model": "fake-c"}, "j3"))
    assert "fake-c" in refused["error"]
