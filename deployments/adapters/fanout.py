"""The ingress's side of runtime LoRA: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`
(vLLM's names and bodies) carried out on every engine replica through Serve's broadcast, recorded
in the registry for replicas that start later, and undone where they succeeded when a replica
failed: every replica serves the same adapters."""

from __future__ import annotations

import json
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.adapters.outcome import OK, AdapterOutcome, merged_load, merged_unload
from deployments.ingress.errors import MalformedBody

# Loading an adapter reads it from disk on each replica: seconds; past this the replica counts as failed.
ADAPTER_CALL_TIMEOUT_S = 120.0
ENGINE_METHOD = "adapter"
# The fields each action's body must name (vLLM's request models check the rest on each replica).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {"load": ("lora_name", "lora_path"), "unload": ("lora_name",)}


def adapter_body(body: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object, with `fields` non-empty strings (vLLM's model checks the rest)."""
    try:
        spec = json.loads(body or b"null")
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        raise MalformedBody("The body must be a JSON object.", "body")
    for field in fields:
        if not isinstance(spec.get(field), str) or not spec[field]:
            raise MalformedBody(f"'{field}' must be given, as a non-empty string.", field)
    return spec


def refused(name: str, base_model: str, static: frozenset[str], action: str) -> AdapterOutcome | None:
    """The base model and LORA_MODULES' adapters (every replica loads those at start-up) are not
    loaded or unloaded at runtime: vLLM's answer for the base model, ours for the others."""
    if name == base_model:
        return AdapterOutcome(400, f"The lora adapter '{name}' conflicts with a served base model.",
                              "InvalidUserInput", "lora_name")
    if name in static:
        return AdapterOutcome(400, f"The lora adapter '{name}' is loaded at start-up (LORA_MODULES) and can't be "
                              f"{action}ed at runtime.", "InvalidUserInput", "lora_name")
    return None


async def _everywhere(engine: DeploymentHandle, *args: Any) -> list[AdapterOutcome | BaseException]:
    return await engine.broadcast(ENGINE_METHOD, *args).results_async(
        timeout_s=ADAPTER_CALL_TIMEOUT_S, return_exceptions=True)


async def load_everywhere(engine: DeploymentHandle, registry: DeploymentHandle, spec: dict[str, Any]) -> AdapterOutcome:
    name, path = spec["lora_name"], spec["lora_path"]
    replace = bool(spec.get("load_inplace"))
    claimed, previous = await registry.claim.remote(name, path, replace)
    if not claimed:
        return AdapterOutcome(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                              "adapter in place, set 'load_inplace' to True.", "InvalidUserInput", "lora_name")
    try:
        outcome = merged_load(await _everywhere(engine, "load", spec))
    except BaseException:
        await registry.restore.remote(name, previous)
        raise
    if not outcome.ok:
        await registry.restore.remote(name, previous)
        await _everywhere(engine, "restore", {"lora_name": name, "failed_path": path, "previous_path": previous})
    return outcome


async def unload_everywhere(engine: DeploymentHandle, registry: DeploymentHandle, name: str) -> AdapterOutcome:
    registered = await registry.forget.remote(name) is not None
    outcome = merged_unload(await _everywhere(engine, "unload", {"lora_name": name}))
    if not outcome.ok and registered and outcome.status == 404:
        # Registered, but no running replica had loaded it yet (they started after the load).
        return AdapterOutcome(OK, f"Success: LoRA adapter '{name}' removed successfully.")
    return outcome
