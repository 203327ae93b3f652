"""Killing engines for fault tests: the replica actor (ray.kill) or vLLM's engine process."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import psutil
import ray
from ray import serve


def replica_actor_name(app: str, replica_id: str, deployment: str = "EngineServer") -> str:
    return f"SERVE_REPLICA::{app}#{deployment}#{replica_id}"


def kill_replica_actor(app: str, replica_id: str, deployment: str = "EngineServer") -> None:
    ray.kill(replica_actor(app, replica_id, deployment), no_restart=True)


def replica_actor(app: str, replica_id: str, deployment: str = "EngineServer"):
    """The replica's actor handle: looked up before a fault test opens its stream, so the kill
    itself lands at once."""
    return ray.get_actor(replica_actor_name(app, replica_id, deployment), namespace="serve")


def replica_process(app: str, replica_id: str, deployment: str = "EngineServer") -> psutil.Process:
    actor = ray.get_actor(replica_actor_name(app, replica_id, deployment), namespace="serve")
    return psutil.Process(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid())))


def engine_process_pid(app: str, replica_id: str) -> int:
    """The vLLM EngineCore process under a replica. Looked up before a fault test opens its stream:
    the lookup (a Ray call, a process scan) can take longer than a short stream lasts."""
    (core,) = vllm_processes(replica_process(app, replica_id).children(recursive=True), "EngineCore")
    return core.pid


def vllm_processes(processes: list[psutil.Process], role: str) -> list[psutil.Process]:
    """Those vLLM titled VLLM::<role> (EngineCore, Worker) through setproctitle."""
    return [p for p in processes if p.cmdline()[:1] == [f"VLLM::{role}"]]


def kill_engine_process(pid: int) -> None:
    """SIGKILL the engine process (the replica actor itself survives)."""
    os.kill(pid, signal.SIGKILL)


def replica_ids(app: str, deployment: str = "EngineServer") -> set[str]:
    prefix = replica_actor_name(app, "", deployment)
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def running_replicas(app: str) -> int:
    status = serve.status().applications[app].deployments["EngineServer"]
    return status.replica_states.get("RUNNING", 0)


def wait_until(predicate, timeout: float, interval: float = 0.5) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


def sse_lines(response: httpx.Response):
    """The stream's lines, split where SSE splits them (LF, CRLF, CR) and nowhere else.

    httpx's iter_lines() follows str.splitlines(), which also splits on U+0085, U+2028 and U+2029.
    JSON carries those raw inside a string, so a random model's token text could cut an event in two."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        held = b"\r" if buffer.endswith(b"\r") else b""  # may be the first half of a CRLF
        *lines, buffer = re.split(rb"\r\n|\r|\n", buffer[: len(buffer) - len(held)])
        buffer += held
        for line in lines:
            yield line.decode("utf-8")
    if buffer.rstrip(b"\r"):
        yield buffer.rstrip(b"\r").decode("utf-8")


def open_stream(base_url: str, headers: dict, max_tokens: int, prompt: str = "fox"):
    """A streaming completion opened and read up to its first event: (client, response, lines)."""
    client = httpx.Client(timeout=httpx.Timeout(30.0))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    request = client.build_request("POST", f"{base_url}/v1/completions", json=body, headers=headers)
    response = client.send(request, stream=True)
    lines = sse_lines(response)
    for line in lines:
        if line.startswith("data: "):
            break
    return client, response, lines


def drain(lines) -> tuple[int, dict | None, bool]:
    """Reads a stream to its end: (generated tokens, error payload if any, saw [DONE]).

    Tokens come from the final usage chunk (stream_options.include_usage), not from counting
    events: vLLM merges the deltas a slow reader left waiting, so one event may carry several."""
    tokens, error, done = 0, None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        payload = json.loads(data)
        if "error" in payload:
            error = payload["error"]
        elif payload.get("usage"):
            tokens = payload["usage"]["completion_tokens"]
    return tokens, error, done
