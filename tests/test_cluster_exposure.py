"""A fresh Ray head started the way docs/deployment.md says (scripts/ray-start-head), on a machine
with no ~/.ray/auth_token: token authentication is on with a token made for it, and the dashboard
(Ray's REST API: jobs, `serve deploy`) listens on loopback only. The cluster is this test's own
(its own HOME, temp dir and ports); it is stopped by signalling its `ray start --block`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from configs.ray_env import private_haproxy_ports
from tests.workers import ROOT, free_port_in

RAY = Path(sys.executable).parent / "ray"
HEAD = ROOT / "scripts" / "ray-start-head"


def test_a_fresh_head_has_token_auth_and_a_loopback_dashboard():
    home = Path(tempfile.mkdtemp(prefix="rhome-", dir="/tmp"))  # short: Ray's socket paths live under it
    taken: set[int] = set()
    gcs, dash = free_port_in(6390, 6399, taken), free_port_in(8270, 8279, taken)
    client, agent, agent_grpc, env_agent, metrics = (free_port_in(6390, 6399, taken) for _ in range(5))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "RAY_DASHBOARD_HOST")}
    env.update({"HOME": str(home), "RAY_TMPDIR": str(home), "RAY": str(RAY),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
                **private_haproxy_ports()})
    log = home / "ray_start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(HEAD), "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--dashboard-port={dash}",
             "--num-cpus=1", "--include-dashboard=true", "--disable-usage-stats",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
             f"--metrics-export-port={metrics}"],
            env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                anonymous = httpx.get(f"http://127.0.0.1:{dash}/api/version", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert len(token) >= 32, "no token was made for the fresh head"
        assert anonymous.status_code == 401
        signed = httpx.get(f"http://127.0.0.1:{dash}/api/version", timeout=5,
                           headers={"Authorization": f"Bearer {token}"})
        assert signed.status_code == 200, signed.text
        listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == dash}
        assert listening == {"127.0.0.1"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        _, alive = psutil.wait_procs(processes, timeout=30)
        for p in alive:
            p.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_the_kuberay_manifest_turns_token_auth_on():
    manifest = yaml.safe_load((ROOT / "configs" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
