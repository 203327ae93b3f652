"""The ingress deployment: OpenAI routes under /v1 and /openai/v1, the RunPod native job
format, the concurrency limit, API keys and the error envelope. Every request passes here; the
engine deployment answers it with vLLM's own OpenAI layer, and bytes pass through untouched."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import ray.util
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from configs.placement import per_router_limit
from configs.settings import Settings, StreamTransport
from deployments.adapters.fanout import REQUIRED_FIELDS, adapter_body, load_everywhere, refused, unload_everywhere
from deployments.engine.request_models import RequestSchemas
from deployments.ingress.admission import AdmissionLimiter
from deployments.ingress.cluster_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from deployments.ingress.cluster_metrics import scrape_cluster
from deployments.ingress.errors import (
    EngineUnavailable,
    MetricsUnavailable,
    NotFound,
    ReaderStalled,
    RequestTimeout,
    Unauthorized,
    anthropic_envelope,
    as_anthropic_error,
    envelope,
    error_body,
    error_message,
    sse_error_event,
)
from deployments.ingress.limits import check_request, check_size, parse_body
from deployments.ingress.media_guard import MediaPolicy, check_media
from deployments.ingress.model_engines import ModelEngine, ModelEngines, request_limits
from deployments.ingress.observability import RequestObserver, RequestRecord, RouterMetrics
from deployments.ingress.routes import (
    ENGINE_ROUTES,
    INVOCATIONS,
    MODELS_ROUTE,
    ROUTE_BY_PATH,
    EngineRoute,
    engine_route,
    invocation_route,
    speaks_anthropic,
)
from deployments.ingress.shared_fetch import SharedFetch
from deployments.ingress.stream_end import whole_stream
from deployments.routing.prefix_key import prefix_route_key
from deployments.routing.prefix_router import ROUTE_KEY_ARG
from deployments.runpod_format.native import (
    GenerationFailed,
    NativeAssembler,
    NativeJob,
    SseBatcher,
    batch_defaults,
    normalize_job,
)
from deployments.transport.sse import event_payload, split_sse
from deployments.transport.stream_channel import ChanneledStream, ServeStream, StreamInbox

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 5.0
# How long a call without a body (models) waits for an engine before answering 503: a load
# balancer's readiness probe must get an answer, not a hang, while the engine loads.
READ_TIMEOUT_S = 10.0
REQUEST_ID_HEADER = "x-request-id"
# ROUTING=prefix: requests naming one session go to one engine replica (a conversation's KV cache).
SESSION_HEADER = "x-session-id"
# Engine response headers the caller sees (Serve's proxy adds x-request-id itself).
PASSED_HEADERS = ("x-engine-replica",)

app = FastAPI(
    title="ray-vllm-serve",
    description="vLLM on Ray Serve: OpenAI-compatible API (also under /openai/v1).",
)


# FastAPI serves /openapi.json from a synchronous `app.openapi()`; the ingress's own route (Ingress.openapi)
# awaits vLLM's request models from an engine replica, so FastAPI's route is taken out (/docs and
# /redoc stay, and read the ingress's).
app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) != app.openapi_url]


def openapi_with_request_models(schemas: RequestSchemas | None) -> dict[str, Any]:
    """The routes pass request bytes through, so FastAPI can't see their models: declare vLLM's
    request models (the real contract) in the schema clients and fuzzers read."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
    # The engine routes read ids from the path themselves (Ingress.to_engine): declare them.
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            parameters = operation.setdefault("parameters", [])
            named = {parameter["name"] for parameter in parameters}
            parameters += [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                           for name in re.findall(r"{(\w+)}", path) if name not in named]
            if not parameters:
                del operation["parameters"]
    if schemas is None:
        return schema
    schema.setdefault("components", {}).setdefault("schemas", {}).update(schemas.components)
    # Every path with a body, its aliases and its /openai/v1 twin included, declares its route's model.
    for path, operations in schema["paths"].items():
        route = engine_route(path)
        if "post" in operations and route in schemas.names:
            operations["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schemas.names[route]}"}}},
            }
    return schema


# Whoever else asks FastAPI for the schema gets the ingress's, never a cached one without the models.
app.openapi = lambda: app.openapi_schema or openapi_with_request_models(None)


@app.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods get the same envelope as everything else.
    message = f"{request.method} {request.url.path}: {exc.detail}"
    # The path within the app: Serve mounts it under its route prefix (the scope's root_path).
    if speaks_anthropic(request.url.path.removeprefix(request.scope.get("root_path", ""))):
        return JSONResponse(anthropic_envelope(message, exc.status_code), status_code=exc.status_code)
    err_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
    return JSONResponse(envelope(message, err_type, exc.status_code), status_code=exc.status_code)


def error_response(exc: BaseException, request_id: str, anthropic: bool = False) -> JSONResponse:
    """The envelope with its status (the request id header comes from Serve's proxy)."""
    status, body = error_body(exc, anthropic)
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    if status >= 500:
        logger.warning("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
    return JSONResponse(body, status_code=status, headers=headers)


def current_request_id(request: Request) -> str:
    """Serve's proxy echoes the caller's X-Request-Id or makes one, and returns it in the response;
    vLLM gets the same id so engine logs and the caller's header agree."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


class Ingress:
    """Serve ingress. Not decorated here: the app builder applies options from configs.placement."""

    def __init__(self, engines: list[tuple[DeploymentHandle, Settings]], settings: Settings,
                 adapter_registry: DeploymentHandle | None = None) -> None:
        # Each model's engine deployment (MODELS; one model: one), its handle methods configured once.
        self._engines = ModelEngines(engines)
        # VLLM_ALLOW_RUNTIME_LORA_UPDATING: where runtime adapters are recorded (deployments.adapters).
        self._adapter_registry = adapter_registry
        # Streamed bodies come back through this replica's channel (deployments.transport.stream_channel).
        self._inbox = StreamInbox(ray.util.get_node_ip_address(), settings.STREAM_BUFFER_BYTES)
        # Which ingress replica answered, as x-engine-replica says which engine did: with
        # ROUTER_REPLICAS > 1, where to look when one misbehaves.
        self._replica_header = {"x-ingress-replica": serve.get_replica_context().replica_id.unique_id}
        self._engine_was_ready = False  # /ping: "initializing" until an engine first answers
        self._settings = settings
        self._api_keys = tuple(k.encode() for k in settings.api_keys)
        self._limiter = AdmissionLimiter(
            per_router_limit(settings.MAX_CONCURRENCY, settings.ROUTER_REPLICAS),
            per_router_limit(settings.MAX_QUEUED_REQUESTS, settings.ROUTER_REPLICAS, least=0),
        )
        self._batch_defaults = batch_defaults(settings)
        # vLLM's request fields, for the checks: from an engine replica, which has vLLM imported
        # (deployments.engine.request_models). Requests that need them before any engine is up wait for one,
        # as they would for the engine anyway.
        self._request_fields = SharedFetch(self._engines.default.handle.request_fields.remote).get
        # The body size limit, before a body says which model it is for (the others are the model's).
        self._limits = request_limits(settings)
        self._media_policy = MediaPolicy(
            frozenset(settings.allowed_media_domains),
            allow_files="--allowed-local-media-path" in settings.engine_cli_overrides,
        )
        # One pool for /metrics scrapes of the nodes' metrics agents (cluster-internal addresses).
        self._metrics_client = httpx.AsyncClient(trust_env=False)
        self._observer = RequestObserver(
            settings.LOG_FORMAT, RouterMetrics(serve.get_replica_context().app_name), self._limiter
        )

    # --- HTTP routes ------------------------------------------------------------------------------
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        """FastAPI's schema of the routes, with vLLM's request models from an engine replica."""
        if app.openapi_schema is None:
            try:
                schemas = await asyncio.wait_for(self._request_schemas(), READ_TIMEOUT_S)
            except Exception as exc:
                # No engine up yet: the routes without their models, for now (not kept).
                logger.info("OpenAPI schema without vLLM's request models: %s", type(exc).__name__)
                return JSONResponse(openapi_with_request_models(None))
            app.openapi_schema = openapi_with_request_models(schemas)
        return JSONResponse(app.openapi_schema)

    async def _engine_unready(self) -> EngineUnavailable | None:
        """None once an engine of every model answers its health check, else why not."""
        engines = list(self._engines)
        answers = await asyncio.gather(
            *(asyncio.wait_for(engine.handle.check_health.remote(), HEALTH_TIMEOUT_S) for engine in engines),
            return_exceptions=True,
        )
        for engine, answer in zip(engines, answers, strict=True):
            if isinstance(answer, BaseException):
                which = f" for {engine.name}" if self._engines.several else ""
                return EngineUnavailable(f"engine{which} not ready: {type(answer).__name__}")
        self._engine_was_ready = True
        return None

    @app.get("/health")
    async def health(self) -> Response:
        """200 once an engine of every model can serve; 503 while one can't (loading, restarting or dead)."""
        unready = await self._engine_unready()
        return Response(status_code=200) if unready is None else error_response(unready, "health")

    @app.get("/ping")
    async def ping(self) -> Response:
        """RunPod load-balancing endpoints' health probe: 200 ready, 204 while the engine loads
        (RunPod's "initializing"), 503 when an engine that was ready stops answering."""
        unready = await self._engine_unready()
        if unready is None:
            return JSONResponse({"status": "healthy"})
        if not self._engine_was_ready:
            return Response(status_code=204)
        return error_response(unready, "ping")

    @app.get("/load")
    async def load(self, request: Request) -> JSONResponse:
        """`vllm serve`'s server load: the requests this ingress holds (in flight and queued)."""
        try:
            self._authorize(request.headers)
        except Unauthorized as exc:
            return error_response(exc, "load")
        return JSONResponse({"server_load": self._limiter.in_flight + self._limiter.queued})

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """The cluster's Prometheus metrics (ours, vLLM's, Ray's), as `vllm serve` has /metrics
        on its API port; behind API_KEY when it is set."""
        try:
            self._authorize(request.headers)
            text = await scrape_cluster(self._metrics_client)
        except (Unauthorized, MetricsUnavailable) as exc:
            return error_response(exc, "metrics")
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    async def to_engine(self, request: Request) -> Response:
        """Every route of deployments.ingress.routes.ENGINE_ROUTES (registered below the class):
        vLLM's own answer, through the checks, the limits and the envelope."""
        # The matched route's template names it in logs and metrics (an id in the path would not).
        template = request.scope["route"].path_format
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        route = ROUTE_BY_PATH[engine_route(template)]
        if route.path == MODELS_ROUTE and self._engines.several:
            return await self._every_model(request, route)
        return await self._forward(request, route, engine_route(path))

    # A request's path is matched against the routes in order; this pattern needn't cost the
    # engine routes anything, and FastAPI registers the class's own routes before them.
    @app.get("/v1/models/{model:path}")
    @app.get("/openai/v1/models/{model:path}")
    async def model(self, request: Request, model: str) -> Response:
        """One model's card (OpenAI's and Ray Serve LLM's `models.retrieve`; `vllm serve` has only
        the list): the engine's list, filtered here."""
        route = ROUTE_BY_PATH[MODELS_ROUTE]
        several = self._engines.several
        listed = await (self._every_model(request, route) if several else self._forward(request, route))
        if listed.status_code != 200:
            return listed
        card = model_card(listed.body, model)
        if card is None:
            return error_response(NotFound(f"The model `{model}` does not exist.", "model"), "models")
        replica = {k: v for k, v in listed.headers.items() if k in PASSED_HEADERS}
        return Response(card, media_type="application/json", headers=replica)

    @app.post("/v1/load_lora_adapter")
    @app.post("/openai/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        """`vllm serve`'s runtime LoRA load (VLLM_ALLOW_RUNTIME_LORA_UPDATING), on every engine replica:
        `{"lora_name", "lora_path", "load_inplace"?}`; the path is read on each replica's node."""
        return await self._adapter_call(request, "load")

    @app.post("/v1/unload_lora_adapter")
    @app.post("/openai/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        """`vllm serve`'s runtime LoRA unload, on every engine replica: `{"lora_name"}`."""
        return await self._adapter_call(request, "unload")

    async def _adapter_call(self, request: Request, action: str) -> Response:
        record = RequestRecord(current_request_id(request), f"/v1/{action}_lora_adapter")
        try:
            self._authorize(request.headers)
            if self._adapter_registry is None:
                raise NotFound("Loading LoRA adapters at runtime is off: start the app with "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (and API_KEY).")
            spec = adapter_body(await self._read_body(request), REQUIRED_FIELDS[action])
            name = spec["lora_name"]
            engine = self._engines.default  # runtime LoRA serves one model (configs.models)
            outcome = refused(name, engine.name, engine.settings.static_adapter_names, action)
            if outcome is None and action == "load":
                outcome = await load_everywhere(engine.handle, self._adapter_registry, spec)
            elif outcome is None:
                outcome = await unload_everywhere(engine.handle, self._adapter_registry, name)
        except Exception as exc:
            return self._fail(exc, record)
        record.status = outcome.status
        self._observer.finish(record)
        if outcome.ok:
            logger.info("LoRA adapter %s: %s on every engine replica", spec["lora_name"], action)
            return Response(outcome.message, media_type="text/plain")
        body = envelope(outcome.message, outcome.err_type or "BadRequestError", outcome.status, outcome.param)
        return JSONResponse(body, status_code=outcome.status)

    async def _every_model(self, request: Request, route: EngineRoute) -> Response:
        """`GET /v1/models` with several models: each engine's list (its model, its adapters), as one."""
        record = RequestRecord(current_request_id(request), route.path)
        try:
            self._authorize(request.headers)
            listed = await self._all_models(record.request_id)
        except Exception as exc:
            return self._fail(exc, record)
        record.status = 200
        self._observer.finish(record)
        return JSONResponse(listed, headers=self._replica_header)

    async def _all_models(self, request_id: str) -> dict[str, Any]:
        """Every model's `/v1/models` list as one, in MODELS' order."""
        headers = [(REQUEST_ID_HEADER, request_id)]

        async def listed(engine: ModelEngine) -> list[dict[str, Any]]:
            stream = self._call_engine(engine, "GET", MODELS_ROUTE, headers, b"")
            try:
                status, _, body, _ = await asyncio.wait_for(stream.__anext__(), READ_TIMEOUT_S)
            finally:
                stream.cancel()
            if status != 200:
                raise EngineUnavailable(f"the engine for {engine.name} answered {status}: {error_message(body)}")
            return json.loads(body)["data"]

        lists = await asyncio.gather(*(listed(engine) for engine in self._engines))
        return {"object": "list", "data": [card for cards in lists for card in cards]}

    async def _request_schemas(self) -> RequestSchemas:
        return await self._engines.default.handle.request_schemas.remote()

    # --- the path every OpenAI request takes ------------------------------------------------------
    def _authorize(self, headers: Any) -> None:
        """`Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key: <key>` (Anthropic's)."""
        if not self._api_keys:
            return
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not presented:
            presented = (headers.get("x-api-key") or "").strip().encode()
        # Compare against every key, in constant time for each, so timing reveals nothing.
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise Unauthorized(
                "Missing or invalid API key: send `Authorization: Bearer <API_KEY>` (or `x-api-key: <API_KEY>`)"
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body, never more than MAX_REQUEST_BYTES of it in memory."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            check_size(int(declared), self._limits)
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            check_size(size, self._limits)
            parts.append(part)
        return b"".join(parts)

    async def _admit(self, path: str, body: bytes) -> tuple[Any, ModelEngine]:
        """Limits first (a bad request must not wait in the queue), then a MAX_CONCURRENCY slot.
        Returns the parsed body and the engine of the model it names."""
        fields = await self._request_fields()
        payload = parse_body(body)
        engine = self._engines.for_payload(payload)
        checked_as = invocation_route(payload) if path == INVOCATIONS else path
        if checked_as is not None:
            check_request(payload, engine.limits, fields.objects[checked_as], checked_as)
        await check_media(payload, self._media_policy)
        await self._limiter.acquire()
        self._observer.update_gauges()
        return payload, engine

    def _call_engine(self, engine: ModelEngine, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                     payload: Any = None, session_id: str | None = None) -> ChanneledStream | ServeStream:
        """One call to the engine deployment: its head through Serve, a streamed body through the
        channel (or, with STREAM_TRANSPORT=serve, through Serve's streamed call as well). With
        ROUTING=prefix the call carries the prompt's prefix key for Serve's request router; a
        request naming a runtime LoRA adapter carries it as its multiplexed model id, so Serve
        routes it to a replica that has the adapter loaded."""
        routing = None
        if engine.settings.routes_by_prefix:
            key = prefix_route_key(payload, session_id)
            routing = {ROUTE_KEY_ARG: key} if key else None
        engine_http = engine.http
        if (adapter := self._runtime_adapter(engine, payload)) is not None:
            engine_http = engine_http.options(multiplexed_model_id=adapter)
        if self._settings.STREAM_TRANSPORT is StreamTransport.SERVE:
            return ServeStream(engine_http, method, path, headers, body, routing)
        return ChanneledStream(self._inbox, engine_http, method, path, headers, body, routing)

    def _runtime_adapter(self, engine: ModelEngine, payload: Any) -> str | None:
        """The model a request names when it may be a runtime LoRA adapter: not the base model nor
        a LORA_MODULES adapter, which every replica serves from its start."""
        if self._adapter_registry is None or not isinstance(payload, dict):
            return None
        model = payload.get("model")
        return model if isinstance(model, str) and model and model not in engine.own_names else None

    def _deadline(self) -> float:
        """When a request arriving now must have finished (REQUEST_TIMEOUT), on the loop's clock."""
        return asyncio.get_running_loop().time() + self._settings.REQUEST_TIMEOUT

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(
            f"The request did not finish within REQUEST_TIMEOUT ({self._settings.REQUEST_TIMEOUT:g} s) and was "
            "aborted; retry it, or ask for fewer tokens."
        )

    def _timed_out(self, exc: BaseException, timer: asyncio.Timeout) -> BaseException:
        """The deadline's TimeoutError as a RequestTimeout (504); any other failure as it is."""
        return self._timeout() if isinstance(exc, TimeoutError) and timer.expired() else exc

    def _fail(self, exc: BaseException, record: RequestRecord, anthropic: bool = False) -> JSONResponse:
        response = error_response(exc, record.request_id, anthropic)
        record.status = response.status_code
        if 400 <= record.status < 500:
            self._observer.rejected({401: "unauthorized", 429: "overloaded"}.get(record.status, "invalid"))
        self._observer.finish(record)
        return response

    async def _forward(self, request: Request, route: EngineRoute, path: str | None = None) -> Response:
        """A request to the engine on `route` (at `path` when the path carries an id)."""
        path = path or route.path
        record = RequestRecord(current_request_id(request), route.path)
        anthropic = route.anthropic
        admitted = route.admitted
        deadline = self._deadline()
        timer = asyncio.timeout_at(deadline)
        payload, engine = None, self._engines.default
        try:
            async with timer:
                self._authorize(request.headers)
                body = await self._read_body(request)
                if admitted:
                    payload, engine = await self._admit(route.path, body)
        except Exception as exc:
            return self._fail(self._timed_out(exc, timer), record, anthropic)
        headers = [
            ("content-type", request.headers.get("content-type", "application/json")),
            (REQUEST_ID_HEADER, record.request_id),
        ]
        timer = asyncio.timeout_at(deadline)
        stream = self._call_engine(engine, request.method, path, headers, body, payload,
                                   request.headers.get(SESSION_HEADER))
        try:
            async with timer:
                first = stream.__anext__()
                status, engine_headers, first_part, more = await (
                    first if admitted else asyncio.wait_for(first, READ_TIMEOUT_S)
                )
        except BaseException as exc:
            stream.cancel()  # whatever it got to: its engine call and its channel stream end here
            if admitted:
                self._limiter.release()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return self._fail(self._timed_out(exc, timer), record, anthropic)
        record.status = status
        record.saw_first_byte()
        engine_headers = dict(engine_headers)
        response_headers = {k: engine_headers[k] for k in PASSED_HEADERS if k in engine_headers}
        response_headers.update(self._replica_header)
        if not more:
            if admitted:
                self._limiter.release()
            record.read_usage(first_part)
            self._observer.finish(record)
            media_type = engine_headers.get("content-type", "application/json")
            if anthropic and status >= 400:
                first_part, media_type = as_anthropic_error(status, first_part), "application/json"
            return Response(first_part, status_code=status, media_type=media_type, headers=response_headers)
        # Past the deadline the stream's call is cancelled (vLLM aborts the request) and its reader
        # gets the 504 as the stream's error event.
        watchdog = asyncio.get_running_loop().call_at(deadline, stream.expire, self._timeout())
        return StreamingResponse(
            self._relay(stream, first_part, record, admitted, anthropic, watchdog),
            status_code=status,
            media_type="text/event-stream",
            headers=response_headers,
        )

    async def _relay(self, stream: Any, first_part: bytes, record: RequestRecord, admitted: bool,
                     anthropic: bool, watchdog: asyncio.TimerHandle) -> AsyncIterator[bytes]:
        """Passes the engine's SSE bytes through; a failure mid-stream becomes an SSE error event."""
        released = False

        def release() -> None:
            nonlocal released
            if admitted and not released:
                released = True
                self._limiter.release()

        def stalled() -> None:
            # The client read nothing for STREAM_STALL_TIMEOUT: the write to it is stuck, so this
            # relay can't get on to its `finally`. Abort the request, free its slot now, and end
            # the response (the task writing it is cancelled; the client gets a cut-off stream).
            logger.warning("stream %s aborted: its client read nothing for %g s (STREAM_STALL_TIMEOUT)",
                           record.request_id, self._settings.STREAM_STALL_TIMEOUT)
            record.status = error_body(ReaderStalled(""))[0]
            stream.cancel()
            release()
            task.cancel()

        task = asyncio.current_task()
        assert task is not None
        guard = StallGuard(self._settings.STREAM_STALL_TIMEOUT, stalled)
        try:
            async for part in whole_stream(first_part, stream, record.route):
                record.count_stream_part(part)
                guard.writing()
                yield part
                guard.written()
        except Exception as exc:
            logger.warning("stream %s failed: %s: %s", record.request_id, type(exc).__name__, exc)
            record.status = error_body(exc)[0]
            yield sse_error_event(exc, anthropic)
        finally:
            # Client gone or stream done: cancelling the handle call aborts the request in the engine.
            guard.stop()
            watchdog.cancel()
            stream.cancel()
            release()
            self._observer.finish(record)

    def __del__(self) -> None:
        # Serve calls this when the replica stops: its stream channel stops listening, so no engine
        # replica opens a connection to a replica that is going away.
        inbox = getattr(self, "_inbox", None)
        if inbox is not None:
            inbox.shutdown()

    async def admission(self) -> dict[str, int]:
        """This replica's limiter (for operators and tests): requests in flight, queued, and the limit."""
        return {"in_flight": self._limiter.in_flight, "queued": self._limiter.queued, "limit": self._limiter.limit}

    # --- RunPod jobs (called through this deployment's handle by the RunPod worker) ----------------
    async def native(self, job_input: Any, job_id: str) -> AsyncIterator[Any]:
        """One RunPod job: worker-vllm's native input or an openai_route job. Yields worker-vllm's
        output shapes; a failure is one final `{"error": message}` (the worker marks the job FAILED)."""
        record = RequestRecord(job_id, "runpod")
        deadline = self._deadline()
        timer = asyncio.timeout_at(deadline)
        try:
            fields = await self._request_fields()
            job = normalize_job(
                job_input,
                served_model=self._engines.default.name,
                defaults=self._batch_defaults,
                chat_fields=fields.chat,
                completion_fields=fields.completion,
            )
            for warning in job.warnings:
                logger.warning("job %s: %s", job_id, warning)
            admitted = job.method == "POST"
            engine = self._engines.for_payload(job.body)
            if admitted:
                check_size(len(json.dumps(job.body)), self._limits)
                check_request(job.body, engine.limits, fields.objects[job.route], job.route)
                await check_media(job.body, self._media_policy)
                async with timer:
                    await self._limiter.acquire()
        except Exception as exc:
            exc = self._timed_out(exc, timer)
            self._fail(exc, record)
            yield {"error": error_body(exc)[1]["error"]["message"]}
            return
        stream = watchdog = None
        record.status = 200
        timer = asyncio.timeout_at(deadline)
        try:
            if job.route == MODELS_ROUTE and self._engines.several:
                async with timer:
                    yield await self._all_models(job_id)
                return
            body = json.dumps(job.body).encode() if job.body is not None else b""
            headers = [("content-type", "application/json"), (REQUEST_ID_HEADER, job_id)]
            stream = self._call_engine(engine, job.method, job.route, headers, body, job.body)
            async with timer:
                status, _, first_part, more = await stream.__anext__()
            watchdog = asyncio.get_running_loop().call_at(deadline, stream.expire, self._timeout())
            record.status = status
            record.saw_first_byte()
            if status >= 400:
                yield {"error": error_message(first_part)}
                return
            if job.kind == "openai":
                if not more:
                    yield json.loads(first_part)
                else:
                    async for batch in _sse_batches(job, first_part, stream, self._settings.RAW_OPENAI_OUTPUT):
                        yield batch
                return
            async for output in _native_outputs(job, first_part, stream):
                record.tokens = output.get("usage", {}).get("output", record.tokens)
                record.chunks += 1
                yield output
        except GenerationFailed as exc:
            record.status = 500
            yield {"error": str(exc)}
        except Exception as exc:
            exc = self._timed_out(exc, timer)
            logger.warning("job %s failed: %s: %s", job_id, type(exc).__name__, exc)
            record.status = error_body(exc)[0]
            yield {"error": error_body(exc)[1]["error"]["message"]}
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if stream is not None:
                stream.cancel()
            if admitted:
                self._limiter.release()
            self._observer.finish(record)


class StallGuard:
    """Calls `on_stall` when one write to a stream's client has waited `timeout_s` (the client
    stopped reading). Per part it only notes the time; a timer looks every quarter of the timeout."""

    __slots__ = ("_timeout_s", "_on_stall", "_writing_since", "_timer", "_loop")

    def __init__(self, timeout_s: float, on_stall: Callable[[], None]) -> None:
        self._timeout_s = timeout_s
        self._on_stall = on_stall
        self._writing_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(self._interval(), self._check)

    def _interval(self) -> float:
        return max(0.05, self._timeout_s / 4)

    def writing(self) -> None:
        self._writing_since = self._loop.time()

    def written(self) -> None:
        self._writing_since = None

    def _check(self) -> None:
        since = self._writing_since
        if since is not None and self._loop.time() - since >= self._timeout_s:
            self._timer = None
            self._on_stall()
            return
        self._timer = self._loop.call_later(self._interval(), self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def model_card(model_list: bytes, model_id: str) -> bytes | None:
    """The card of `model_id` in vLLM's `/v1/models` answer (the served name, a LoRA adapter's...)."""
    for card in json.loads(model_list).get("data", []):
        if card.get("id") == model_id:
            return json.dumps(card).encode()
    return None


async def _sse_batches(job: NativeJob, first_part: bytes, stream: Any, raw: bool) -> AsyncIterator[Any]:
    """An OpenAI-shaped job's stream in worker-vllm's batches (deployments.runpod_format.native.SseBatcher)."""
    batcher = SseBatcher(job.batch, raw)
    async for part in whole_stream(first_part, stream, job.route):
        for batch in batcher.feed(part):
            yield batch
    for batch in batcher.finish():
        yield batch


async def _native_outputs(job: NativeJob, first_part: bytes, stream: Any) -> AsyncIterator[dict[str, Any]]:
    assembler = NativeAssembler(job)
    if not job.body or not job.body.get("stream"):
        for batch in [*assembler.feed(json.loads(first_part)), *assembler.finish()]:
            yield batch
        return
    buffer = b""
    async for part in whole_stream(first_part, stream, job.route):
        events, buffer = split_sse(buffer + part)
        for event in events:
            payload = event_payload(event)
            if payload is not None:
                for batch in assembler.feed(payload):
                    yield batch
    for batch in assembler.finish():
        yield batch


def _register_engine_routes() -> None:
    """The engine routes, from the one table: each public path (aliases and /openai/v1 twins
    included) is served by Ingress.to_engine, and the OpenAPI schema lists it with its summary."""
    for route in ENGINE_ROUTES:
        for public_path in route.public_paths():
            app.add_api_route(public_path, Ingress.to_engine, methods=[route.method], name=route.name,
                              summary=route.summary)


_register_engine_routes()


def ingress_deployment(options: dict[str, Any]):
    return serve.deployment(serve.ingress(app)(Ingress), name="Ingress", **options)


