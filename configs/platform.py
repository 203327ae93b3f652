"""Which accelerator an engine uses: from the settings, else from what the platform has."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


def default_tensor_parallel_size(accelerator: Accelerator, gpus_per_node: Iterable[float]) -> int:
    """An unset TENSOR_PARALLEL_SIZE: worker-vllm shards the model over every GPU its worker sees;
    here that is the most GPUs one node has (an engine's bundles pack on one node by default).
    CPU engines: 1. Pure."""
    if accelerator is Accelerator.AUTO:
        raise ValueError("resolve the accelerator first")
    if accelerator is Accelerator.CPU:
        return 1
    return max(1, int(max(gpus_per_node, default=0)))


def gpus_per_node() -> list[float]:
    """GPUs of each alive node of the running Ray cluster."""
    import ray

    if not ray.is_initialized():
        return []
    return [node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")]
