"""`serve deploy serve_config.yaml` onto a running local Ray cluster (`ray start --head --block`), with
the settings in the config's `args`: the tiny model answers through the official `openai` client.

The cluster is this module's own: its own ports, its own Ray temp dir (so `ray.init()` elsewhere on this
machine never finds it through /tmp/ray/ray_current_cluster), loopback only. It is torn down by
signalling its `ray start --block` process, and the test checks that every process of it is gone.
The pytest process never calls `ray.init` here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from configs.ray_env import private_haproxy_ports
from configs.settings import LEGACY_NAMES, Settings
from tests.conftest import CACHE_ROOT
from tests.tiny_model import tiny_llama_path
from tests.workers import free_port_in, port_open

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SERVED_NAME = "deployed-tiny"
DEPLOY_TIMEOUT_S = 360

# Variables exported only in the shell that runs `serve deploy`: none of them may reach the app.
# API_KEY and MAX_QUEUED_REQUESTS are observable (401 without the key; the router's
# max_ongoing_requests = MAX_CONCURRENCY + MAX_QUEUED_REQUESTS + 64); MAX_NUM_SEQS is not
# (vLLM's max_num_seqs is not visible over HTTP, and the engine's max_ongoing_requests is
# max(MAX_NUM_SEQS, MAX_CONCURRENCY=300) + 16 either way), so it is passed but not asserted on.
SHELL_ONLY = {"API_KEY": "sk-from-the-deploy-shell", "MAX_QUEUED_REQUESTS": "1", "MAX_NUM_SEQS": "7"}


def _base_env(ray_tmpdir: str) -> dict[str, str]:
    """Loopback-only environment for every process this test starts; no product setting of the
    developer's shell leaks in (the cluster's settings come from the config file only)."""
    # RAY_AUTH_MODE: a `ray.init()` earlier in this pytest process sets it; this cluster gets Ray's default.
    ours = set(Settings.model_fields) | set(LEGACY_NAMES) | {"RAY_ADDRESS", "RAY_AUTH_MODE"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        # This cluster's ray_current_cluster file lives here, not in /tmp/ray (other clusters run).
        "RAY_TMPDIR": ray_tmpdir,
        # On SIGTERM, `ray start` first drains the node (up to 30 s by default: with Serve replicas
        # on the only node, all 30). Nothing can move off a one-node cluster; keep teardown short.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
        # HAProxy's metrics and stats listeners: not the ports the pytest session's cluster holds.
        **private_haproxy_ports(),
    })
    return env


# Runs in a subprocess (the pytest process must not touch Ray's auth mode or connect anywhere):
# polls Serve's REST API until the app is RUNNING (or failed) and prints the details as JSON.
POLL_SCRIPT = r"""
import json, sys, time
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

address, app, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
details, last_error = None, None
while time.monotonic() < deadline:
    try:
        details = ServeSubmissionClient(address).get_serve_details()
        last_error = None
    except Exception as exc:  # the dashboard's Serve module may still be starting
        last_error = repr(exc)
    status = ((details or {}).get("applications", {}).get(app) or {}).get("status")
    if status in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY") or timeout == 0:
        break
    time.sleep(5)
print("DETAILS " + json.dumps({"details": details, "error": last_error}, default=str))
"""


@dataclass
class LocalCluster:
    tmpdir: Path
    env: dict[str, str]
    gcs_port: int
    dashboard_port: int
    serve_port: int
    proc: subprocess.Popen
    log: Path

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def cli_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # Ray 2.60's `ray start --head` turns token authentication on (token in ~/.ray/auth_token),
        # but the `serve` CLI only sends the token when RAY_AUTH_MODE=token is set in its shell.
        return {**self.env, "RAY_AUTH_MODE": "token", **(extra or {})}

    def serve_details(self, app: str, timeout: float) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", POLL_SCRIPT, self.dashboard, app, str(timeout)],
            env=self.cli_env(), cwd=self.tmpdir, capture_output=True, text=True, timeout=timeout + 120,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("DETAILS ")]
        assert lines, f"poller failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        result = json.loads(lines[-1][len("DETAILS "):])
        assert result["details"] is not None, f"Serve REST API unreachable: {result['error']}"
        return result["details"]

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        session = self.tmpdir / "ray" / "session_latest" / "logs"
        errors = []
        for name in ("serve/controller_*.log", "serve/replica_llm_*.log"):
            for path in sorted(session.glob(name))[-2:]:
                errors.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-chars:])
        return text[-chars:] + "\n" + "\n".join(errors)


def _cluster_processes(root: psutil.Process) -> list[psutil.Process]:
    """Every process of the cluster: `ray start`'s descendants (Ray's workers set their own process
    group, so the process group alone misses the replicas and vLLM's engine processes)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _names(p: psutil.Process) -> list[str]:
    try:
        return [p.name()]
    except psutil.Error:
        return []


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120] or p.name()}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


def _teardown(cluster: LocalCluster, known: list[psutil.Process]) -> tuple[list[str], float]:
    """SIGTERM the `ray start --block` process (it drains the node and stops what it started), wait;
    SIGKILL whatever of this cluster is left. Returns (processes that outlived the graceful stop, s).

    Only `ray start` itself is signalled: signalling its whole process group kills the GCS first,
    and `ray start` then spends 30 s trying to drain the node through the dead GCS."""
    started = time.monotonic()
    try:
        now = _cluster_processes(psutil.Process(cluster.proc.pid))
    except psutil.NoSuchProcess:
        now = []
    procs = {p.pid: p for p in [*known, *now]}
    if cluster.proc.poll() is None:
        cluster.proc.send_signal(signal.SIGTERM)
    try:
        cluster.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while _alive(list(procs.values())) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = _alive(list(procs.values()))
    described = _describe(leftovers)
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if cluster.proc.poll() is None:  # only if `ray start` itself ignored SIGTERM
        os.killpg(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait(timeout=30)
    psutil.wait_procs(leftovers, timeout=10)
    return described, time.monotonic() - started


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Short path: Ray's unix sockets live under it (108-byte limit).
    tmpdir = Path(tempfile.mkdtemp(prefix="rsd-", dir="/tmp"))
    taken: set[int] = set()
    gcs = free_port_in(6390, 6399, taken)
    dash = free_port_in(8270, 8279, taken)
    serve_port = free_port_in(8400, 8499, taken)
    # Every other port Ray would otherwise take at a fixed default (10001, 52365, ...).
    client, agent, agent_grpc, env_agent, metrics = (free_port_in(6390, 6399, taken) for _ in range(5))
    env = _base_env(str(tmpdir))
    log = tmpdir / "ray_start.log"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
    ]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmpdir, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    c = LocalCluster(tmpdir, env, gcs, dash, serve_port, proc, log)
    known: list[psutil.Process] = []
    names: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{c.log_tail()}"
            try:
                # Any HTTP answer (401 without the cluster's token) means the dashboard is up.
                httpx.get(f"{c.dashboard}/api/version", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"dashboard never came up:\n{c.log_tail()}"
                time.sleep(1)
        print(f"\n[serve-deploy] ray start --head up in {time.monotonic() - started:.1f} s (gcs {gcs}, "
              f"dashboard {dash}, serve {serve_port}, tmp {tmpdir})")
        yield c
        # Snapshot the cluster's processes while it runs (replicas, vLLM engine processes).
        if proc.poll() is None:
            known = _cluster_processes(psutil.Process(proc.pid))
            names = sorted({name for p in known for name in _names(p)})
    finally:
        leftovers, took = _teardown(c, known)
        print(f"[serve-deploy] teardown took {took:.1f} s; {len(known)} cluster processes gone: {names}")
        gcs_open = port_open(gcs)
        shutil.rmtree(tmpdir, ignore_errors=True)
        assert not leftovers, f"processes of the cluster outlived `ray start`'s SIGTERM: {leftovers}"
        assert not gcs_open, f"GCS port {gcs} still open after teardown"


def _write_config(c: LocalCluster, model: Path) -> Path:
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": c.serve_port}
    (app,) = config["applications"]
    app["args"] = {
        **(app.get("args") or {}),
        "MODEL_NAME": str(model),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED_NAME,
        "MAX_MODEL_LEN": 384,
    }
    runtime_env = app.setdefault("runtime_env", {})
    # The env var says 256, args say 384: args win.
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "MAX_MODEL_LEN": "256",
                               "VLLM_CPU_KVCACHE_SPACE": "1"}
    path = c.tmpdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.timeout(900)
def test_serve_deploy_with_args_on_a_running_cluster(cluster: LocalCluster):
    c = cluster
    model = tiny_llama_path(CACHE_ROOT)
    config_path = _write_config(c, model)
    config = yaml.safe_load(config_path.read_text())
    assert config["applications"][0]["import_path"] == "deployments.app:build_app"
    assert config["applications"][0]["args"]["MAX_CONCURRENCY"] == 300  # the rest of the file as it is

    started = time.monotonic()
    deploy = subprocess.run(
        [str(VENV_BIN / "serve"), "deploy", str(config_path), "-a", c.dashboard],
        env=c.cli_env(SHELL_ONLY), cwd=c.tmpdir, capture_output=True, text=True, timeout=180,
    )
    assert deploy.returncode == 0, f"serve deploy failed:\n{deploy.stdout}\n{deploy.stderr}"

    details = c.serve_details("llm", DEPLOY_TIMEOUT_S)
    app = details["applications"]["llm"]
    took = time.monotonic() - started
    print(f"[serve-deploy] app {app['status']} {took:.1f} s after `serve deploy`")
    assert app["status"] == "RUNNING", (
        f"app {app['status']}: {app.get('message')}\n"
        + json.dumps({k: (d["status"], d.get("message")) for k, d in app["deployments"].items()}) + "\n"
        + c.log_tail()
    )
    assert set(app["deployments"]) == {"Ingress", "EngineServer"}
    assert {p["node_ip"] for p in details["proxies"].values()} == {"127.0.0.1"}

    from openai import OpenAI

    base = f"http://127.0.0.1:{c.serve_port}"
    # api_key is sent as `Authorization: Bearer unused`: had the deploy shell's API_KEY reached the
    # app, every call below would be 401.
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]
    assert models[0].model_extra["max_model_len"] == 384  # args (384) win over runtime_env (256)

    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "the capital of france"}],
        max_tokens=8, temperature=0,
    )
    # Random weights: the text may decode to nothing, but 8 tokens were generated.
    assert chat.choices[0].message.content is not None
    assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"

    alt = OpenAI(base_url=f"{base}/openai/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in alt.models.list().data] == [SERVED_NAME]
    chat = alt.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "quick brown fox"}], max_tokens=4,
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0

    # The deploy shell's MAX_QUEUED_REQUESTS=1 did not reach the app builder either: the router's
    # Serve limit is 300 + 300 (default MAX_QUEUED_REQUESTS) + 64, not 300 + 1 + 64.
    router = app["deployments"]["Ingress"]["deployment_config"]
    assert router["max_ongoing_requests"] == 300 + 300 + 64


def _read_lines(stream, sink: list[str], log: Path) -> None:
    with open(log, "w") as out:
        for line in stream:
            sink.append(line)
            out.write(line)
            out.flush()


@pytest.mark.timeout(900)
def test_make_serve_starts_a_head_of_its_own_and_serves_when_it_says_so(cluster: LocalCluster):
    """`make serve`'s process (`python -m deployments.serve_main`) on a machine where `ray start` left
    a cluster: this module's, found by Ray through the same RAY_TMPDIR. Without RAY_ADDRESS it starts
    a head of its own (a bare `ray.init()` would join that cluster and refuse `num_cpus`). The first
    requests after its "Serving" line succeed; Ctrl-C (SIGINT to its process group, as a terminal
    sends it) stops it and every process it started, even when it was started with SIGINT ignored."""
    c = cluster
    assert (c.tmpdir / "ray" / "ray_current_cluster").exists()  # what a bare ray.init() would join
    port = free_port_in(8400, 8499, {c.serve_port})
    env = {
        **c.env, **private_haproxy_ports(),
        "MODEL_NAME": str(tiny_llama_path(CACHE_ROOT)), "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "made-tiny",
        "MAX_MODEL_LEN": "256", "SERVE_PORT": str(port), "PYTHONUNBUFFERED": "1",
    }
    log = c.tmpdir / "make_serve.log"
    lines: list[str] = []
    # Started with SIGINT ignored, as a shell without job control starts a background `make serve &`:
    # Ctrl-C must stop it all the same.
    command = f'trap "" INT; exec {shlex.quote(sys.executable)} -m deployments.serve_main'
    proc = subprocess.Popen(["sh", "-c", command], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines, log), daemon=True)
    reader.start()
    started = time.monotonic()
    procs: list[psutil.Process] = []
    try:
        while not any(line.startswith("Serving made-tiny at ") for line in lines):
            assert proc.poll() is None, f"serve_main exited {proc.returncode}:\n{''.join(lines)[-6000:]}"
            assert time.monotonic() - started < DEPLOY_TIMEOUT_S, "no Serving line:\n" + "".join(lines)[-6000:]
            time.sleep(0.05)
        print(f"\n[make-serve] Serving after {time.monotonic() - started:.1f} s")
        procs = _cluster_processes(psutil.Process(proc.pid))

        from openai import OpenAI

        # Right after the line, no retries: HAProxy already routes to the router.
        for prefix in ("/v1", "/openai/v1"):
            client = OpenAI(base_url=f"http://127.0.0.1:{port}{prefix}", api_key="unused", max_retries=0,
                            timeout=120)
            assert [m.id for m in client.models.list().data] == ["made-tiny"]
            chat = client.chat.completions.create(
                model="made-tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
            assert chat.usage.completion_tokens == 4
        # Its own head: the `ray start` cluster's app is untouched (serve.run there would have replaced it).
        deployed = httpx.get(f"http://127.0.0.1:{c.serve_port}/v1/models", timeout=30).json()
        assert [m["id"] for m in deployed["data"]] == [SERVED_NAME]
        head = next(p for p in procs if "gcs_server" in _names(p))
        assert f"--gcs_server_port={c.gcs_port}" not in " ".join(head.cmdline())

        stopping = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 0, "".join(lines)[-4000:]
        deadline = time.monotonic() + 30
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        took = time.monotonic() - stopping
        print(f"[make-serve] Ctrl-C stopped it and its {len(procs)} processes in {took:.1f} s")
        assert not _describe(_alive(procs)), f"outlived Ctrl-C: {_describe(_alive(procs))}"
        assert not port_open(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for p in _alive(procs):
            p.kill()
        reader.join(timeout=10)
