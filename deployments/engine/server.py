"""The engine deployment: one vLLM `AsyncLLM` per replica, placed on the replica's placement group,
with vLLM's own OpenAI server app (chat, completions, models, tools, response_format, logprobs...)
called in-process. Request semantics are exactly `vllm serve`'s; what is ours lives in the ingress."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from functools import partial
from types import SimpleNamespace
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from configs.engine_args import OPERATOR_OVERRIDABLE, engine_process_environment, vllm_cli_args
from configs.settings import Accelerator, Settings
from deployments.adapters.engine_side import EngineAdapters
from deployments.adapters.outcome import OK, AdapterOutcome
from deployments.engine import core_process as engine_core_process
from deployments.engine import process_title
from deployments.engine.request_models import RequestFields, RequestSchemas, load_request_fields, load_request_schemas
from deployments.ingress.errors import envelope
from deployments.routing.prefix_key import RouteKey
from deployments.transport.asgi_bridge import ResponseHead
from deployments.transport.stream_channel import BodyEnd, ReplyChannels, ReplyTo

logger = logging.getLogger("ray.serve")

# Middleware of vLLM's server that only an HTTP server needs. In-process the ingress is the HTTP
# server: CORS answers browsers (none reach this app), and the instrumentator's http_* metrics live
# in a registry nothing scrapes here. Each wraps every streamed chunk's `send` (both showed in the
# engine replica's py-spy profile under load). vLLM's other middleware stays.
HTTP_ONLY_MIDDLEWARE = frozenset({"CORSMiddleware", "PrometheusInstrumentatorMiddleware"})
# How long the health check waits for the engine core to answer a probe between its steps: far above
# a step's time, so only a hung core (stopped, deadlocked) fails it.
ENGINE_PROBE_TIMEOUT_S = 20.0
# FastAPI's answer for a route the app doesn't have.
ROUTE_NOT_FOUND = b'{"detail":"Not Found"}'


def parse_vllm_args(cli_args: list[str]):
    """vLLM's own parser and its own checks, as `vllm serve` runs them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cli_args)
    validate_parsed_serve_args(args)
    return args


def without_http_only_middleware(app: Any) -> list[str]:
    """Drops HTTP_ONLY_MIDDLEWARE from vLLM's app (Starlette builds its stack on the first call);
    returns the names dropped."""
    dropped = [m.cls.__name__ for m in app.user_middleware if m.cls.__name__ in HTTP_ONLY_MIDDLEWARE]
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls.__name__ not in HTTP_ONLY_MIDDLEWARE]
    app.middleware_stack = None
    return dropped


def prepare_process_environment(settings: Settings, accelerator: Accelerator) -> None:
    """Environment vLLM reads in this replica, set before anything imports huggingface_hub or vLLM
    (they read it once). What an operator may set otherwise (a thread binding...) stays theirs."""
    env = engine_process_environment(settings, accelerator, sorted(os.sched_getaffinity(0)))
    os.environ.update({k: v for k, v in env.items() if k not in OPERATOR_OVERRIDABLE or k not in os.environ})


class EngineServer:
    """Serve replica holding one vLLM engine. Not decorated here: the app builder applies the
    deployment options computed in `configs.placement` (placement group, replicas, limits)."""

    async def __init__(self, settings: Settings, accelerator: Accelerator,
                       adapter_registry: DeploymentHandle | None = None) -> None:
        started = time.monotonic()
        prepare_process_environment(settings, accelerator)
        # Before any process of the engine starts: they inherit the order (deployments.engine.process_title).
        process_title.anchor_environment_first()
        # Before this process imports vLLM: the fork server imports it meanwhile, for the engine core.
        forkserver_started = engine_core_process.start_forkserver()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.api_server import build_app, init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path = settings.MODEL_NAME
        if settings.uses_demo_model:
            from deployments.engine.demo_model import ensure_demo_model

            model_path = str(ensure_demo_model(settings.DEMO_MODEL_DIR))
        args = parse_vllm_args(vllm_cli_args(settings, accelerator, model_path))
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        if accelerator is Accelerator.GPU:
            import ray.util

            # The ray executor places its GPU workers on this replica's bundles.
            vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        engine_core_forked = forkserver_started and engine_core_process.install(vllm_config)

        self._engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            # vLLM's engine metrics (vllm:*) through Ray's metrics export, beside the ingress's.
            stat_loggers=[RayPrometheusStatLogger],
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )
        tasks = await self._engine.get_supported_tasks()
        self._tasks = tuple(tasks)
        self._app = build_app(args, tasks, self._engine.model_config)
        without_http_only_middleware(self._app)
        await init_app_state(self._engine, self._app.state, args, tasks)
        # vLLM's error path flips `state.server.should_exit` (uvicorn's); Serve restarts replicas
        # through check_health instead, but the attribute must exist.
        self._app.state.server = SimpleNamespace()
        self._served_model_name = settings.served_model_name
        # For the ingress's request checks (it doesn't import vLLM): ~1 ms here, where vLLM is loaded.
        self._request_fields = load_request_fields()
        self._request_schemas: RequestSchemas | None = None
        self._reply_channels = ReplyChannels()
        self._replica_header = ("x-engine-replica", serve.get_replica_context().replica_id.unique_id)
        # VLLM_ALLOW_RUNTIME_LORA_UPDATING: adapters loaded at runtime, those loaded before this
        # replica started included (deployments.adapters).
        self._adapters: EngineAdapters | None = None
        if adapter_registry is not None:
            self._adapters = EngineAdapters(self._app.state.openai_serving_models, adapter_registry)
            await self._adapters.load_registered()
        logger.info("vLLM engine for %s ready in %.1f s (engine core %s)", self._served_model_name,
                    time.monotonic() - started, "forked from the preloaded fork server" if engine_core_forked
                    else "started by vLLM's own method")

    async def http(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, reply_to: ReplyTo | None = None,
        route_key: RouteKey | None = None,
    ) -> AsyncIterator[ResponseHead | bytes | BodyEnd]:
        """One OpenAI request through vLLM's server app: a ResponseHead, then the body's other parts,
        as items of this call or, with `reply_to`, through the ingress's channel and then a BodyEnd
        (deployments.transport.stream_channel). `route_key` is for the ingress's request router
        (ROUTING=prefix, deployments.routing.prefix_router), which reads it from the call. A request
        naming a runtime LoRA adapter comes with it as its multiplexed model id."""
        if self._adapters is not None and (adapter := serve.get_multiplexed_model_id()):
            await self._adapters.ensure(adapter)
        answer = self._reply_channels.answer(self._app, method, path, headers, body, reply_to,
                                             self._replica_header, partial(self._fix_head, path))
        async for item in answer:
            yield item

    def _fix_head(self, path: str, head: ResponseHead) -> ResponseHead:
        """vLLM's answers that are not envelopes, as envelopes."""
        status, response_headers, first_part, more = head
        if status >= 500 and not more and self._engine.errored:
            # vLLM reports a dead engine as a 500; to the caller it is a retryable 503: Serve's
            # health check is replacing this replica, and other replicas keep serving.
            status, first_part = 503, json.dumps(envelope(
                "The engine died; its replica is being replaced. Retry the request.",
                "ServiceUnavailableError", 503,
            )).encode()
        elif status == 404 and not more and first_part == ROUTE_NOT_FOUND:
            # vLLM registers only the routes its model's tasks serve (no chat on an embedding
            # model, no embeddings on a generation model); its FastAPI 404 is not an envelope.
            first_part = json.dumps(envelope(
                f"The model {self._served_model_name} does not serve {path} "
                f"(it runs as: {', '.join(self._tasks)})", "NotFoundError", 404,
            )).encode()
        return status, response_headers, first_part, more

    async def adapter(self, action: str, spec: dict[str, Any]) -> AdapterOutcome:
        """A runtime LoRA `load`, `unload` or `restore` (undoing a load that failed elsewhere) on this
        replica; the ingress calls it on every replica at once (deployments.adapters.fanout)."""
        adapters = self._adapters
        if adapters is None:
            return AdapterOutcome(404, "Runtime LoRA is off (VLLM_ALLOW_RUNTIME_LORA_UPDATING).", "NotFoundError")
        if action == "load":
            return await adapters.load(spec)
        if action == "unload":
            return await adapters.unload(spec["lora_name"])
        if action == "restore":
            await adapters.restore(spec["lora_name"], spec["failed_path"], spec["previous_path"])
            return AdapterOutcome(OK, "restored")
        raise ValueError(f"unknown adapter action {action!r}")

    async def loaded_adapters(self) -> list[str]:
        """The LoRA adapters this replica serves (for operators and tests)."""
        return sorted(self._app.state.openai_serving_models.lora_requests)

    async def request_fields(self) -> RequestFields:
        """vLLM's request fields the ingress checks requests against."""
        return self._request_fields

    async def request_schemas(self) -> RequestSchemas:
        """vLLM's request models as JSON schema, for the ingress's /openapi.json (built on first use:
        ~0.5 s of CPU)."""
        if self._request_schemas is None:
            # In a thread: this event loop carries every stream of the replica meanwhile.
            self._request_schemas = await asyncio.to_thread(load_request_schemas)
        return self._request_schemas

    async def check_health(self) -> None:
        """Serve's health check: fails when the engine is dead or its core has stopped answering
        (hung), never because it is busy: the probe is a call the core answers between two steps."""
        await self._engine.check_health()
        try:
            await asyncio.wait_for(self._engine.is_sleeping(), ENGINE_PROBE_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"the engine core has not answered for {ENGINE_PROBE_TIMEOUT_S:.0f} s: it is hung"
            ) from None

    async def running_requests(self) -> int:
        """Requests the engine holds (for tests and operators: aborts must bring this to 0)."""
        return len(self._engine.output_processor.request_states)

    def __del__(self) -> None:
        channels = getattr(self, "_reply_channels", None)
        if channels is not None:
            channels.close()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


ENGINE_DEPLOYMENT = "EngineServer"


def engine_deployment(options: dict[str, Any], engine_class: type = EngineServer, name: str = ENGINE_DEPLOYMENT):
    """The engine deployment (one per model); `engine_class` with EngineServer's interface stands in
    for it in tests of the request lifecycle (deployments.engine.fake)."""
    return serve.deployment(engine_class, name=name, **options)
