"""A stand-in for the engine deployment (as Ray Serve LLM's tests have `MockVLLMEngine`): the same
interface as `deployments.engine.server.EngineServer` and the same transport (the ASGI bridge, the ingress's
stream channel), over a small OpenAI-shaped app instead of vLLM. The ingress's request lifecycle
(admission, limits, aborts, deadlines, errors, native batching) runs against it in seconds: `make
test-fast`. Never the proof that a feature works with vLLM: the real suite is.

Its "model" writes `tok0 tok1 ...`, one token every `token_interval_s`, so a test can hold requests
in flight, abandon them, or outlast a deadline; `running_requests` counts what it is generating, as
the real engine's does."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from configs.settings import Accelerator, Settings
from deployments.engine.request_models import RequestFields
from deployments.ingress.errors import envelope
from deployments.routing.prefix_key import RouteKey
from deployments.transport.asgi_bridge import ResponseHead
from deployments.transport.stream_channel import BodyEnd, ReplyChannels, ReplyTo

DEFAULT_TOKEN_INTERVAL_S = 0.01
DEFAULT_MAX_TOKENS = 16

# The request fields the ingress checks native `sampling_params` against (vLLM's are a superset).
SAMPLING_FIELDS = frozenset({
    "model", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "seed", "stop",
    "stream", "stream_options", "logprobs", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
})


def _only_stream_options() -> frozenset[str]:
    return frozenset({"stream_options"})


def fake_request_fields() -> RequestFields:
    return RequestFields(
        chat=SAMPLING_FIELDS | {"messages", "add_generation_prompt", "continue_final_message", "echo"},
        completion=SAMPLING_FIELDS | {"prompt", "echo"},
        # Every route: only stream_options must be an object (vLLM types more fields so).
        objects=defaultdict(_only_stream_options),
    )


def _error(message: str, status: int, param: str | None = None, err_type: str = "BadRequestError") -> JSONResponse:
    return JSONResponse(envelope(message, err_type, status, param), status_code=status)


def fake_openai_app(model: str, max_model_len: int, token_interval_s: float, running: set[str]) -> FastAPI:
    """Chat and completions (streamed or not, n choices, usage), models, tokenize and health."""
    app = FastAPI()

    async def tokens(request_id: str, count: int) -> AsyncIterator[str]:
        running.add(request_id)
        try:
            for i in range(count):
                await asyncio.sleep(token_interval_s)
                yield f"tok{i} "
        finally:
            running.discard(request_id)

    async def generate(raw: Request, chat: bool) -> Any:
        body = await raw.json()
        if body.get("model", model) != model:
            return _error(f"The model `{body.get('model')}` does not exist.", 404, "model", "NotFoundError")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error("max_tokens must be at least 1", 400, "max_tokens")
        prompts = [None] if chat else (body["prompt"] if isinstance(body.get("prompt"), list) else [body.get("prompt")])
        n = body.get("n") or 1
        prompt_tokens = 3 * len(prompts)
        request_id = raw.headers.get("x-request-id") or uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        indexes = range(len(prompts) * n)

        def choice(index: int, text: str, finish: str | None, streamed: bool) -> dict[str, Any]:
            if not chat:
                return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            if streamed:
                return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        def usage(completion_tokens: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        if not body.get("stream"):
            text = "".join([t async for t in tokens(request_id, max_tokens)])
            return {"id": f"cmpl-{request_id}", "object": kind, "created": created, "model": model,
                    "choices": [choice(i, text, "length", False) for i in indexes],
                    "usage": usage(max_tokens * len(indexes))}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        continuous_usage = bool(options.get("continuous_usage_stats"))

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def stream() -> AsyncIterator[str]:
            sent = 0
            async for token in tokens(request_id, max_tokens):
                sent += 1
                finish = "length" if sent == max_tokens else None
                chunk = {"id": f"cmpl-{request_id}", "object": chunk_kind, "created": created, "model": model,
                         "choices": [choice(i, token, finish, True) for i in indexes]}
                if continuous_usage:  # what RunPod native jobs count their batches' tokens by
                    chunk["usage"] = usage(sent * len(indexes))
                yield event(chunk)
            if include_usage:
                yield event({"id": f"cmpl-{request_id}", "object": chunk_kind, "created": created, "model": model,
                             "choices": [], "usage": usage(sent * len(indexes))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Any:
        return await generate(raw, chat=True)

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Any:
        return await generate(raw, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake",
                                            "root": model, "max_model_len": max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> dict[str, Any]:
        body = await raw.json()
        ids = list(range(len(str(body.get("prompt", "")).split())))
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": "fake"}

    return app


class FakeEngineServer:
    """The engine deployment's interface (see deployments.engine.server.EngineServer) without vLLM."""

    def __init__(self, settings: Settings, accelerator: Accelerator,
                 token_interval_s: float = DEFAULT_TOKEN_INTERVAL_S) -> None:
        self._running: set[str] = set()
        self._app = fake_openai_app(settings.served_model_name, settings.MAX_MODEL_LEN or 2048,
                                    token_interval_s, self._running)
        self._reply_channels = ReplyChannels()
        self._replica_header = ("x-engine-replica", serve.get_replica_context().replica_id.unique_id)

    async def http(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, reply_to: ReplyTo | None = None,
        route_key: RouteKey | None = None,
    ) -> AsyncIterator[ResponseHead | bytes | BodyEnd]:
        async for item in self._reply_channels.answer(self._app, method, path, headers, body, reply_to,
                                                      self._replica_header):
            yield item

    async def request_fields(self) -> RequestFields:
        return fake_request_fields()

    async def request_schemas(self) -> None:
        return None  # the ingress serves its OpenAPI document without request models

    async def check_health(self) -> None:
        return None

    async def running_requests(self) -> int:
        return len(self._running)

    def __del__(self) -> None:
        channels = getattr(self, "_reply_channels", None)
        if channels is not None:
            channels.close()
