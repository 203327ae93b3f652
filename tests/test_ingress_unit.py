"""The ingress's pure helpers: vLLM's request fields and schemas (which the engine replica reads for
it), the shared fetch, the OpenAPI document, the cut-stream guard (no Ray, no engine)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from deployments.engine.request_models import load_request_fields, load_request_schemas, vllm_request_models
from deployments.ingress.routes import ENGINE_ROUTES, JOB_ROUTES, ROUTE_BY_PATH, engine_route, speaks_anthropic
from deployments.ingress.server import StallGuard, app, model_card, openapi_with_request_models
from deployments.ingress.shared_fetch import SharedFetch
from deployments.ingress.stream_end import (
    STREAM_END_CHECKS,
    StreamCut,
    ends_with_final_response_event,
    ends_with_message_stop,
    whole_stream,
)


def test_the_router_and_the_runpod_worker_never_import_vllm():
    """vLLM's import costs ~4.5 s of CPU and ~480 MB per process: the router gets vLLM's request
    models from the engine replica instead, and the RunPod worker only talks to the router."""
    code = ("import sys, deployments.ingress.server, deployments.app, handler.worker; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


class CountedFetch:
    """A fetch that takes `delay_s`, counts its calls, and gives its outcomes in turn (an exception
    is raised)."""

    def __init__(self, *outcomes: object, delay_s: float = 0.05) -> None:
        self.outcomes, self.delay_s, self.calls = list(outcomes), delay_s, 0

    async def __call__(self) -> object:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        outcome = self.outcomes[min(self.calls, len(self.outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_shared_fetch_runs_once_for_concurrent_callers_and_keeps_the_value():
    fetch = CountedFetch("fields")

    async def scenario() -> None:
        shared = SharedFetch(fetch)
        assert await asyncio.gather(*(shared.get() for _ in range(5))) == ["fields"] * 5
        assert await shared.get() == "fields"
        assert fetch.calls == 1

    asyncio.run(scenario())


def test_shared_fetch_fails_its_waiters_then_fetches_again():
    fetch = CountedFetch(RuntimeError("engine not up"), "fields", delay_s=0.01)

    async def scenario() -> None:
        shared = SharedFetch(fetch)
        results = await asyncio.gather(shared.get(), shared.get(), return_exceptions=True)
        assert [str(r) for r in results] == ["engine not up"] * 2
        assert await shared.get() == "fields"
        assert fetch.calls == 2

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_cancel_the_fetch_for_the_others():
    fetch = CountedFetch("fields", delay_s=0.1)

    async def scenario() -> None:
        shared = SharedFetch(fetch)
        first = asyncio.ensure_future(shared.get())
        second = asyncio.ensure_future(shared.get())
        await asyncio.sleep(0.02)
        first.cancel()  # a client that went away
        assert await second == "fields"
        assert first.cancelled() and fetch.calls == 1

    asyncio.run(scenario())


def test_openapi_declares_vllms_models_on_every_route_and_alias_with_a_body():
    schemas = load_request_schemas()
    schema = openapi_with_request_models(schemas)
    components = schema["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "AnthropicMessagesRequest"} <= set(components)
    for path in ("/v1/chat/completions", "/openai/v1/chat/completions", "/v2/rerank", "/v1/messages"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{schemas.names[engine_route(path)]}"}
    # Every reference resolves within the document.
    refs = set()

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    assert refs <= set(components)
    # Without an engine yet: the routes alone, no request models.
    bare = openapi_with_request_models(None)
    assert "/v1/chat/completions" in bare["paths"]
    assert "requestBody" not in bare["paths"]["/v1/chat/completions"]["post"]


def test_the_route_table_drives_the_apps_routes():
    """Every public path of every engine route (aliases, /openai/v1 twins) is one FastAPI route
    served by the one forwarding method, with the table's method; nothing else forwards."""
    served = {(route.path, method) for route in app.routes if getattr(route, "name", None) != "model"
              for method in getattr(route, "methods", ()) if getattr(route.endpoint, "__name__", "") == "to_engine"}
    expected = {(path, route.method) for route in ENGINE_ROUTES for path in route.public_paths()}
    assert served == expected
    assert ("/openai/v1/rerank", "POST") in served and ("/v2/rerank", "POST") in served
    assert ("/openai/score", "POST") not in served and ("/openai/tokenize", "POST") not in served
    # Each public path resolves to its route's vLLM name.
    for route in ENGINE_ROUTES:
        for path in route.public_paths():
            assert ROUTE_BY_PATH[engine_route(path)] is route
    # Limits and slots: every POST, never a GET; the RunPod jobs' table is the same table's.
    assert {r.path for r in ENGINE_ROUTES if r.admitted} == {r.path for r in ENGINE_ROUTES if r.method == "POST"}
    assert JOB_ROUTES["/v1/chat/completions"] == "POST" and "/tokenize" not in JOB_ROUTES


def test_openapi_declares_the_path_parameters_of_engine_routes():
    operation = openapi_with_request_models(None)["paths"]["/v1/responses/{response_id}"]["get"]
    assert ("response_id", "path", True) in [(p["name"], p["in"], p["required"]) for p in operation["parameters"]]
    assert operation["summary"]


def test_request_fields_come_from_vllms_request_models():
    fields = load_request_fields()
    assert {"messages", "max_tokens", "temperature", "tools", "response_format"} <= fields.chat
    assert {"prompt", "max_tokens", "logprobs"} <= fields.completion
    assert "response_format" in fields.objects["/v1/chat/completions"]
    assert "messages" not in fields.objects["/v1/chat/completions"]  # a list, not an object
    assert {"text", "reasoning"} <= fields.objects["/v1/responses"]
    assert "input" not in fields.objects["/v1/responses"]  # a string or a list
    # A union of request models (embeddings: texts or messages): the members' object fields.
    assert "chat_template_kwargs" in fields.objects["/v1/embeddings"]
    assert "input" not in fields.objects["/v1/embeddings"]


async def _parts(*parts: bytes):
    for part in parts:
        yield part


def _read(first: bytes, *rest: bytes, route: str = "") -> tuple[list[bytes], BaseException | None]:
    async def main() -> tuple[list[bytes], BaseException | None]:
        seen: list[bytes] = []
        try:
            async for part in whole_stream(first, _parts(*rest), route):
                seen.append(part)
        except StreamCut as exc:
            return seen, exc
        return seen, None

    return asyncio.run(main())


def test_a_stream_that_vllm_closed_passes_through_whole():
    parts = [b'data: {"a": 1}\n\n', b'data: {"error": {"code": 500}}\n\n', b"data: [DONE]\n\n", b""]
    assert _read(*parts) == (parts, None)
    assert _read(b'data: {"a": 1}\n\ndata: [DONE]\n\n') == ([b'data: {"a": 1}\n\ndata: [DONE]\n\n'], None)


def test_a_stream_stopping_before_dones_fails_after_what_it_carried():
    """What the caller gets when an engine goes away mid-stream without a word: every part that
    came, then an error (the relay turns it into an SSE error event, a RunPod job into FAILED)."""
    parts = [b'data: {"a": 1}\n\n', b'data: {"a": 2}\n\n', b""]
    seen, error = _read(*parts)
    assert seen == parts
    assert isinstance(error, StreamCut) and "retry" in str(error)


def _event(name: str, data: str = "{}") -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def test_a_responses_stream_ends_with_its_final_event_not_done():
    """vLLM's Responses API stream has no `data: [DONE]`: response.completed (or a failure's own
    event) closes it. Without its own check every Responses stream would end in a false error."""
    finished = STREAM_END_CHECKS["/v1/responses"]
    assert finished is ends_with_final_response_event
    whole = [_event("response.created"), _event("response.output_text.delta"), _event("response.completed"), b""]
    assert _read(*whole, route="/v1/responses") == (whole, None)
    for last in ("response.incomplete", "response.failed", "error"):
        assert finished(_event("response.output_text.delta") + _event(last))
    cut = [_event("response.created"), _event("response.output_text.delta"), b""]
    seen, error = _read(*cut, route="/v1/responses")
    assert seen == cut and isinstance(error, StreamCut)
    assert not finished(b"data: [DONE]\n\n") and not finished(b"")
    # A delta whose text mentions the final event's name is still a delta.
    assert not finished(_event("response.output_text.delta", '{"delta": "event: response.completed"}'))
    assert "/v1/chat/completions" not in STREAM_END_CHECKS  # chat and completions: ends_with_done


def test_an_anthropic_messages_stream_ends_with_message_stop():
    finished = STREAM_END_CHECKS["/v1/messages"]
    assert finished is ends_with_message_stop
    whole = [_event("message_start"), _event("content_block_delta"), _event("message_delta"),
             _event("message_stop"), b""]
    assert _read(*whole, route="/v1/messages") == (whole, None)
    assert finished(_event("content_block_delta") + _event("error"))
    seen, error = _read(*whole[:3], b"", route="/v1/messages")
    assert isinstance(error, StreamCut)
    assert not finished(b"data: [DONE]\n\n")


def test_which_paths_speak_anthropic():
    for path in ("/v1/messages", "/openai/v1/messages", "/v1/messages/count_tokens",
                 "/openai/v1/messages/count_tokens"):
        assert speaks_anthropic(path)
    for path in ("/v1/chat/completions", "/messages", "/v1/messages/x", "/openai/v1/models"):
        assert not speaks_anthropic(path)


def test_every_route_with_a_body_has_vllms_request_model():
    """The checks (object fields) and the OpenAPI schema read one table: each POST route the engine
    serves, and each alias of one, finds its model there."""
    models = vllm_request_models()
    posts = {route for route, method in JOB_ROUTES.items() if method == "POST"}
    assert posts <= set(models)
    for alias in ("/v1/score", "/openai/v1/score", "/v1/rerank", "/v2/rerank", "/openai/v1/rerank",
                  "/openai/v1/chat/completions"):
        assert engine_route(alias) in models
    assert engine_route("/openai/v1/models") == "/v1/models"
    # Only /openai/v1 is a twin prefix: /openai/score is no path of ours, and stays unresolved.
    assert engine_route("/openai/score") == "/openai/score"
    fields = load_request_fields()
    assert set(fields.objects) == set(models)
    assert "chat_template_kwargs" in fields.objects["/rerank"]


def test_model_card_is_one_entry_of_the_list():
    listed = json.dumps({"object": "list", "data": [{"id": "org/base", "max_model_len": 512},
                                                    {"id": "adapter", "parent": "org/base"}]}).encode()
    assert json.loads(model_card(listed, "org/base")) == {"id": "org/base", "max_model_len": 512}
    assert json.loads(model_card(listed, "adapter"))["parent"] == "org/base"
    assert model_card(listed, "org") is None and model_card(b'{"data": []}', "x") is None


def test_the_stall_guard_fires_only_for_a_write_that_waits_past_the_timeout():
    async def scenario() -> None:
        stalls = []
        guard = StallGuard(0.2, lambda: stalls.append(asyncio.get_running_loop().time()))
        for _ in range(10):  # writes that each take little time: no stall, however long in all
            guard.writing()
            await asyncio.sleep(0.05)
            guard.written()
        await asyncio.sleep(0.4)  # nothing to write (a slow engine): not the reader's stall
        assert stalls == []
        started = asyncio.get_running_loop().time()
        guard.writing()  # a write that never completes
        await asyncio.sleep(0.5)
        assert len(stalls) == 1 and 0.2 <= stalls[0] - started < 0.35
        guard.stop()

    asyncio.run(scenario())


def test_a_stopped_stall_guard_never_fires():
    async def scenario() -> None:
        stalls = []
        guard = StallGuard(0.1, lambda: stalls.append(1))
        guard.writing()
        guard.stop()
        await asyncio.sleep(0.3)
        assert stalls == []

    asyncio.run(scenario())


def test_an_invocation_is_checked_as_the_route_vllm_will_serve_it_with():
    from deployments.ingress.routes import invocation_route

    assert invocation_route({"messages": [], "prompt": "x"}) == "/v1/chat/completions"
    assert invocation_route({"prompt": "x"}) == "/v1/completions"
    assert invocation_route({"query": "q", "documents": ["d"]}) == "/rerank"
    assert invocation_route({"input": "x"}) == "/v1/embeddings"
    assert invocation_route({"model": "m"}) is None and invocation_route([1]) is None
