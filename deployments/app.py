"""The app builder: settings in, a Serve application (ingress -> engine) out. Used by `make serve`
(`deployments.serve_main`), `serve run|deploy serve_config.yaml` (import path
`deployments.app:build_app`) and the RunPod handler."""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application

from configs.loader import load_settings
from configs.placement import engine_deployment_options, ingress_deployment_options
from configs.platform import default_tensor_parallel_size, gpus_per_node, resolve_accelerator
from configs.settings import Accelerator, Settings
from deployments.adapters.registry import adapter_registry_deployment
from deployments.engine.server import ENGINE_DEPLOYMENT, EngineServer, engine_deployment
from deployments.ingress.server import ingress_deployment

APP_NAME = "llm"
ROUTE_PREFIX = "/"


def build_app_from_settings(settings: Settings, engine_class: type | None = None) -> Application:
    """`engine_class` replaces vLLM's engine deployment (deployments.engine.fake, for `make test-fast`).
    One engine deployment per model (MODELS), the ingress in front of them all."""
    accelerator = resolve_accelerator(settings.ACCELERATOR)
    models = [with_tensor_parallel_size(model, accelerator) for model in settings.models]
    # Runtime LoRA: the registry of adapters loaded at runtime, read by engine replicas that start later.
    registry = adapter_registry_deployment().bind() if settings.VLLM_ALLOW_RUNTIME_LORA_UPDATING else None
    engines = []
    for name, model in zip(engine_deployment_names([m.served_model_name for m in models]), models, strict=True):
        options = engine_deployment_options(model, accelerator)
        deployment = engine_deployment(options, engine_class or EngineServer, name)
        engine_args = (model, accelerator) if registry is None else (model, accelerator, registry)
        engines.append((deployment.bind(*engine_args), model))
    ingress = ingress_deployment(ingress_deployment_options(settings))
    return ingress.bind(engines, settings) if registry is None else ingress.bind(engines, settings, registry)


def with_tensor_parallel_size(settings: Settings, accelerator: Accelerator) -> Settings:
    """TENSOR_PARALLEL_SIZE as set, else every GPU of one node (1 on CPU)."""
    if settings.TENSOR_PARALLEL_SIZE is not None:
        return settings
    tp = default_tensor_parallel_size(accelerator, gpus_per_node() if accelerator is Accelerator.GPU else [])
    return settings.model_copy(update={"TENSOR_PARALLEL_SIZE": tp})


def engine_deployment_names(served_names: list[str]) -> list[str]:
    """`EngineServer` for one model; with several, `EngineServer-<model>` each (what `serve status`
    and the replicas' actor names show), in characters Serve's names allow."""
    if len(served_names) == 1:
        return [ENGINE_DEPLOYMENT]
    names: list[str] = []
    for served in served_names:
        name = f"{ENGINE_DEPLOYMENT}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', served).strip('-')}"
        while name in names:  # two served names that read the same once cleaned
            name += "-"
        names.append(name)
    return names


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's app-builder entry. With `serve deploy` the user's shell variables never reach the
    cluster: settings come from the config's `args` and `runtime_env.env_vars` (args win)."""
    return build_app_from_settings(load_settings(args=args or {}))
