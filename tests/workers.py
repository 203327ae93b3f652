"""Starting the RunPod worker (`python -m handler`) as its own process, attached to the test cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_in(low: int, high: int, taken: set[int]) -> int:
    """A free loopback port in [low, high] not already handed out (recorded in `taken`)."""
    for port in range(low, high + 1):
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_worker(args: list[str], env: dict[str, str], log_path: Path, command: list[str] | None = None):
    log = open(log_path, "wb")
    cmd = command or [sys.executable, "-m", "handler"]
    # The runpod SDK keeps its in-progress job list in the working directory (.runpod_jobs.pkl):
    # each worker gets its own, as each container does.
    return subprocess.Popen([*cmd, *args], cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log_path.read_text()[-4000:]}")


def stop_worker(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
