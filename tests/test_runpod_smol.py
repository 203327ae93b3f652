"""The RunPod worker end to end on the SmolLM2 demo model: the runpod SDK's local test API (every
request shape of worker-vllm's README) and its production worker loop against a stand-in queue.
The app serves the tiny model beside it (MODELS): requests and jobs pick one by `model`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import ray
from ray import serve

from configs.settings import DEMO_MODEL_SERVED_NAME
from deployments.app import engine_deployment_names
from tests.faults import replica_actor, replica_ids, wait_until
from tests.runpod_queue import RunPodQueue
from tests.workers import ROOT, free_port, start_worker, stop_worker, wait_http, worker_env

ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"

CAPITAL = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


TINY = "tiny"
SMOL_ENGINE, TINY_ENGINE = engine_deployment_names([DEMO_MODEL_SERVED_NAME, TINY])


@pytest.fixture(scope="module")
def smol_app(apps, tiny_model):
    # MODEL_NAME unset: the embedded demo model, first, so jobs that name no model get it. The
    # tiny model beside it with its own context length. The worker attaches to the app named "llm".
    return apps.start("llm", {"MAX_MODEL_LEN": 2048, "MAX_CONCURRENCY": 32, "MODELS": json.dumps([
        {}, {"MODEL_NAME": str(tiny_model), "OPENAI_SERVED_MODEL_NAME_OVERRIDE": TINY, "MAX_MODEL_LEN": 512}])})


@pytest.fixture(scope="module")
def smol_tokenizer(smol_app):
    from transformers import AutoTokenizer

    from deployments.engine.demo_model import ensure_demo_model

    return AutoTokenizer.from_pretrained(str(ensure_demo_model()))


def engine_running(app_name: str = "llm") -> int:
    return serve.get_deployment_handle(SMOL_ENGINE, app_name).running_requests.remote().result()


@pytest.fixture(scope="module")
def local_api(smol_app, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "local-api.log"
    # Started through the Docker image's entrypoint script, exactly as the image starts it.
    process = start_worker(["--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
                           worker_env(PYTHON=sys.executable), log, command=[str(ENTRYPOINT)])
    try:
        wait_http(f"http://127.0.0.1:{port}/docs", process, log)
        yield httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    finally:
        stop_worker(process)


def text_of(outputs: list) -> str:
    return "".join(t for out in outputs for t in out["choices"][0]["tokens"])


def test_demo_model_knows_the_capital_of_france_over_http(smol_app):
    answer = smol_app.client().chat.completions.create(
        model=DEMO_MODEL_SERVED_NAME, messages=CAPITAL, temperature=0, max_tokens=32
    )
    assert "Paris" in answer.choices[0].message.content
    # A served name with a slash in it is one model id to models.retrieve.
    assert smol_app.client().models.retrieve(DEMO_MODEL_SERVED_NAME).id == DEMO_MODEL_SERVED_NAME


def test_readme_chat_example(local_api, smol_tokenizer):
    body = {"input": {"messages": CAPITAL, "sampling_params": {"max_tokens": 100, "temperature": 0}}}
    result = local_api.post("/runsync", json=body).json()
    assert result["status"] == "COMPLETED", result
    [output] = result["output"]
    assert "Paris" in output["choices"][0]["tokens"][0]
    prompt = smol_tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=False)
    assert output["usage"]["input"] == len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    generated = smol_tokenizer(output["choices"][0]["tokens"][0], add_special_tokens=False)["input_ids"]
    assert abs(output["usage"]["output"] - len(generated)) <= 1  # EOS counts as a token but has no text


def test_readme_streaming_chat_example_grows_batches(local_api):
    body = {"input": {"messages": [{"role": "user", "content": "Write a short story about a robot."}],
                      "sampling_params": {"max_tokens": 120, "temperature": 0.8, "ignore_eos": True},
                      "stream": True}}
    job = local_api.post("/run", json=body).json()
    stream = local_api.post(f"/stream/{job['id']}").json()
    assert stream["status"] == "COMPLETED"
    outputs = [item["output"] for item in stream["stream"]]
    assert [len(o["choices"][0]["tokens"]) for o in outputs] == [1, 3, 9, 27, 50, 30]
    assert outputs[-1]["usage"]["output"] == 120


def test_readme_text_generation_example(local_api, smol_tokenizer):
    body = {"input": {"prompt": "The capital of France is", "sampling_params": {"max_tokens": 64, "temperature": 0}}}
    [output] = local_api.post("/runsync", json=body).json()["output"]
    assert output["usage"]["input"] == len(smol_tokenizer("The capital of France is")["input_ids"])
    assert output["choices"][0]["tokens"][0]


def test_readme_list_models_example(local_api):
    [models] = local_api.post("/runsync", json={"input": {"openai_route": "/v1/models"}}).json()["output"]
    assert [m["id"] for m in models["data"]] == [DEMO_MODEL_SERVED_NAME, TINY]


def test_the_tiny_model_serves_beside_the_demo_model_requests_and_jobs_pick_by_model(local_api, smol_app):
    assert {SMOL_ENGINE, TINY_ENGINE} < set(serve.status().applications["llm"].deployments)
    client = smol_app.client()
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL_SERVED_NAME, TINY]
    assert client.models.retrieve(TINY).id == TINY
    params = {"max_tokens": 8, "temperature": 0}
    tiny = client.completions.create(model=TINY, prompt="the fox", **params)
    smol = client.completions.create(model=DEMO_MODEL_SERVED_NAME, prompt="the fox", **params)
    assert tiny.model == TINY and smol.model == DEMO_MODEL_SERVED_NAME
    assert tiny.choices[0].text != smol.choices[0].text
    with smol_app.http() as http:
        # Each model's own context: 512 tokens for the tiny one, 2048 for the demo model.
        too_long = http.post("/v1/completions", json={"model": TINY, "prompt": "fox", "max_tokens": 1000})
        assert (too_long.status_code, too_long.json()["error"]["param"]) == (400, "max_tokens")
        unknown = http.post("/v1/completions", json={"model": "nope", "prompt": "fox", "max_tokens": 2})
        assert (unknown.status_code, unknown.json()["error"]["param"]) == (404, "model")
    # RunPod jobs: worker-vllm's native input and an openai_route job name the model the same way.
    native = local_api.post("/runsync", json={"input": {"prompt": "the fox", "model": TINY,
                                                        "sampling_params": params}}).json()
    assert native["status"] == "COMPLETED", native
    assert native["output"][0]["choices"][0]["tokens"][0] == tiny.choices[0].text
    [routed] = local_api.post("/runsync", json={"input": {"openai_route": "/v1/completions", "openai_input": {
        "model": TINY, "prompt": "the fox", **params}}}).json()["output"]
    assert routed["model"] == TINY and routed["choices"][0]["text"] == tiny.choices[0].text
    # A model none serves: the job's error (runpod 1.10's local API reports it as COMPLETED; the
    # production loop marks it FAILED).
    failed = local_api.post("/runsync", json={"input": {"prompt": "fox", "model": "nope"}}).json()
    assert "`nope` does not exist" in failed["output"][-1]["error"]


def test_openai_route_chat_streaming_and_not(local_api):
    body = {"model": DEMO_MODEL_SERVED_NAME, "messages": CAPITAL, "max_tokens": 20, "temperature": 0}
    [whole] = local_api.post("/runsync", json={"input": {"openai_route": "/v1/chat/completions",
                                                         "openai_input": body}}).json()["output"]
    assert "Paris" in whole["choices"][0]["message"]["content"]
    streamed = local_api.post("/runsync", json={"input": {"openai_route": "/v1/chat/completions",
                                                          "openai_input": {**body, "stream": True}}}).json()
    events = "".join(streamed["output"])
    assert events.startswith("data: ") and events.rstrip().endswith("data: [DONE]")


def test_todays_worker_vllm_route_body_job(local_api):
    body = {"messages": CAPITAL, "max_tokens": 20, "temperature": 0}
    [whole] = local_api.post("/runsync", json={"input": {"route": "/v1/chat/completions", "body": body}}).json()[
        "output"]
    assert "Paris" in whole["choices"][0]["message"]["content"]
    assert whole["model"] == DEMO_MODEL_SERVED_NAME


def test_invalid_job_names_the_field(local_api):
    result = local_api.post("/runsync", json={"input": {"prompt": "x", "sampling_params": {"temprature": 1}}}).json()
    # runpod 1.10's local API reports a yielded error as COMPLETED; the production loop marks it FAILED.
    assert "temprature" in result["output"][-1]["error"]


def test_handler_and_http_give_the_same_greedy_text(local_api, smol_app):
    params = {"max_tokens": 40, "temperature": 0}
    [output] = local_api.post("/runsync", json={"input": {"messages": CAPITAL, "sampling_params": params}}).json()[
        "output"]
    http = smol_app.client().chat.completions.create(model=DEMO_MODEL_SERVED_NAME, messages=CAPITAL, **params)
    assert output["choices"][0]["tokens"][0] == http.choices[0].message.content


def test_one_shot_local_test_runs_the_sample_job(smol_app, tmp_path):
    """`python -m handler` with test_input.json (here --test_input) runs one job and exits, as runpod does."""
    job = json.loads((ROOT / "test_input.json").read_text())
    done = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps(job)], cwd=tmp_path,
                          env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Paris" in done.stdout + done.stderr
    # Nothing touched Ray after its exit hook (a second connect is how the exit once hung).
    assert (done.stdout + done.stderr).count("Connecting to existing Ray cluster") == 1, done.stderr[-3000:]
    bad = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps({"input": {"prompt": 3}})],
                         cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "prompt" in bad.stdout + bad.stderr


# --- the production worker loop -------------------------------------------------------------------


@pytest.fixture(scope="module")
def queue_worker(smol_app, tmp_path_factory):
    queue = RunPodQueue()
    log = tmp_path_factory.mktemp("worker") / "production.log"
    process = start_worker([], worker_env(MAX_CONCURRENCY="3", **queue.worker_env()), log)
    try:
        yield queue, process, log
    finally:
        stop_worker(process)
        queue.close()


def test_production_loop_runs_jobs_concurrently_and_fails_bad_ones(queue_worker):
    queue, process, log = queue_worker
    good = [f"good-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    bad = {f"bad-a-{uuid.uuid4().hex[:6]}": ({"sampling_params": {"max_tokens": 4}}, "prompt"),
           f"bad-b-{uuid.uuid4().hex[:6]}": ({"prompt": "x", "sampling_params": {"best_of": 1, "n": 2}}, "best_of")}
    for job_id in good:
        queue.submit(job_id, {"prompt": "Tell me about Paris.",
                              "sampling_params": {"max_tokens": 48, "ignore_eos": True}})
    for job_id, (job_input, _) in bad.items():
        queue.submit(job_id, job_input)
    for job_id in good:
        result = queue.wait_result(job_id)
        assert "error" not in result, result
        assert result["output"][0]["usage"]["output"] == 48
    for job_id, (_, field) in bad.items():
        result = queue.wait_result(job_id)
        assert "output" not in result and field in result["error"], result  # RunPod marks this FAILED
    assert 2 <= queue.max_in_progress <= 3
    assert process.poll() is None, log.read_text()[-3000:]


def test_production_loop_streams_partial_results_in_order(queue_worker):
    queue, _, _ = queue_worker
    job_id = f"stream-{uuid.uuid4().hex[:6]}"
    queue.submit(job_id, {"prompt": "Once upon a time", "stream": True,
                          "sampling_params": {"max_tokens": 40, "ignore_eos": True, "temperature": 0}})
    result = queue.wait_result(job_id)
    streamed = [part["output"] for part in queue.streams[job_id]]
    assert [len(o["choices"][0]["tokens"]) for o in streamed] == [1, 3, 9, 27]
    assert result["output"] == streamed  # return_aggregate_stream: the final result is every batch, in order
    assert [o["usage"]["output"] for o in streamed] == [1, 4, 13, 40]


def start_long_streaming_job(queue, name: str) -> str:
    """A job that streams for minutes, once its first batch has arrived."""
    job_id = f"{name}-{uuid.uuid4().hex[:6]}"
    queue.submit(job_id, {"prompt": "Count forever:", "stream": True,
                          "sampling_params": {"max_tokens": 1800, "ignore_eos": True}})
    deadline = time.monotonic() + 120
    while not queue.streams.get(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.streams.get(job_id), "the job never streamed"
    return job_id


def test_production_loop_stop_aborts_the_request_in_the_engine(queue_worker):
    queue, _, _ = queue_worker
    job_id = start_long_streaming_job(queue, "stop")
    assert engine_running() >= 1
    queue.stop(job_id)
    stopped = time.monotonic()
    while engine_running() > 0 and time.monotonic() - stopped < 10:
        time.sleep(0.2)
    assert engine_running() == 0
    assert time.monotonic() - stopped < 5


# --- router death (one router replica: the app's default) ---------------------------------------


def test_production_loop_fails_a_job_whose_router_dies_and_takes_the_next(queue_worker, smol_app):
    queue, process, log = queue_worker
    wait_until(lambda: len(replica_ids(smol_app.name, "Ingress")) == 1, timeout=60)
    (router,) = replica_ids(smol_app.name, "Ingress")
    actor = replica_actor(smol_app.name, router, "Ingress")
    job_id = start_long_streaming_job(queue, "router-dies")
    ray.kill(actor, no_restart=True)
    result = queue.wait_result(job_id, timeout=60)
    assert "output" not in result, result  # FAILED
    assert "ingress call failed" in result["error"] and "can be retried" in result["error"], result
    # The worker keeps taking jobs; this one waits for Serve's new router.
    next_id = f"after-{uuid.uuid4().hex[:6]}"
    queue.submit(next_id, {"prompt": "Hi", "sampling_params": {"max_tokens": 4}})
    after = queue.wait_result(next_id, timeout=180)
    assert "error" not in after, after
    assert process.poll() is None, log.read_text()[-3000:]
