"""Which engine deployment answers a request: one per model (MODELS), picked by the `model` its
body names; the first model answers requests that name none, as `vllm serve` answers them with
its one model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from configs.ray_env import HANDLE_SERIALIZATION
from configs.settings import Settings
from deployments.ingress.errors import NotFound
from deployments.ingress.limits import RequestLimits


def request_limits(settings: Settings) -> RequestLimits:
    return RequestLimits(settings.MAX_REQUEST_BYTES, settings.MAX_N, settings.MAX_MESSAGES, settings.MAX_MODEL_LEN,
                         settings.MAX_SEQUENCES_PER_REQUEST)


@dataclass(frozen=True)
class ModelEngine:
    """One model's engine deployment, as the ingress calls it."""

    name: str  # the served model name
    settings: Settings
    handle: DeploymentHandle
    http: Any  # the streamed `http` method, its options set once
    limits: RequestLimits  # its own MAX_MODEL_LEN
    # Names every replica serves from its start: the model and its LORA_MODULES adapters.
    own_names: frozenset[str]

    @classmethod
    def of(cls, handle: DeploymentHandle, settings: Settings) -> ModelEngine:
        return cls(settings.served_model_name, settings, handle,
                   handle.options(stream=True, **HANDLE_SERIALIZATION).http, request_limits(settings),
                   frozenset({settings.served_model_name, *settings.static_adapter_names}))


class ModelEngines:
    """The app's models, in MODELS' order."""

    def __init__(self, engines: list[tuple[DeploymentHandle, Settings]]) -> None:
        self._engines = [ModelEngine.of(handle, settings) for handle, settings in engines]
        self._by_name = {name: engine for engine in reversed(self._engines) for name in engine.own_names}

    @property
    def default(self) -> ModelEngine:
        return self._engines[0]

    @property
    def several(self) -> bool:
        return len(self._engines) > 1

    def __iter__(self) -> Iterator[ModelEngine]:
        return iter(self._engines)

    def for_model(self, model: Any) -> ModelEngine:
        """The engine serving `model`. With one model every name goes to it (vLLM answers its own
        404 for a name it doesn't serve, and a runtime LoRA adapter is only known there); with
        several, a name none serves is our 404, vLLM's words."""
        if not isinstance(model, str) or not model:
            return self.default
        engine = self._by_name.get(model)
        if engine is not None:
            return engine
        if not self.several:
            return self.default
        raise NotFound(f"The model `{model}` does not exist.", "model")

    def for_payload(self, payload: Any) -> ModelEngine:
        return self.for_model(payload.get("model") if isinstance(payload, dict) else None)
