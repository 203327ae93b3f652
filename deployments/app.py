"""The app builder: settings in, a Serve application (ingress -> engine) out. Used by `make serve`
(`deployments.serve_main`), `serve run|deploy serve_config.yaml` (import path
`deployments.app:build_app`) and the RunPod handler."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from configs.loader import load_settings
from configs.placement import engine_deployment_options, ingress_deployment_options
from configs.platform import default_tensor_parallel_size, gpus_per_node, resolve_accelerator
from configs.settings import Accelerator, Settings
from deployments.adapters.registry import adapter_registry_deployment
from deployments.engine.server import engine_deployment
from deployments.ingress.server import ingress_deployment

APP_NAME = "llm"
ROUTE_PREFIX = "/"


def build_app_from_settings(settings: Settings, engine_class: type | None = None) -> Application:
    """`engine_class` replaces vLLM's engine deployment (deployments.engine.fake, for `make test-fast`)."""
    accelerator = resolve_accelerator(settings.ACCELERATOR)
    if settings.TENSOR_PARALLEL_SIZE is None:
        tp = default_tensor_parallel_size(accelerator, gpus_per_node() if accelerator is Accelerator.GPU else [])
        settings = settings.model_copy(update={"TENSOR_PARALLEL_SIZE": tp})
    options = engine_deployment_options(settings, accelerator)
    deployment = engine_deployment(options) if engine_class is None else engine_deployment(options, engine_class)
    if not settings.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        engine = deployment.bind(settings, accelerator)
        return ingress_deployment(ingress_deployment_options(settings)).bind(engine, settings)
    # Runtime LoRA: the registry of adapters loaded at runtime, read by engine replicas that start later.
    registry = adapter_registry_deployment().bind()
    engine = deployment.bind(settings, accelerator, registry)
    return ingress_deployment(ingress_deployment_options(settings)).bind(engine, settings, registry)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's app-builder entry. With `serve deploy` the user's shell variables never reach the
    cluster: settings come from the config's `args` and `runtime_env.env_vars` (args win)."""
    return build_app_from_settings(load_settings(args=args or {}))
