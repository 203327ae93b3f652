"""Runtime LoRA adapters on one engine replica: vLLM's own load and unload (its
OpenAIServingModels, which `vllm serve`'s routes call), and Serve's model multiplexing, which tells
the ingress's request router which replica has which adapter."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.adapters.outcome import OK, AdapterOutcome

logger = logging.getLogger("ray.serve")

# Where Serve's multiplex decorator keeps its model cache on the function it wraps.
SERVE_MULTIPLEX_WRAPPER = "__serve_multiplex_wrapper"


class UnknownAdapter(LookupError):
    """A request names a model that is neither served nor a registered adapter."""


def vllm_outcome(answer: Any) -> AdapterOutcome:
    """vLLM's answer (its success text or its ErrorResponse) as an AdapterOutcome."""
    error = getattr(answer, "error", None)
    if error is None:
        return AdapterOutcome(OK, str(answer))
    return AdapterOutcome(error.code, error.message, error.type, error.param)


class EngineAdapters:
    """The adapters of one replica. Serve's multiplexing keeps no limit of its own: vLLM keeps
    MAX_LORAS adapters on the device and MAX_CPU_LORAS in memory and rereads others from their
    path, so a loaded adapter costs this replica only its name."""

    def __init__(self, serving_models: Any, registry: DeploymentHandle) -> None:
        self._models = serving_models
        self._registry = registry

        async def load_for_a_request(name: str) -> str:
            return await self._load_from_registry(name)

        # A closure, not a method: Serve keeps the multiplexed model cache on the wrapped function.
        self._loader = load_for_a_request
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=-1)(load_for_a_request)

    def loaded(self, name: str) -> bool:
        return name in self._models.lora_requests

    async def load(self, spec: dict[str, Any]) -> AdapterOutcome:
        """`POST /v1/load_lora_adapter`'s body on this replica, checked by vLLM's own request model."""
        from pydantic import ValidationError
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        try:
            request = LoadLoRAAdapterRequest(**spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            return AdapterOutcome(400, f"{first['msg']}: {'.'.join(map(str, first['loc']))}", "BadRequestError",
                                  ".".join(map(str, first["loc"])) or None)
        outcome = vllm_outcome(await self._models.load_lora_adapter(request))
        if outcome.ok:
            # Serve's router now counts this replica among those that have it.
            await self._multiplexed(request.lora_name)
        return outcome

    async def unload(self, name: str) -> AdapterOutcome:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        outcome = vllm_outcome(await self._models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name)))
        self._forget_multiplexed(name)
        return outcome

    async def restore(self, name: str, failed_path: str, previous_path: str | None) -> None:
        """Undoes a load that failed on another replica, where this one loaded `failed_path`."""
        request = self._models.lora_requests.get(name)
        if request is None or request.lora_path != failed_path:
            return
        if previous_path is None:
            await self.unload(name)
        else:
            await self.load({"lora_name": name, "lora_path": previous_path, "load_inplace": True})

    async def ensure(self, name: str) -> None:
        """Before a request naming `name` (its multiplexed model id, set by the ingress for any model
        that is not the base model or a LORA_MODULES adapter): a registered adapter this replica
        lacks (it started after the load) is loaded from its path. A name nobody registered is left
        for vLLM to answer (its 404 envelope)."""
        if not self.loaded(name) and await self._registry.path.remote(name) is None:
            return
        try:
            await self._multiplexed(name)
        except UnknownAdapter:
            return
        except Exception as exc:
            # vLLM answers the request's 404 for the adapter it doesn't have; the cause goes to the log.
            logger.warning("LoRA adapter %s could not be loaded on this replica: %s", name, exc)

    async def load_registered(self) -> None:
        """At start-up: the adapters loaded at runtime before this replica started."""
        for name, path in (await self._registry.adapters.remote()).items():
            outcome = await self.load({"lora_name": name, "lora_path": path})
            if not outcome.ok:
                logger.warning("LoRA adapter %s (%s) did not load: %s", name, path, outcome.message)

    async def _load_from_registry(self, name: str) -> str:
        if not self.loaded(name):
            path = await self._registry.path.remote(name)
            if path is None:
                raise UnknownAdapter(name)
            from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

            outcome = vllm_outcome(await self._models.load_lora_adapter(
                LoadLoRAAdapterRequest(lora_name=name, lora_path=path)))
            if not outcome.ok and not self.loaded(name):
                raise RuntimeError(outcome.message)
            logger.info("LoRA adapter %s loaded from %s for a request naming it", name, path)
        return name

    def _forget_multiplexed(self, name: str) -> None:
        """Takes an unloaded adapter out of Serve's multiplexed model cache (Serve has no public
        call for it), so its router stops counting this replica as one that has it."""
        wrapper = getattr(self._loader, SERVE_MULTIPLEX_WRAPPER, None)
        if wrapper is not None and wrapper.models.pop(name, None) is not None:
            wrapper._push_multiplexed_replica_info = True
