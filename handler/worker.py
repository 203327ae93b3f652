"""The RunPod serverless worker: jobs go to the ingress deployment through a Serve handle.

It connects to Ray (RAY_ADDRESS, else a local head), attaches to the running Serve app or deploys
it from the same settings (in a Ray task, so this process never imports vLLM), then hands
`runpod.serverless.start` an async generator handler.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from configs.ray_env import HANDLE_SERIALIZATION, apply_serve_performance_env

# Serve reads its switches when it is imported, in this process too (its handles' transport).
apply_serve_performance_env()

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402

from configs.loader import load_settings  # noqa: E402
from configs.placement import ray_init_kwargs  # noqa: E402
from configs.settings import Settings  # noqa: E402

logger = logging.getLogger("handler")

APP_NAME = "llm"  # deployments.app.APP_NAME (not imported: that module pulls in the deployments)
DEFAULT_LOCAL_API_PORT = "8001"  # runpod's local test API defaults to 8000, where Serve listens
HEALTH_POLL_S = 5.0
HEALTH_STOP_TIMEOUT_S = 10.0  # one serve.status() call at most


@ray.remote(num_cpus=0)
def _deploy_app(args: dict[str, Any] | None = None) -> None:
    """Runs inside the Ray cluster: build and run the Serve app from the same settings."""
    from configs.loader import load_settings as load
    from deployments.app import APP_NAME as NAME
    from deployments.app import ROUTE_PREFIX, build_app_from_settings

    settings = load(args=args or {})
    serve.start(http_options={"host": settings.SERVE_HOST, "port": settings.SERVE_PORT})
    serve.run(build_app_from_settings(settings), name=NAME, route_prefix=ROUTE_PREFIX)


def connect(settings: Settings) -> DeploymentHandle:
    """Ray + the ingress's handle, deploying the app first when it isn't running."""
    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(settings, os.cpu_count() or 1))
    if _app_status() != "RUNNING":
        logger.warning("Deploying the Serve app %r (models: %s)...", APP_NAME,
                       ", ".join(m.served_model_name for m in settings.models))
        started = time.monotonic()
        ray.get(_deploy_app.remote())
        logger.warning("Serve app ready in %.0f s", time.monotonic() - started)
    return serve.get_app_handle(APP_NAME)


def _app_status() -> str | None:
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # Serve not started yet
        return None
    return str(app.status.value if hasattr(app.status, "value") else app.status) if app else None


def job_failure_message(exc: Exception) -> str:
    """What a job's caller reads when the ingress call itself failed (not a request error, which
    the ingress reports as `{"error": ...}` output of its own)."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"The job's ingress call failed ({type(exc).__name__}: {first_line}); "
            "the job did not finish and can be retried.")


def make_handler(ingress: DeploymentHandle):
    native = None

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        """One RunPod job -> the ingress's native path. `{"error": ...}` marks the job FAILED."""
        nonlocal native
        if native is None:
            # Configured once, inside runpod's event loop: with Ray Serve's throughput mode the
            # handle's (Serve's) request router runs on the loop that first uses it.
            native = ingress.options(stream=True, **HANDLE_SERIALIZATION).native
        responses = native.remote(job.get("input"), str(job.get("id", "")))
        # RunPod stops a job by cancelling its task. Often the task is then awaiting the SDK's
        # upload of the last output, not this generator: the generator stays suspended at its
        # `yield`, its `finally` waits for garbage collection, and the engine would go on
        # generating. So the handle call is also cancelled when the job's task ends, however it ends.
        job_task = asyncio.current_task()
        if job_task is not None:
            job_task.add_done_callback(lambda _: responses.cancel())
        try:
            async for output in responses:
                yield output
        except Exception as exc:  # the ingress replica died or was unreachable mid-job
            # runpod's SDK would fail the job with the exception's repr and a traceback; the caller
            # gets one sentence instead, and the worker takes its next job as before.
            logger.warning("job %s: the ingress call failed: %r", job.get("id"), exc)
            yield {"error": job_failure_message(exc)}
        finally:
            # Cancelling the handle call cancels the ingress's job; the engine aborts the request.
            responses.cancel()

    return handler


def one_shot(handler):
    """runpod's one-shot local test (`python -m handler` with test_input.json or --test_input) runs a
    plain handler and would print an unconsumed generator: collect the outputs instead."""

    async def run(job: dict[str, Any]) -> Any:
        outputs = [output async for output in handler(job)]
        errors = [o["error"] for o in outputs if isinstance(o, dict) and "error" in o]
        return {"error": errors[-1]} if errors else outputs

    return run


def is_one_shot_local_test(argv: list[str]) -> bool:
    from runpod.serverless.modules.worker_state import IS_LOCAL_TEST

    return IS_LOCAL_TEST and "--rp_serve_api" not in argv


def watch_health(deadline_s: float, status=_app_status, exit=os._exit, wait=time.sleep) -> None:
    """Exit non-zero (the platform replaces the worker) only if the app stays unhealthy past the
    deadline; Serve replaces a dead engine replica on its own long before that. `wait(s)` returning
    true (a stop event's wait) ends the watch."""
    unhealthy_since: float | None = None
    while not wait(HEALTH_POLL_S):
        healthy = status() == "RUNNING"
        now = time.monotonic()
        if healthy:
            unhealthy_since = None
        elif unhealthy_since is None:
            unhealthy_since = now
        elif now - unhealthy_since > deadline_s:
            logger.error("Serve app unhealthy for %.0f s; exiting so the worker is replaced", now - unhealthy_since)
            exit(1)
            return


def start_health_watch(deadline_s: float, watch: Callable[..., None] = watch_health) -> Callable[[], None]:
    """Run watch_health in a thread; return its stop, which also runs at interpreter exit.

    The stop must run before Ray's own exit hook (ray.shutdown): a serve.status() after it makes
    Ray connect again from a finalizing interpreter, and that process never exited (a one-shot
    local test hung after "Local testing complete"). atexit runs hooks last-in first-out and Ray
    registers its hook when it is imported, so this one, registered later, runs first."""
    stopped = threading.Event()
    thread = threading.Thread(target=watch, args=(deadline_s,), kwargs={"wait": stopped.wait}, daemon=True,
                              name="health-watch")
    thread.start()

    def stop() -> None:
        stopped.set()
        if thread is not threading.current_thread():
            thread.join(timeout=HEALTH_STOP_TIMEOUT_S)

    atexit.register(stop)
    return stop


def with_default_local_port(argv: list[str]) -> list[str]:
    if "--rp_serve_api" in argv and not any(a.startswith("--rp_api_port") for a in argv):
        return [*argv, "--rp_api_port", DEFAULT_LOCAL_API_PORT]
    return argv


def main() -> None:
    import runpod

    logging.basicConfig(level=logging.INFO)
    settings = load_settings(forward_engine_args=False)
    ingress = connect(settings)
    sys.argv = with_default_local_port(sys.argv)
    handler = make_handler(ingress)
    one_shot_test = is_one_shot_local_test(sys.argv)
    if not one_shot_test:  # one job, then exit: nothing to watch
        start_health_watch(settings.UNHEALTHY_EXIT_SECONDS)
    runpod.serverless.start({
        "handler": one_shot(handler) if one_shot_test else handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": lambda _current: settings.MAX_CONCURRENCY,
    })
