"""`make serve`: start (or join) Ray, run the Serve app on SERVE_HOST:SERVE_PORT, wait for Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from configs.ray_env import apply_serve_performance_env

# Serve reads its switches when it is imported, here too: the app's handles carry the transport.
apply_serve_performance_env()

import ray  # noqa: E402
from ray import serve  # noqa: E402

from configs.loader import SettingsError, load_settings  # noqa: E402
from configs.placement import ray_init_kwargs  # noqa: E402
from configs.settings import Settings  # noqa: E402
from deployments.app import APP_NAME, ROUTE_PREFIX, build_app_from_settings  # noqa: E402

READY_TIMEOUT_S = 120.0
READY_POLL_S = 0.25


def health_url(host: str, port: int) -> str:
    """Where this machine reaches the ingress: a wildcard bind (the image's 0.0.0.0) on loopback."""
    reachable = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in reachable:
        reachable = f"[{reachable}]"
    return f"http://{reachable}:{port}/health"


def wait_until_healthy(url: str, timeout_s: float, stop: threading.Event, poll_s: float = READY_POLL_S) -> str | None:
    """Poll `/health` until it answers 200; None then, else the last answer when time runs out or
    `stop` is set. `serve.run` returns once the replicas are up, but HAProxy starts routing to the
    ingress a moment later and answers 503s of its own until then: "Serving" is printed after."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not the shell's HTTP proxy
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with direct.open(url, timeout=5) as response:
                if response.status == 200:
                    return None
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:  # URLError, refused, timed out
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if time.monotonic() >= deadline or stop.wait(poll_s):
            return last


def run(settings: Settings) -> None:
    serve.start(http_options={"host": settings.SERVE_HOST, "port": settings.SERVE_PORT})
    serve.run(build_app_from_settings(settings), name=APP_NAME, route_prefix=ROUTE_PREFIX)


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A shell without job control (a script, CI) starts background commands with SIGINT ignored,
    # and Python then installs no KeyboardInterrupt: `make serve &` could not be stopped with Ctrl-C
    # or `kill -INT`. Take SIGINT back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ray.init(**ray_init_kwargs(settings, os.cpu_count() or 1))
        run(settings)
        url = health_url(settings.SERVE_HOST, settings.SERVE_PORT)
        unhealthy = wait_until_healthy(url, READY_TIMEOUT_S, stop)
        base = f"http://{settings.SERVE_HOST}:{settings.SERVE_PORT}"
        if unhealthy is not None and not stop.is_set():
            print(f"The app is deployed but {url} answered {unhealthy} for {READY_TIMEOUT_S:.0f} s; "
                  "still running (see `serve status` and the replica logs)", file=sys.stderr, flush=True)
        elif unhealthy is None:
            models = ", ".join(model.served_model_name for model in settings.models)
            print(f"Serving {models} at {base}/v1 and {base}/openai/v1 (Ctrl-C stops)", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
