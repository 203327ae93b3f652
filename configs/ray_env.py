"""Ray Serve's own performance switches, set for every Ray process this project starts.

Ray reads these from the environment of its processes (controller, proxy, replicas), so they are
set before Ray starts: by `make serve`, the RunPod worker, the tests and the benchmark; a cluster
started by `ray start` gets them from the image (Dockerfile ENV) or the shell. Measured with
`make bench` here: the RunPod path (router handle -> engine) went from 0.32 to ~0.8-1.0 x bare
vLLM's tok/s at concurrency 16, and HTTP streaming from 0.22 to ~0.3.
"""

from __future__ import annotations

import os

SERVE_PERFORMANCE_ENV: dict[str, str] = {
    # Ray's throughput mode: user code on the replica's own event loop, gRPC between replicas,
    # GC frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but keep Serve's HTTP proxy on SERVE_PORT (direct ingress moves HTTP to per-replica ports).
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # Request log lines are written when the request ends, not 1,000 at a time.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def apply_serve_performance_env() -> None:
    """Before ray.init / ray start: our defaults, without overriding what the user set."""
    for name, value in SERVE_PERFORMANCE_ENV.items():
        os.environ.setdefault(name, value)
