"""worker-vllm's variables end to end, on one real app (Ray Serve + vLLM on CPU) started the way a
RunPod endpoint with a network volume starts:

- the model is a Hugging Face repo id found only in the volume's cache (BASE_PATH), at the revision
  MODEL_REVISION names (no `main`), with its tokenizer from another repo (TOKENIZER_NAME at
  TOKENIZER_REVISION): a variable that did not reach the engine makes the start fail;
- LORA_MODULES serves an adapter by name; OPENAI_RESPONSE_ROLE names the reply's role;
  RAW_OPENAI_OUTPUT=false yields parsed chunks; TENSOR_PARALLEL_SIZE is unset;
- the model's generation config is greedy (top_k 1): `vllm serve` semantics apply it to OpenAI
  requests, while native jobs get the seed's documented sampling defaults instead.

It also runs two router replicas (ROUTER_REPLICAS=2, ours): one killed, the other keeps serving.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray

from tests.apps import SERVE_PORT
from tests.faults import replica_actor, replica_ids, replica_process, wait_until
from tests.model_fixtures import build_tiny_lora, hf_cache_snapshot

MODEL_REPO = "test-org/tiny-llama"
TOKENIZER_REPO = "test-org/tiny-tokenizer"
SERVED = "parity"
ADAPTER = "tiny-lora"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def volume(tmp_path_factory, tiny_model: Path) -> Path:
    """A network volume whose hub cache has the model (weights only, greedy generation config) at
    revision v2 and the tokenizer at revision t1, as a first worker's downloads would leave it."""
    base = tmp_path_factory.mktemp("runpod-volume")
    hub = base / "huggingface-cache" / "hub"
    weights = tmp_path_factory.mktemp("weights")
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    for item in tiny_model.iterdir():
        shutil.copy(item, (tokenizer if item.name in TOKENIZER_FILES else weights) / item.name)
    shutil.copy(tiny_model / "config.json", tokenizer / "config.json")
    generation = json.loads((weights / "generation_config.json").read_text())
    (weights / "generation_config.json").write_text(json.dumps({**generation, "do_sample": True, "top_k": 1}))
    hf_cache_snapshot(weights, hub, MODEL_REPO, revision="v2")
    hf_cache_snapshot(tokenizer, hub, TOKENIZER_REPO, revision="t1")
    return base


@pytest.fixture(scope="module")
def ping_during_start() -> dict:
    return {"statuses": []}


@pytest.fixture(scope="module")
def app(apps, tiny_model: Path, volume: Path, tmp_path_factory, ping_during_start):
    lora = build_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora") / ADAPTER)
    done = threading.Event()
    url = f"http://127.0.0.1:{SERVE_PORT}/parity/ping"

    def poll() -> None:
        # RunPod's load balancer probes /ping while the worker starts: what does it see?
        while not done.is_set():
            try:
                ping_during_start["statuses"].append(httpx.get(url, timeout=10).status_code)
            except httpx.HTTPError:
                ping_during_start["statuses"].append(None)
            done.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        running = apps.start("parity", {
            "MODEL_NAME": MODEL_REPO,
            "MODEL_REVISION": "v2",
            "TOKENIZER_NAME": TOKENIZER_REPO,
            "TOKENIZER_REVISION": "t1",
            "BASE_PATH": str(volume),
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED,
            "MAX_MODEL_LEN": 512,
            "MAX_CONCURRENCY": 8,
            "LORA_MODULES": json.dumps([{"name": ADAPTER, "path": str(lora)}]),
            "MAX_LORA_RANK": 8,
            "OPENAI_RESPONSE_ROLE": "bot",
            "RAW_OPENAI_OUTPUT": "false",
            # The one media host this app allows (test_an_allowed_media_host_passes_the_ingress).
            "ALLOWED_MEDIA_DOMAINS": "127.0.0.2",
            "ROUTER_REPLICAS": 2,
            # The one app on Serve's own streamed calls (the others: the stream channel).
            "STREAM_TRANSPORT": "serve",
        })
        # Until the first 200 (the proxy may learn the route a moment after serve.run returns).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in ping_during_start["statuses"]:
            time.sleep(0.5)
    finally:
        done.set()
        poller.join(timeout=15)
    yield running
    apps.stop("parity")


def run_job(app, job_input) -> list:
    return list(app.router().options(stream=True).native.remote(job_input, uuid.uuid4().hex))


def test_the_model_loads_from_the_volume_at_its_revision_with_its_tokenizer(app, tiny_tokenizer):
    """Only the volume has the model, only at v2, and without a tokenizer of its own: the engine
    started, so BASE_PATH, MODEL_REVISION, TOKENIZER_NAME and TOKENIZER_REVISION all reached it."""
    with app.http() as http:
        models = http.get("/v1/models").json()
        chat = http.post("/v1/chat/completions", json={
            "model": SERVED, "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 4})
    cards = {card["id"]: card for card in models["data"]}
    assert cards[SERVED]["root"] == MODEL_REPO
    assert chat.status_code == 200, chat.text
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "the quick brown fox"}],
                                                add_generation_prompt=True, tokenize=False)
    assert chat.json()["usage"]["prompt_tokens"] == len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_the_reply_role_is_openai_response_role(app):
    with app.http() as http:
        chat = http.post("/v1/chat/completions", json={
            "model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert chat["choices"][0]["message"]["role"] == "bot"


def test_lora_modules_are_served_by_name(app):
    client = app.client()
    assert {m.id for m in client.models.list().data} == {SERVED, ADAPTER}
    prompt = "the capital of france is"
    base = client.completions.create(model=SERVED, prompt=prompt, max_tokens=12, temperature=0)
    tuned = client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=12, temperature=0)
    assert tuned.model == ADAPTER
    assert tuned.choices[0].text != base.choices[0].text
    # A RunPod job reaches the adapter the same way.
    [job] = run_job(app, {"openai_route": "/v1/completions",
                          "openai_input": {"model": ADAPTER, "prompt": prompt, "max_tokens": 12, "temperature": 0}})
    assert job["choices"][0]["text"] == tuned.choices[0].text


def test_openai_requests_follow_the_generation_config_native_jobs_the_seeds_defaults(app):
    """`vllm serve` applies the model's generation config (greedy here) to OpenAI requests; a native
    job that sets nothing gets the seed's defaults (temperature 1, top_k -1, max_tokens 16)."""
    client = app.client()
    http_texts = {client.completions.create(model=SERVED, prompt="fox", max_tokens=16).choices[0].text
                  for _ in range(3)}
    assert len(http_texts) == 1
    jobs = [run_job(app, {"prompt": "fox", "sampling_params": {"ignore_eos": True}}) for _ in range(4)]
    assert all(batch["usage"]["output"] == 16 for [batch] in jobs)
    native_texts = {batch["choices"][0]["tokens"][0] for [batch] in jobs}
    assert len(native_texts) > 1, "native jobs sampled greedily: the generation config leaked in"


def test_parsed_openai_route_streams_come_in_growing_batches(app):
    """RAW_OPENAI_OUTPUT=false: lists of chunk objects, 1, 3, 9, ... chunks each, no [DONE]."""
    body = {"model": SERVED, "prompt": "fox", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "stream": True}
    batches = run_job(app, {"openai_route": "/v1/completions", "openai_input": body})
    assert all(isinstance(batch, list) for batch in batches)
    sizes = [len(batch) for batch in batches]
    assert sizes[:3] == [1, 3, 9] and sum(sizes) >= 20, sizes
    text = "".join(chunk["choices"][0]["text"] for batch in batches for chunk in batch if chunk["choices"])
    whole = app.client().completions.create(model=SERVED, prompt="fox", max_tokens=20, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text


def test_ping_says_initializing_while_the_engine_loads_then_ready(app, ping_during_start):
    """RunPod load-balancing endpoints: 204 while initializing, 200 once ready, never 503 between."""
    statuses = ping_during_start["statuses"]
    assert 204 in statuses and 200 in statuses, statuses
    answered = statuses[statuses.index(204):]
    assert set(answered) <= {204, 200}, statuses
    with app.http() as http:
        ready = http.get("/ping")
    assert ready.status_code == 200 and ready.json() == {"status": "healthy"}


def test_an_allowed_media_host_passes_the_ingress(app):
    """ALLOWED_MEDIA_DOMAINS opens a host the default refuses: the request reaches vLLM, which
    answers for its text-only model (with ALLOWED_MEDIA_DOMAINS also as its own allow-list)."""
    from tests.test_openai_tiny import MediaServer

    server = MediaServer()
    try:
        body = {"model": SERVED, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": server.url}}]}]}
        with app.http() as http:
            allowed = http.post("/v1/chat/completions", json=body)
            other = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.3/cat.png"}}]}]})
    finally:
        server.close()
    assert "ALLOWED_MEDIA_DOMAINS" not in allowed.text and "non-public" not in allowed.text
    assert allowed.json().get("error", {}).get("param") != "messages[0].content[1].image_url.url", allowed.text
    assert other.status_code == 400 and "ALLOWED_MEDIA_DOMAINS" in other.json()["error"]["message"]


def test_on_serves_stream_transport_streams_match_and_a_disconnect_aborts(app):
    """STREAM_TRANSPORT=serve: streamed parts come as Serve messages, not through the channel; the
    streamed text is the whole answer's, and a client that leaves aborts the request."""
    from ray import serve

    client = app.client()
    body = {"model": SERVED, "messages": [{"role": "user", "content": "Count to ten"}], "max_tokens": 24,
            "temperature": 0}
    whole = client.chat.completions.create(**body).choices[0].message.content
    chunks = client.chat.completions.create(**body, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole

    def engine_running() -> int:
        return serve.get_deployment_handle("EngineServer", app.name).running_requests.remote().result()

    with httpx.Client(timeout=60) as http, http.stream("POST", f"{app.base_url}/v1/completions", json={
            "model": SERVED, "prompt": "fox", "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200 and next(r.iter_lines()).startswith("data: ")
    assert wait_until(lambda: engine_running() == 0, timeout=5, interval=0.1) < 5


def test_with_two_routers_the_other_serves_while_one_is_replaced(app):
    routers = replica_ids(app.name, "Ingress")
    assert len(routers) == 2
    victim, survivor = sorted(routers)
    process = replica_process(app.name, victim, "Ingress")
    ray.kill(replica_actor(app.name, victim, "Ingress"), no_restart=True)
    process.wait(timeout=30)
    chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with app.http() as http:
        answers = [http.post("/v1/chat/completions", json=chat) for _ in range(10)]
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers if r.status_code != 200]
    served_by = {r.headers["x-ingress-replica"] for r in answers}
    assert victim not in served_by and survivor in served_by
    replaced_in = wait_until(lambda: len(replica_ids(app.name, "Ingress") - {victim}) == 2, timeout=120)
    print(f"\n[faults] one of two routers killed: 10/10 requests served meanwhile, replaced in {replaced_in:.0f} s")
