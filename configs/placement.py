"""Settings -> Ray Serve deployment options: placement bundles, replicas, request limits. Pure."""

from __future__ import annotations

import math
from typing import Any

from configs.settings import Accelerator, Settings

# What a bundle asks of Ray's `accelerator_type:<X>` resource (each GPU node has 1 of it), as Ray
# Serve LLM asks: a token, so that every device's bundle lands on a node of that GPU type.
ACCELERATOR_TYPE_SHARE = 0.001


def placement_bundles(tensor_parallel: int, pipeline_parallel: int, accelerator: Accelerator,
                      accelerator_type: str | None = None) -> list[dict[str, float]]:
    """One bundle per device of one engine. The engine replica itself (one CPU) lives in the first."""
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ValueError("parallel sizes must be >= 1")
    devices = tensor_parallel * pipeline_parallel
    if accelerator is Accelerator.GPU:
        gpu: dict[str, float] = {"GPU": 1}
        if accelerator_type:
            gpu[f"accelerator_type:{accelerator_type}"] = ACCELERATOR_TYPE_SHARE
        return [{"CPU": 1, **gpu}] + [dict(gpu) for _ in range(devices - 1)]
    if accelerator is Accelerator.CPU:
        return [{"CPU": 1} for _ in range(devices)]
    raise ValueError("resolve the accelerator first")


def engine_max_ongoing_requests(settings: Settings) -> int:
    # Enough to keep the engine's batch full, and never below what the ingress admits: the ingress's
    # limit (MAX_CONCURRENCY) is what rejects, not Serve's queue in front of the engine.
    return max(settings.MAX_NUM_SEQS, settings.MAX_CONCURRENCY) + 16


def router_max_ongoing_requests(settings: Settings) -> int:
    # The ingress admits MAX_CONCURRENCY and queues MAX_QUEUED_REQUESTS itself (answering 429 past
    # that); Serve's own limit sits above so that our envelope, not Serve's bare 503, is what callers see.
    return settings.MAX_CONCURRENCY + settings.MAX_QUEUED_REQUESTS + 64


# Imported by Serve in the ingress replica (its handle to the engine routes); a path, so that this
# module stays free of Serve's imports.
PREFIX_ROUTER_CLASS = "deployments.routing.prefix_router:PrefixAffinityRouter"


def engine_deployment_options(settings: Settings, accelerator: Accelerator) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
        "placement_group_bundles": placement_bundles(
            settings.tensor_parallel_size, settings.PIPELINE_PARALLEL_SIZE, accelerator, settings.ACCELERATOR_TYPE
        ),
        "placement_group_strategy": settings.PLACEMENT_STRATEGY.value,
        "max_ongoing_requests": engine_max_ongoing_requests(settings),
        # Loading a model takes minutes; the health check only asks whether the engine has died.
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 60,
        "graceful_shutdown_wait_loop_s": 1,
    }
    if settings.routes_by_prefix:
        # Serve's request router API: the ingress's handle to the engine routes with this class.
        options["request_router_config"] = {
            "request_router_class": PREFIX_ROUTER_CLASS,
            "request_router_kwargs": {"imbalance_threshold": settings.ROUTING_IMBALANCE},
        }
    if settings.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": settings.MIN_REPLICAS,
            "max_replicas": settings.MAX_REPLICAS,
            "target_ongoing_requests": settings.TARGET_ONGOING_REQUESTS or max(1, settings.MAX_NUM_SEQS // 2),
        }
    else:
        options["num_replicas"] = settings.NUM_REPLICAS
    return options


def ingress_deployment_options(settings: Settings) -> dict[str, Any]:
    return {
        "num_replicas": settings.ROUTER_REPLICAS,
        # The ingress is I/O-bound; it must not take a CPU an engine bundle needs.
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": router_max_ongoing_requests(settings),
        # The ingress writes one line per request itself (id, route, status, tokens, latency, TTFT);
        # Serve's access line would repeat it, at the cost of a second formatted, flushed record.
        "logging_config": {"enable_access_log": False},
        "graceful_shutdown_timeout_s": 60,
        "graceful_shutdown_wait_loop_s": 1,
    }


def per_router_limit(total: int, router_replicas: int, least: int = 1) -> int:
    """MAX_CONCURRENCY and MAX_QUEUED_REQUESTS are the app's; each ingress replica enforces its share
    (rounded up: the shares cover the total), at least `least`."""
    return max(least, math.ceil(total / max(1, router_replicas)))


def logical_cpus_needed(settings: Settings, accelerator: Accelerator) -> int:
    """Logical CPUs the app asks of Ray (bundles are bookkeeping, the cores stay what they are)."""
    per_engine = sum(b.get("CPU", 0) for b in placement_bundles(
        settings.tensor_parallel_size, settings.PIPELINE_PARALLEL_SIZE, accelerator))
    replicas = settings.MAX_REPLICAS if settings.autoscaling else settings.NUM_REPLICAS
    return int(per_engine * (replicas or 1))


def ray_init_kwargs(settings: Settings, cpu_count: int) -> dict[str, Any]:
    """`ray.init`'s arguments for `make serve` and the RunPod worker: join RAY_ADDRESS when it is
    set, else start a head of their own. `address="local"` because a bare `ray.init()` joins a
    cluster that `ray start` left on this machine (and then refuses `num_cpus`). Logical CPUs are
    bookkeeping: on a small box Ray gets as many as the app's bundles ask; before Ray runs, an
    `auto` accelerator counts as CPU, the larger ask (one bundle CPU per device, not per engine)."""
    if settings.RAY_ADDRESS:
        return {"address": settings.RAY_ADDRESS}
    accelerator = Accelerator.CPU if settings.ACCELERATOR is Accelerator.AUTO else settings.ACCELERATOR
    return {"address": "local", "num_cpus": max(cpu_count, logical_cpus_needed(settings, accelerator))}
