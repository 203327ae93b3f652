"""One error envelope for every failure the ingress reports, and one table of exception -> status.

The envelope is vLLM's (and OpenAI's shape): {"error": {"message", "type", "param", "code"}}. The
Anthropic Messages routes answer the same failures in Anthropic's shape, which its clients parse:
{"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus


class ClientError(Exception):
    """A request the caller must fix. `param` names the field."""

    status = HTTPStatus.BAD_REQUEST
    err_type: str | None = None  # the envelope's type, when not the status's usual one

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class MalformedBody(ClientError):
    """A body that is not a JSON object. `vllm serve` refuses it in its request validation, typed
    "Bad Request" (with FastAPI's location as param): the same here, so a client can't tell."""

    err_type = "Bad Request"


class Unauthorized(ClientError):
    status = HTTPStatus.UNAUTHORIZED


class NotFound(ClientError):
    status = HTTPStatus.NOT_FOUND


class PayloadTooLarge(ClientError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Overloaded(Exception):
    """MAX_CONCURRENCY slots and the MAX_QUEUED_REQUESTS queue are full."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(Exception):
    """No engine replica can take the request now (dead, restarting or still loading)."""


class MetricsUnavailable(EngineUnavailable):
    """`GET /metrics`: no node's Ray metrics agent answered (a 503 with this message)."""


class RequestTimeout(Exception):
    """REQUEST_TIMEOUT passed before the request finished (its queue wait and generation together);
    the engine aborts it."""


class ReaderStalled(RequestTimeout):
    """A stream's client stopped reading (STREAM_STALL_TIMEOUT) or fell STREAM_BUFFER_BYTES behind:
    the request is aborted and its slot freed, rather than its output piling up in the ingress."""


def _engine_failures() -> tuple[type[BaseException], ...]:
    import ray.exceptions
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return (
        EngineUnavailable,
        ray.exceptions.RayActorError,  # includes ActorDiedError, ActorUnavailableError
        ray.exceptions.WorkerCrashedError,
        BackPressureError,
        DeploymentUnavailableError,
        asyncio.TimeoutError,
    )


def status_for(exc: BaseException) -> tuple[HTTPStatus, str]:
    """The one exception -> (status, error type) table."""
    if isinstance(exc, ClientError):
        return exc.status, exc.err_type or {
            HTTPStatus.UNAUTHORIZED: "AuthenticationError",
            HTTPStatus.NOT_FOUND: "NotFoundError",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "BadRequestError",
        }.get(exc.status, "BadRequestError")
    if isinstance(exc, Overloaded):
        return HTTPStatus.TOO_MANY_REQUESTS, "RateLimitError"
    if isinstance(exc, RequestTimeout):
        return HTTPStatus.GATEWAY_TIMEOUT, "TimeoutError"
    if isinstance(exc, _engine_failures()):
        return HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"
    return HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError"


def envelope(message: str, err_type: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_body(exc: BaseException, anthropic: bool = False) -> tuple[int, dict]:
    status, err_type = status_for(exc)
    if status == HTTPStatus.INTERNAL_SERVER_ERROR:
        message = f"Internal error ({type(exc).__name__})"
    elif status == HTTPStatus.SERVICE_UNAVAILABLE and not isinstance(exc, EngineUnavailable):
        message = f"The engine is unavailable ({type(exc).__name__}); retry shortly"
    else:
        message = str(exc)
    if anthropic:
        return int(status), anthropic_envelope(message, int(status))
    return int(status), envelope(message, err_type, int(status), getattr(exc, "param", None))


def sse_error_event(exc: BaseException, anthropic: bool = False) -> bytes:
    """How a stream that already started reports a failure (what vLLM's own streams do; an
    Anthropic stream ends with an `error` event instead)."""
    _, body = error_body(exc, anthropic)
    if anthropic:
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


# Anthropic's error type for each status (its API's table; 529 is its own "overloaded").
ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_envelope(message: str, status: int) -> dict:
    fallback = "invalid_request_error" if status < 500 else "api_error"
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, fallback), "message": message}}


def error_message(body: bytes) -> str:
    """The message of an error answer: OpenAI's envelope, vLLM's Anthropic one, `{"error": text}`
    (vLLM's API key middleware) or, failing those, the body itself."""
    try:
        error = json.loads(body)["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")


def as_anthropic_error(status: int, body: bytes) -> bytes:
    """An engine's error answer on an Anthropic route, in Anthropic's envelope. vLLM answers that
    route's own failures in Anthropic's shape but with OpenAI's type names ("BadRequestError"), and
    a request its validation refuses, or a model without the route, in OpenAI's envelope."""
    return json.dumps(anthropic_envelope(error_message(body), status)).encode()
