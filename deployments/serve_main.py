"""`make serve`: start (or join) Ray, run the Serve app on SERVE_HOST:SERVE_PORT, wait for Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import threading

from configs.ray_env import apply_serve_performance_env

# Serve reads its switches when it is imported, here too: the app's handles carry the transport.
apply_serve_performance_env()

import ray  # noqa: E402
from ray import serve  # noqa: E402

from configs.loader import SettingsError, load_settings  # noqa: E402
from configs.placement import logical_cpus_needed  # noqa: E402
from configs.platform import resolve_accelerator  # noqa: E402
from configs.settings import Settings  # noqa: E402
from deployments.app import APP_NAME, ROUTE_PREFIX, build_app_from_settings  # noqa: E402


def start_ray(settings: Settings) -> None:
    if settings.RAY_ADDRESS:
        ray.init(address=settings.RAY_ADDRESS)
        return
    # Logical CPUs are bookkeeping: on a small box give Ray as many as the app's bundles ask.
    accelerator = resolve_accelerator(settings.ACCELERATOR) if settings.ACCELERATOR.value != "auto" else None
    needed = logical_cpus_needed(settings, accelerator) if accelerator else settings.devices_per_engine
    ray.init(num_cpus=max(os.cpu_count() or 1, needed))


def run(settings: Settings) -> None:
    serve.start(http_options={"host": settings.SERVE_HOST, "port": settings.SERVE_PORT})
    serve.run(build_app_from_settings(settings), name=APP_NAME, route_prefix=ROUTE_PREFIX)


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    start_ray(settings)
    run(settings)
    base = f"http://{settings.SERVE_HOST}:{settings.SERVE_PORT}"
    print(f"Serving {settings.served_model_name} at {base}/v1 and {base}/openai/v1 (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
