"""The app beside bare `vllm serve`: the same requests to both (the tiny model, the same engine
arguments, greedy sampling), comparing what a client can tell apart: status, the error envelope's
type and param, finish_reason, usage, the final status of a Responses stream, and the route set.
Every difference is fixed or listed in DIFFERENCES (and in the README), with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from configs.engine_args import vllm_cli_args
from configs.platform import resolve_accelerator
from tests.workers import ROOT, free_port

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "fox"}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"model": "tiny", "prompt": "fox", "max_tokens": 6, "temperature": 0}

# (name, method, path, body): what clients send, valid and not.
CASES: list[tuple[str, str, str, Any]] = [
    ("chat", "POST", "/v1/chat/completions", CHAT),
    ("chat n=2 logprobs", "POST", "/v1/chat/completions", {**CHAT, "n": 2, "logprobs": True, "top_logprobs": 2}),
    ("chat continue_final_message echo", "POST", "/v1/chat/completions", {
        **CHAT, "messages": [{"role": "user", "content": "fox"}, {"role": "assistant", "content": "The"}],
        "continue_final_message": True, "add_generation_prompt": False, "echo": True}),
    ("chat stop", "POST", "/v1/chat/completions", {**CHAT, "stop": ["e"], "max_tokens": 40}),
    ("completion", "POST", "/v1/completions", COMPLETION),
    ("completion echo", "POST", "/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}),
    ("completion prompt list", "POST", "/v1/completions", {**COMPLETION, "prompt": ["fox", "dog"]}),
    ("responses", "POST", "/v1/responses", {"model": "tiny", "input": "fox", "max_output_tokens": 6,
                                            "temperature": 0}),
    ("tokenize", "POST", "/tokenize", {"model": "tiny", "prompt": "fox"}),
    ("detokenize", "POST", "/detokenize", {"model": "tiny", "tokens": [1, 2, 3]}),
    ("models", "GET", "/v1/models", None),
    ("version", "GET", "/version", None),
    ("stored response", "GET", "/v1/responses/resp_none", None),
    # Errors a client can make.
    ("no messages", "POST", "/v1/chat/completions", {"model": "tiny"}),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "nope"}),
    ("max_tokens past context", "POST", "/v1/completions", {**COMPLETION, "max_tokens": 100000}),
    ("negative max_tokens", "POST", "/v1/completions", {**COMPLETION, "max_tokens": -1}),
    ("temperature string", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}),
    ("prompt too long", "POST", "/v1/completions", {**COMPLETION, "prompt": "fox " * 600}),
    ("bad role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": 5, "content": "x"}]}),
    ("no role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}),
    ("message not an object", "POST", "/v1/chat/completions", {**CHAT, "messages": [1, 2]}),
    ("content a number", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}),
    ("invalid json", "POST", "/v1/chat/completions", b"{not json"),
    ("invalid json later", "POST", "/v1/completions", b'{"prompt": "fox", bad}'),
    ("empty body", "POST", "/v1/chat/completions", b""),
    ("null body", "POST", "/v1/chat/completions", b"null"),
    ("not utf-8", "POST", "/v1/chat/completions", b"\xff\xfe\x00garbage"),
    ("top_k a string", "POST", "/v1/chat/completions", {**CHAT, "top_k": "x"}),
    ("n zero", "POST", "/v1/completions", {**COMPLETION, "n": 0}),
    ("n negative", "POST", "/v1/chat/completions", {**CHAT, "n": -2}),
    ("n a string", "POST", "/v1/chat/completions", {**CHAT, "n": "two"}),
    ("max_tokens a string", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "many"}),
    ("max_tokens true", "POST", "/v1/completions", {**COMPLETION, "max_tokens": True}),
    ("max_tokens zero", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}),
    ("best_of", "POST", "/v1/completions", {**COMPLETION, "best_of": 2}),
    ("top_logprobs negative", "POST", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}),
    ("temperature negative", "POST", "/v1/chat/completions", {**CHAT, "temperature": -3}),
    ("logprobs too many", "POST", "/v1/completions", {**COMPLETION, "logprobs": 99}),
    ("response_format nonsense", "POST", "/v1/chat/completions", {**CHAT, "response_format": {"type": "x"}}),
    ("body not an object", "POST", "/v1/completions", [1, 2]),
    ("embeddings on a generating model", "POST", "/v1/embeddings", {"model": "tiny", "input": "fox"}),
    ("no route", "GET", "/v1/nothing", None),
]

# Where the app answers differently on purpose: (case, what) -> why. Mirrored in the README.
NOT_FOUND_ENVELOPE = ("a path the app has no route for (or a route the model's tasks don't serve) is a 404 in "
                      "the error envelope, where vLLM answers FastAPI's {\"detail\": \"Not Found\"}")
DIFFERENCES: dict[tuple[str, str], str] = {
    **{(case, what): NOT_FOUND_ENVELOPE for case in ("no route", "embeddings on a generating model")
       for what in ("keys", "error_keys", "type")},
    # ("case", "*"): every part of the answer.
    ("best_of", "*"): "vLLM 0.32's OpenAI routes dropped best_of and ignore it silently; the app refuses it "
    "(400, param best_of) rather than return one sequence where several were asked for",
}

# vLLM's routes the app does not serve, and why. Mirrored in the README.
ROUTES_NOT_SERVED: dict[str, str] = {
    "/v1/responses/{response_id}/cancel": "the Responses API is stateless (as `vllm serve` runs it by default): "
    "nothing runs in the background to cancel",
    "/v1/chat/completions/batch": "vLLM's own batch of chats, not OpenAI's API; send them as separate "
    "requests (each gets its slot and limits)",
    "/generative_scoring": "vLLM's own scoring API, not OpenAI's",
    "/scale_elastic_ep": "elastic expert parallelism: Serve's autoscaling scales replicas here",
    "/is_scaling_elastic_ep": "as above",
    "/kv_event_sources": "KV-cache events for an external router; the app routes itself",
    "/v1/systemone": "vLLM's structured decisions API, not OpenAI's",
}


def outcome(response: httpx.Response) -> dict[str, Any]:
    """What a client can tell apart in an answer."""
    seen: dict[str, Any] = {"status": response.status_code}
    try:
        body = response.json()
    except ValueError:
        seen["json"] = False
        return seen
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        seen.update(type=error.get("type"), param=error.get("param"), error_keys=sorted(error))
    elif isinstance(body, dict):
        seen["keys"] = sorted(body)
        if "choices" in body:
            seen["finish_reason"] = [c.get("finish_reason") for c in body["choices"]]
            seen["choice_keys"] = sorted({k for c in body["choices"] for k in c})
        if isinstance(body.get("usage"), dict):
            seen["usage"] = {k: v for k, v in body["usage"].items() if isinstance(v, int)}
        if "status" in body:
            seen["response_status"] = body["status"]
    return seen


def send(client: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return client.request(method, path, content=body, headers={"content-type": "application/json"})
    return client.request(method, path, json=body)


@pytest.fixture(scope="module")
def bare(tiny_app, tmp_path_factory):
    """`vllm serve` (vLLM's own server) on the tiny model, with the app's engine arguments."""
    settings = tiny_app.settings
    port = free_port()
    args = vllm_cli_args(settings, resolve_accelerator(settings.ACCELERATOR), settings.MODEL_NAME)
    if "--distributed-executor-backend" in args:  # one device, in-process, as `vllm serve` runs it
        i = args.index("--distributed-executor-backend")
        del args[i:i + 2]
    log = tmp_path_factory.mktemp("bare") / "vllm.log"
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                                 "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, Path(log).read_text()[-4000:]
            assert time.monotonic() < deadline, Path(log).read_text()[-4000:]
            try:
                if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_same_requests_get_the_same_answers(tiny_app, bare):
    differences: dict[tuple[str, str], tuple[Any, Any]] = {}
    with httpx.Client(base_url=bare, timeout=120) as theirs, httpx.Client(base_url=tiny_app.base_url,
                                                                          timeout=120) as ours:
        for name, method, path, body in CASES:
            expected, got = outcome(send(theirs, method, path, body)), outcome(send(ours, method, path, body))
            if expected["status"] >= 400:
                print(f"\n[parity] vLLM answers {name!r}: {expected['status']} {expected.get('type')!r} "
                      f"param={expected.get('param')!r}", end="")
            for what in sorted(set(expected) | set(got)):
                if expected.get(what) != got.get(what):
                    differences[(name, what)] = (expected.get(what), got.get(what))
    print("\n[parity] " + json.dumps({f"{k[0]} / {k[1]}": v for k, v in differences.items()}, indent=1, default=str))
    unexplained = {k: v for k, v in differences.items() if k not in DIFFERENCES and (k[0], "*") not in DIFFERENCES}
    assert not unexplained, unexplained
    cases_differing = {case for case, _ in differences}
    stale = {k for k in DIFFERENCES if k not in differences and not (k[1] == "*" and k[0] in cases_differing)}
    assert not stale, f"listed differences that are gone (drop them here and in the README): {stale}"


def test_a_streamed_responses_call_ends_as_vllm_serves_it(tiny_app, bare):
    body = {"model": "tiny", "input": "fox", "max_output_tokens": 6, "temperature": 0, "stream": True,
            "include": ["message.output_text.logprobs"], "top_logprobs": 2}

    def final_status(base_url: str) -> str | None:
        status = None
        with httpx.Client(base_url=base_url, timeout=120) as client, client.stream("POST", "/v1/responses",
                                                                                   json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                        status = event["response"]["status"]
        return status

    assert final_status(tiny_app.base_url) == final_status(bare)


def test_every_route_vllm_serves_is_served_or_listed(tiny_app, bare):
    theirs = set(httpx.get(f"{bare}/openapi.json", timeout=30).json()["paths"])
    ours = set(httpx.get(f"{tiny_app.base_url}/openapi.json", timeout=30).json()["paths"])
    missing = sorted(theirs - ours - set(ROUTES_NOT_SERVED))
    print(f"\n[parity] vLLM routes the app does not serve: {missing}")
    assert not missing, missing
