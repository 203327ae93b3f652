"""Which of vLLM's routes serves a public path. Pure: RunPod `openai_route` jobs and the OpenAPI
schema resolve paths here (each of the ingress's HTTP route methods names its vLLM route itself)."""

from __future__ import annotations

# vLLM's routes an `openai_route` job can name, with their methods. The pooling routes (/score,
# /rerank, /classify, /pooling) are vLLM's for pooling models; a generating model answers them with
# a 404 envelope, as it does /v1/embeddings.
JOB_ROUTES: dict[str, str] = {
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/responses": "POST",
    "/v1/embeddings": "POST",
    "/score": "POST",
    "/rerank": "POST",
    "/classify": "POST",
    "/pooling": "POST",
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
}

# Anthropic's Messages API (vLLM serves it for generating models): its failures are answered in
# Anthropic's error envelope, which its clients parse, not OpenAI's.
ANTHROPIC_ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})

# Other names `vllm serve` (and Ray Serve LLM, for /v1/score) answers for the same routes. They are
# sent to vLLM under the route's own name: vLLM logs a deprecation warning on every /v1/score call.
ROUTE_ALIASES: dict[str, str] = {"/v1/score": "/score", "/v1/rerank": "/rerank", "/v2/rerank": "/rerank"}

# RunPod's OpenAI-compatible URL is `.../openai/v1/...`: the same routes under one more prefix.
OPENAI_PREFIX = "/openai"


def engine_route(path: str) -> str:
    """The vLLM route a public path is served by (the path itself when it has no other name)."""
    if path.startswith(OPENAI_PREFIX + "/v1/"):
        path = path[len(OPENAI_PREFIX):]
    return ROUTE_ALIASES.get(path, path)


def speaks_anthropic(path: str) -> bool:
    """Whether a public path's errors take Anthropic's envelope."""
    return engine_route(path) in ANTHROPIC_ROUTES


# SageMaker's `POST /invocations`, as `vllm serve` has it: vLLM tries its request models in this
# order and serves the body with the first that fits (chat before completion for a generating
# model). The ingress checks the body as the route it will land on, by the field that route needs.
INVOCATION_ROUTES: tuple[tuple[str, str], ...] = (
    ("messages", "/v1/chat/completions"),
    ("prompt", "/v1/completions"),
    ("query", "/rerank"),
    ("input", "/v1/embeddings"),
)
INVOCATIONS = "/invocations"


def invocation_route(payload: object) -> str | None:
    """The route whose checks an `/invocations` body gets; None when it fits none (vLLM then
    answers 400 itself)."""
    if isinstance(payload, dict):
        for field, route in INVOCATION_ROUTES:
            if field in payload:
                return route
    return None
