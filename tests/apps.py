"""Starting and reaching Serve apps in tests: real Ray (local, loopback), real Serve, real vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import ray
from ray import serve

from configs.loader import load_settings
from configs.settings import Settings
from deployments.app import build_app_from_settings

SERVE_PORT = int(os.environ.get("TEST_SERVE_PORT", "8123"))
LOGICAL_CPUS = 8  # bookkeeping only: several apps' bundles stay placed at once; the cores stay 2


@dataclass
class RunningApp:
    name: str
    settings: Settings
    base_url: str  # http://127.0.0.1:PORT/<name>
    startup_s: float

    @property
    def openai_base(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, prefix: str = "/v1", **kwargs: Any):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}{prefix}", api_key=kwargs.pop("api_key", "unused"),
                      max_retries=0, timeout=kwargs.pop("timeout", 120), **kwargs)

    def anthropic(self, prefix: str = "", **kwargs: Any):
        """Anthropic's official client: it appends /v1/messages to its base URL."""
        from anthropic import Anthropic

        return Anthropic(base_url=f"{self.base_url}{prefix}", api_key=kwargs.pop("api_key", "unused"),
                         max_retries=0, timeout=kwargs.pop("timeout", 120), **kwargs)

    def http(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def router(self):
        return serve.get_app_handle(self.name)

    def schemathesis(self, cwd: Any, *select: str, max_examples: int, phases: str, max_time: int,
                     timeout: int = 300) -> subprocess.CompletedProcess:
        """Fuzzes this app against its own OpenAPI schema for server errors (`st run`, one worker,
        a fixed seed). `select`: schemathesis's own options, e.g. --include-path-regex or -H."""
        st = os.path.join(os.path.dirname(sys.executable), "st")
        return subprocess.run(
            [st, "run", f"{self.base_url}/openapi.json", "--url", self.base_url,
             "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--workers", "1",
             "--seed", "7", "--phases", phases, "--max-time", str(max_time), "--no-color",
             "--generation-database", "none", *select],
            capture_output=True, text=True, timeout=timeout, cwd=cwd,
        )


class TestApps:
    __test__ = False

    def __init__(self) -> None:
        from tests.workers import free_port

        self.metrics_port = free_port()
        if not ray.is_initialized():
            ray.init(num_cpus=LOGICAL_CPUS, include_dashboard=False, log_to_driver=True,
                     _metrics_export_port=self.metrics_port)
        serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        self.running: dict[str, RunningApp] = {}

    @staticmethod
    def settings(args: dict[str, Any]) -> Settings:
        # Tests never read the developer's shell: settings come from args only.
        return load_settings(environ={}, args=args)

    def start(self, name: str, args: dict[str, Any], engine_class: type | None = None) -> RunningApp:
        if name in self.running:
            return self.running[name]
        settings = self.settings(args)
        started = time.monotonic()
        serve.run(build_app_from_settings(settings, engine_class), name=name, route_prefix=f"/{name}")
        base_url = f"http://127.0.0.1:{SERVE_PORT}/{name}"
        # serve.run returns once the replicas run; HAProxy and Serve's fallback proxy learn the new
        # route a moment later (answering 503 meanwhile): a client of a started app is served.
        deadline = time.monotonic() + 60
        while httpx.get(f"{base_url}/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, f"{name} not reachable at {base_url} 60 s after serve.run"
            time.sleep(0.2)
        app = RunningApp(name, settings, base_url, time.monotonic() - started)
        print(f"\n[apps] {name} started in {app.startup_s:.1f} s")
        self.running[name] = app
        return app

    def stop(self, name: str) -> None:
        if self.running.pop(name, None) is not None and name in serve.status().applications:
            serve.delete(name)

    def shutdown(self) -> None:
        for name in list(self.running):
            self.stop(name)
        serve.shutdown()
        ray.shutdown()
