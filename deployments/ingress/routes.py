"""The one table of the routes the ingress passes to vLLM. Pure: the ingress registers its HTTP
routes from it (deployments.ingress.server), the OpenAPI schema and the request checks look up a
route's vLLM name here, and RunPod `openai_route` jobs may name the routes it marks as jobs."""

from __future__ import annotations

from dataclasses import dataclass

# RunPod's OpenAI-compatible URL is `.../openai/v1/...`: every /v1 path is served under it too.
OPENAI_PREFIX = "/openai"


@dataclass(frozen=True)
class EngineRoute:
    """One of vLLM's routes as the ingress serves it.

    A POST costs the engine work (generation, pooling, tokenizing): its body is checked against
    the route's vLLM request model and the request limits, and it takes a MAX_CONCURRENCY slot. A
    GET (the model list, the version) does neither, and waits at most READ_TIMEOUT_S for an engine.
    """

    path: str  # vLLM's name for the route: what the engine is called with
    method: str
    name: str  # the OpenAPI operation's name
    summary: str
    aliases: tuple[str, ...] = ()  # other names `vllm serve` (and Ray Serve LLM) answer it under
    job: bool = False  # a RunPod `openai_route` job may name it
    anthropic: bool = False  # failures in Anthropic's error envelope, which its clients parse

    @property
    def admitted(self) -> bool:
        return self.method == "POST"

    def public_paths(self) -> tuple[str, ...]:
        """Its name, its aliases, and the /openai twin of each /v1 one."""
        own = (self.path, *self.aliases)
        return own + tuple(OPENAI_PREFIX + path for path in own if path.startswith("/v1/"))


ENGINE_ROUTES: tuple[EngineRoute, ...] = (
    EngineRoute("/v1/models", "GET", "models", "The served model and its loaded LoRA adapters.", job=True),
    EngineRoute("/v1/chat/completions", "POST", "chat_completions", "OpenAI chat completion.", job=True),
    EngineRoute("/v1/completions", "POST", "completions", "OpenAI (legacy) completion.", job=True),
    # Stateless, as vLLM runs it by default: `store` is ignored, so there is nothing to GET later.
    EngineRoute("/v1/responses", "POST", "responses", "OpenAI Responses API (stateless).", job=True),
    EngineRoute("/v1/responses/{response_id}", "GET", "retrieve_response",
                "vLLM's answer: with the stateless Responses API, a 404 naming `response_id`."),
    # Served when the model runs as a pooling model (vLLM picks that for embedding models;
    # RUNNER=pooling CONVERT=embed for others); a generating model answers a 404 envelope.
    EngineRoute("/v1/embeddings", "POST", "embeddings", "Embeddings (pooling models).", job=True),
    # An embedding model scores pairs by the cosine of their embeddings; a cross-encoder (a
    # classification model with one label) reads each pair. vLLM logs a deprecation warning for
    # /v1/score, so aliases go to the engine under the route's own name.
    EngineRoute("/score", "POST", "score", "Scores of text pairs (pooling models).", ("/v1/score",), job=True),
    EngineRoute("/rerank", "POST", "rerank", "Jina's and Cohere's rerank shape (pooling models).",
                ("/v1/rerank", "/v2/rerank"), job=True),
    EngineRoute("/classify", "POST", "classify", "Classification (pooling models).", job=True),
    EngineRoute("/pooling", "POST", "pooling", "The pooling model's raw output.", job=True),
    EngineRoute("/v1/messages", "POST", "messages", "Anthropic's Messages API, as `vllm serve` has it.",
                job=True, anthropic=True),
    EngineRoute("/v1/messages/count_tokens", "POST", "count_message_tokens",
                "Anthropic's token count of a Messages request.", job=True, anthropic=True),
    EngineRoute("/tokenize", "POST", "tokenize", "vLLM's tokenizer."),
    EngineRoute("/detokenize", "POST", "detokenize", "vLLM's detokenizer."),
    # SageMaker's inference route: vLLM serves the body as chat, completion or pooling by its
    # shape (invocation_route). Behind API_KEY, unlike `vllm serve`'s.
    EngineRoute("/invocations", "POST", "invocations", "SageMaker's inference route (chat, completion or pooling)."),
    # vLLM serves it with ENABLE_TOKENIZER_INFO_ENDPOINT=true; without, a 404 envelope.
    EngineRoute("/tokenizer_info", "GET", "tokenizer_info", "The tokenizer's configuration."),
    EngineRoute("/version", "GET", "version", "vLLM's version, as `vllm serve` answers it."),
)

MODELS_ROUTE = "/v1/models"
ROUTE_BY_PATH: dict[str, EngineRoute] = {route.path: route for route in ENGINE_ROUTES}
# The routes a RunPod `openai_route` job can name, with their methods.
JOB_ROUTES: dict[str, str] = {route.path: route.method for route in ENGINE_ROUTES if route.job}
ANTHROPIC_ROUTES = frozenset(route.path for route in ENGINE_ROUTES if route.anthropic)
ROUTE_ALIASES: dict[str, str] = {alias: route.path for route in ENGINE_ROUTES for alias in route.aliases}


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
