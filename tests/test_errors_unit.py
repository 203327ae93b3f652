"""The exception -> status table and the one error envelope (no Ray cluster: only exception classes)."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import pytest
import ray.exceptions
from ray.serve.exceptions import BackPressureError

from deployments.ingress.errors import (
    ClientError,
    EngineUnavailable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    anthropic_envelope,
    as_anthropic_error,
    envelope,
    error_body,
    error_message,
    sse_error_event,
    status_for,
)
from deployments.runpod_format.native import NativeInputError


def assert_envelope(body: dict, message: str | None, err_type: str, code: int, param: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == err_type
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert isinstance(body["error"]["message"], str)
    if message is not None:
        assert body["error"]["message"] == message
    json.dumps(body)  # serializable as is


def test_client_error_is_400_with_param():
    exc = ClientError("`temperature` must be a number", "sampling_params.temperature")
    assert status_for(exc) == (HTTPStatus.BAD_REQUEST, "BadRequestError")
    status, body = error_body(exc)
    assert status == 400 and type(status) is int
    assert_envelope(body, "`temperature` must be a number", "BadRequestError", 400, "sampling_params.temperature")


def test_client_error_without_param():
    status, body = error_body(ClientError("bad"))
    assert status == 400
    assert_envelope(body, "bad", "BadRequestError", 400, None)


def test_native_input_error_is_a_client_error():
    status, body = error_body(NativeInputError("unknown sampling parameter `x`", "sampling_params.x"))
    assert status == 400
    assert_envelope(body, "unknown sampling parameter `x`", "BadRequestError", 400, "sampling_params.x")


def test_unauthorized_is_401():
    assert status_for(Unauthorized("no key")) == (HTTPStatus.UNAUTHORIZED, "AuthenticationError")
    status, body = error_body(Unauthorized("Invalid API key"))
    assert status == 401
    assert_envelope(body, "Invalid API key", "AuthenticationError", 401, None)


def test_not_found_is_404():
    assert status_for(NotFound("nope")) == (HTTPStatus.NOT_FOUND, "NotFoundError")
    status, body = error_body(NotFound("The model `x` does not exist.", "model"))
    assert status == 404
    assert_envelope(body, "The model `x` does not exist.", "NotFoundError", 404, "model")


def test_payload_too_large_is_413():
    status, body = error_body(PayloadTooLarge("too big"))
    assert status == 413
    assert_envelope(body, "too big", "BadRequestError", 413, None)


def test_overloaded_is_429_with_retry_after():
    exc = Overloaded("Too many requests; retry later")
    assert exc.retry_after_s == 1
    assert Overloaded("x", retry_after_s=5).retry_after_s == 5
    assert status_for(exc) == (HTTPStatus.TOO_MANY_REQUESTS, "RateLimitError")
    status, body = error_body(exc)
    assert status == 429
    assert_envelope(body, "Too many requests; retry later", "RateLimitError", 429, None)


def test_engine_unavailable_is_503_with_its_message():
    exc = EngineUnavailable("The engine is still loading")
    assert status_for(exc) == (HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError")
    status, body = error_body(exc)
    assert status == 503
    assert_envelope(body, "The engine is still loading", "ServiceUnavailableError", 503, None)


@pytest.mark.parametrize(
    "exc",
    [
        ray.exceptions.ActorDiedError(),
        ray.exceptions.RayActorError(),
        ray.exceptions.ActorUnavailableError("unavailable", None),
        ray.exceptions.WorkerCrashedError(),
        BackPressureError(num_queued_requests=3, max_queued_requests=2),
        asyncio.TimeoutError(),  # noqa: UP041 (the name the code under test uses)
        TimeoutError("internal detail"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_engine_failures_are_503(exc: BaseException):
    assert status_for(exc) == (HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError")
    status, body = error_body(exc)
    assert status == 503
    message = f"The engine is unavailable ({type(exc).__name__}); retry shortly"
    assert_envelope(body, message, "ServiceUnavailableError", 503, None)


def test_generic_exception_is_500_without_leaking_its_text():
    exc = RuntimeError("secret: /home/user/.cache/token=abc123 at 0xdeadbeef")
    assert status_for(exc) == (HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")
    status, body = error_body(exc)
    assert status == 500
    assert_envelope(body, "Internal error (RuntimeError)", "InternalServerError", 500, None)
    assert "secret" not in json.dumps(body)
    assert "abc123" not in json.dumps(body)


@pytest.mark.parametrize("exc", [Exception("leak me"), ValueError("leak me"), KeyError("leak me")])
def test_other_exceptions_are_500(exc: BaseException):
    status, body = error_body(exc)
    assert status == 500
    assert "leak me" not in body["error"]["message"]
    assert body["error"]["message"] == f"Internal error ({type(exc).__name__})"


def test_envelope_shape():
    assert envelope("m", "T", 418) == {"error": {"message": "m", "type": "T", "param": None, "code": 418}}
    assert envelope("m", "T", 400, "p") == {"error": {"message": "m", "type": "T", "param": "p", "code": 400}}


def test_sse_error_event_format():
    exc = ClientError("bad \"quoted\" input", "prompt")
    event = sse_error_event(exc)
    assert isinstance(event, bytes)
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\ndata: [DONE]\n\n")
    first, done, tail = event.split(b"\n\n")
    assert done == b"data: [DONE]" and tail == b""
    payload = json.loads(first[len(b"data: "):])
    assert payload == error_body(exc)[1]
    assert payload == {"error": {"message": "bad \"quoted\" input", "type": "BadRequestError", "param": "prompt",
                                 "code": 400}}


def test_sse_error_event_for_an_internal_error_does_not_leak():
    event = sse_error_event(RuntimeError("token=abc123"))
    assert b"abc123" not in event
    payload = json.loads(event.split(b"\n\n")[0][len(b"data: "):])
    assert payload["error"]["code"] == 500


# --- Anthropic's envelope (the /v1/messages routes) -------------------------------------------------

@pytest.mark.parametrize(("exc", "status", "err_type"), [
    (ClientError("bad", "max_tokens"), 400, "invalid_request_error"),
    (Unauthorized("no key"), 401, "authentication_error"),
    (NotFound("no model"), 404, "not_found_error"),
    (PayloadTooLarge("big"), 413, "request_too_large"),
    (Overloaded("full"), 429, "rate_limit_error"),
    (EngineUnavailable("loading"), 503, "overloaded_error"),
    (RuntimeError("secret"), 500, "api_error"),
])
def test_the_same_failures_in_anthropics_envelope(exc: BaseException, status: int, err_type: str):
    """Same status and message as the OpenAI envelope; Anthropic's shape and type names."""
    got_status, body = error_body(exc, anthropic=True)
    assert got_status == status == error_body(exc)[0]
    assert body == {"type": "error", "error": {"type": err_type, "message": error_body(exc)[1]["error"]["message"]}}
    assert "secret" not in json.dumps(body)


def test_anthropic_envelope_falls_back_by_status_class():
    assert anthropic_envelope("m", 422)["error"]["type"] == "invalid_request_error"
    assert anthropic_envelope("m", 502)["error"]["type"] == "api_error"


def test_engine_errors_are_rewrapped_in_anthropics_envelope():
    """vLLM answers /v1/messages failures in three shapes; the caller gets Anthropic's one."""
    openai_shaped = json.dumps(envelope("messages: field required", "BadRequestError", 400)).encode()
    vllm_anthropic = json.dumps({"type": "error", "error": {"type": "NotFoundError", "message": "no model x"}}).encode()
    for status, body, message in [(400, openai_shaped, "messages: field required"),
                                  (404, vllm_anthropic, "no model x"),
                                  (401, b'{"error": "Unauthorized"}', "Unauthorized"),
                                  (500, b"Internal Server Error", "Internal Server Error")]:
        assert error_message(body) == message
        assert json.loads(as_anthropic_error(status, body)) == anthropic_envelope(message, status)


def test_anthropic_sse_error_event_is_one_error_event():
    event = sse_error_event(EngineUnavailable("gone"), anthropic=True)
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    assert json.loads(event.split(b"data: ", 1)[1]) == anthropic_envelope("gone", 503)


def test_a_request_past_its_deadline_is_a_504():
    from deployments.ingress.errors import RequestTimeout

    status, body = error_body(RequestTimeout("did not finish within REQUEST_TIMEOUT (5 s)"))
    assert status == 504
    assert body["error"]["type"] == "TimeoutError" and "REQUEST_TIMEOUT" in body["error"]["message"]
    assert error_body(RequestTimeout("x"), anthropic=True)[1]["error"]["type"] == "timeout_error"
