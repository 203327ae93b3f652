"""Which vLLM route serves each public path, and with which method. Pure: the router's HTTP routes,
RunPod `openai_route` jobs and the OpenAPI schema all resolve paths here."""

from __future__ import annotations

# The routes the engine deployment answers with vLLM's server app, by method. The pooling routes
# (/score, /rerank, /classify, /pooling) are vLLM's for pooling models; a generating model answers
# them with a 404 envelope, as it does /v1/embeddings.
ENGINE_ROUTES: dict[str, str] = {
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/responses": "POST",
    "/v1/embeddings": "POST",
    "/score": "POST",
    "/rerank": "POST",
    "/classify": "POST",
    "/pooling": "POST",
}

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
