"""The router's pure helpers: background loading of vLLM's request fields, the cut-stream guard
(no Ray, no engine)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading

import pytest

from deployments.router import (
    STREAM_END_CHECKS,
    StreamCut,
    _whole_stream,
    ends_with_final_response_event,
    ends_with_message_stop,
    in_background_at_lowest_priority,
    load_request_fields,
    load_request_fields_and_freeze,
    model_card,
    vllm_request_models,
)
from deployments.routes import JOB_ROUTES, engine_route, speaks_anthropic


def test_background_load_runs_at_the_lowest_priority_off_the_caller_thread():
    caller = threading.get_native_id()
    caller_niceness = os.getpriority(os.PRIO_PROCESS, caller)

    def load() -> tuple[int, int]:
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread_id, niceness = in_background_at_lowest_priority(load, "test-load").result(timeout=10)
    assert thread_id != caller
    assert niceness == 19
    # The caller's own priority is untouched.
    assert os.getpriority(os.PRIO_PROCESS, caller) == caller_niceness


def test_background_load_passes_its_error_to_the_waiter():
    def load() -> None:
        raise ImportError("no vllm here")

    with pytest.raises(ImportError, match="no vllm here"):
        in_background_at_lowest_priority(load, "test-load").result(timeout=10)


def test_request_fields_load_freezes_what_was_there_when_serve_freezes(monkeypatch):
    """The router's background import of vLLM ends after Serve froze the replica's objects: its
    leftovers are frozen too, so full collections don't scan them (see the function)."""
    from ray.serve._private import constants

    monkeypatch.setattr(constants, "RAY_SERVE_FREEZE_GC_ON_STARTUP", True, raising=False)
    gc.unfreeze()
    marker = [[]]  # a container the collector tracks, made before the load
    try:
        assert load_request_fields_and_freeze() == load_request_fields()
        assert gc.get_freeze_count() > 0
        assert all(obj is not marker for obj in gc.get_objects())  # frozen: no longer scanned
    finally:
        gc.unfreeze()

    # The operator's opt-out of Serve's freeze (RAY_SERVE_FREEZE_GC_ON_STARTUP=0) applies here too.
    monkeypatch.setattr(constants, "RAY_SERVE_FREEZE_GC_ON_STARTUP", False)
    load_request_fields_and_freeze()
    assert gc.get_freeze_count() == 0
    assert any(obj is marker for obj in gc.get_objects())


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
            async for part in _whole_stream(first, _parts(*rest), route):
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
