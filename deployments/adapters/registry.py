"""The adapters loaded at runtime, by name and path: one small Serve deployment that an engine
replica started after a load reads (at start-up, and when a request names an adapter it lacks).
In memory, as `vllm serve` keeps its own runtime adapters: the app's next deployment starts without
them."""

from __future__ import annotations

from ray import serve

ADAPTER_REGISTRY = "AdapterRegistry"


class AdapterRegistry:
    """name -> path of every adapter loaded through `POST /v1/load_lora_adapter`. One replica, so
    each call is atomic: two loads of one name can't both claim it."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}

    async def claim(self, name: str, path: str, replace: bool) -> tuple[bool, str | None]:
        """Records `name` at `path` unless it is there and `replace` is false. Returns whether it
        was recorded and the path it had before (for the caller to restore on failure)."""
        previous = self._paths.get(name)
        if previous is not None and not replace:
            return False, previous
        self._paths[name] = path
        return True, previous

    async def restore(self, name: str, path: str | None) -> None:
        """Undoes a claim: `name` back at `path`, or gone."""
        if path is None:
            self._paths.pop(name, None)
        else:
            self._paths[name] = path

    async def forget(self, name: str) -> str | None:
        return self._paths.pop(name, None)

    async def path(self, name: str) -> str | None:
        return self._paths.get(name)

    async def adapters(self) -> dict[str, str]:
        return dict(self._paths)


def adapter_registry_deployment():
    # No CPU of its own: a dict behind a few calls per adapter load, never on a request's path
    # once a replica has the adapter.
    return serve.deployment(AdapterRegistry, name=ADAPTER_REGISTRY, num_replicas=1,
                            ray_actor_options={"num_cpus": 0})
