"""Which accelerator an engine uses: from the settings, else from what the platform has."""

from __future__ import annotations

from collections.abc import Mapping

from configs.settings import Accelerator


def accelerator_from_resources(requested: Accelerator, cluster_resources: Mapping[str, float]) -> Accelerator:
    """`auto` means GPU when the Ray cluster reports GPUs, else CPU. Pure."""
    if requested is not Accelerator.AUTO:
        return requested
    return Accelerator.GPU if cluster_resources.get("GPU", 0) > 0 else Accelerator.CPU


def resolve_accelerator(requested: Accelerator) -> Accelerator:
    """Asks the running Ray cluster (call after ray.init / inside a Serve app builder)."""
    if requested is not Accelerator.AUTO:
        return requested
    import ray

    return accelerator_from_resources(requested, ray.cluster_resources() if ray.is_initialized() else {})
