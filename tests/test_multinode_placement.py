"""An engine's placement on a two-node Ray cluster (both nodes local, on loopback): with
TENSOR_PARALLEL_SIZE=2 and PLACEMENT_STRATEGY=PACK, the engine deployment's two `{"CPU": 1}` bundles
land on two different nodes when no node has room for both, and Serve itself places a replica that
way; with STRICT_PACK the same group cannot be placed at all.

vLLM's CPU platform has no Ray executor, so an engine cannot span nodes here: this tests placement
(the deployment options the app builder computes, applied by Ray and by Serve), not a cross-node
engine. The cluster (`ray.cluster_utils.Cluster`, FACTS.md) runs in a subprocess, so this test never
touches the pytest process's own Ray (other modules may have initialized it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from configs.ray_env import private_haproxy_ports
from tests.workers import free_port_in, port_open

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import json, os, sys, time

import httpx
import psutil
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.state import list_nodes, list_placement_groups

from configs.loader import load_settings
from configs.placement import engine_deployment_options
from configs.settings import Accelerator

ports = json.loads(sys.argv[1])
result = {}

settings = load_settings(environ={}, args={"TENSOR_PARALLEL_SIZE": 2, "PLACEMENT_STRATEGY": "PACK"},
                         forward_engine_args=False)
options = engine_deployment_options(settings, Accelerator.CPU)
result["options"] = {k: options[k] for k in ("placement_group_bundles", "placement_group_strategy",
                                             "ray_actor_options", "num_replicas")}


class Probe:
    """Stands in for the engine replica: reports where Serve put it and its placement group."""

    def __call__(self, request=None):
        pg = ray.util.get_current_placement_group()
        table = ray.util.placement_group_table(pg) if pg else {}
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pg_id": pg.id.hex() if pg else None,
            "strategy": table.get("strategy"),
            "bundles": {str(k): v for k, v in (table.get("bundles") or {}).items()},
            "bundles_to_node_id": {str(k): v for k, v in (table.get("bundles_to_node_id") or {}).items()},
        }


def pg_state(pg, address):
    """The state API's view (ray.util.state) plus the strategy from the GCS table."""
    (state,) = [s for s in list_placement_groups(address=address, detail=True)
                if s.placement_group_id == pg.id.hex()]
    return {"state": state.state, "strategy": placement_group_table(pg)["strategy"],
            "bundle_nodes": [b.get("node_id") for b in state.bundles]}


def get_when_routed(url, timeout_s=30.0):
    """The first 200 from the app over HTTP. `serve.run` returns once the replica is up; HAProxy
    learns of it a moment later (on a loaded box, seconds later), and until then answers itself:
    404 (route not known yet) or 500 (Serve's errorfile for "no server"). Those are kept."""
    deadline = time.monotonic() + timeout_s
    before = []
    while True:
        http = httpx.get(url, timeout=30)
        if http.status_code == 200 or time.monotonic() > deadline:
            return {"status": http.status_code, "body": http.json() if http.status_code == 200 else http.text,
                    "before": before}
        before.append([http.status_code, http.text[:200]])
        time.sleep(0.2)


def main():
    head_ports = {
        "gcs_server_port": ports["gcs"], "dashboard_port": ports["dashboard"],
        "dashboard_agent_listen_port": ports["agent"], "metrics_export_port": ports["metrics"],
        "runtime_env_agent_port": ports["env_agent"],
    }
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", **head_ports,
    })
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        result["nodes"] = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                            "cpus": n["Resources"].get("CPU")} for n in ray.nodes()]
        result["state_nodes"] = [{"node_id": n.node_id, "ip": n.node_ip} for n in list_nodes(address=cluster.address)]

        # 1. The placement group exactly as Serve creates it for the engine deployment.
        pg = placement_group(options["placement_group_bundles"], strategy=options["placement_group_strategy"])
        ready = pg.wait(60)
        table = placement_group_table(pg)
        result["pack"] = {"ready": ready, **pg_state(pg, cluster.address),
                          "table_bundle_nodes": [table["bundles_to_node_id"][i] for i in sorted(table["bundles"])]}
        remove_placement_group(pg)

        # 2. STRICT_PACK: both bundles on one node, which has one CPU: never placed.
        strict = placement_group(options["placement_group_bundles"], strategy="STRICT_PACK")
        started = time.monotonic()
        strict_ready = strict.wait(10)
        result["strict_pack"] = {"ready": strict_ready, "waited_s": round(time.monotonic() - started, 1),
                                 **pg_state(strict, cluster.address)}
        remove_placement_group(strict)

        # 3. Serve places a replica with the engine deployment's options (only the class differs).
        serve.start(http_options={"host": "127.0.0.1", "port": ports["serve"]},
                    # Both nodes share 127.0.0.1: one proxy per node would bind the same port twice.
                    proxy_location="HeadOnly")
        app = serve.deployment(Probe, name="EngineServer", **options).bind()
        handle = serve.run(app, name="placement", route_prefix="/placement")
        result["serve"] = handle.remote().result(timeout_s=60)
        result["serve_http"] = get_when_routed(f"http://127.0.0.1:{ports['serve']}/placement")
        pgs = [s for s in list_placement_groups(address=cluster.address, detail=True)
               if s.state == "CREATED"]
        result["serve_pgs"] = [{"id": s.placement_group_id,
                                "bundle_nodes": [b["node_id"] for b in s.bundles]} for s in pgs]
        serve.delete("placement")
        serve.shutdown()
    finally:
        # Every process of this cluster (raylets' workers set their own process groups).
        me = psutil.Process()
        result["pids"] = [[p.pid, p.create_time()] for p in me.children(recursive=True)]
        ray.shutdown()
        cluster.shutdown()
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
'''


def _still_alive(pids: list[list[float]]) -> list[int]:
    alive = []
    for pid, created in pids:
        try:
            p = psutil.Process(int(pid))
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(int(pid))
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.timeout(600)
def test_pack_places_tp2_bundles_on_two_nodes(tmp_path: Path):
    taken: set[int] = set()
    ports = {
        "gcs": free_port_in(6390, 6399, taken),
        "agent": free_port_in(6390, 6399, taken),
        "metrics": free_port_in(6390, 6399, taken),
        "env_agent": free_port_in(6390, 6399, taken),
        "dashboard": free_port_in(8270, 8279, taken),
        "serve": free_port_in(8400, 8499, taken),
    }
    # Short path: Ray's unix sockets live under it; Cluster writes ray_current_cluster there too,
    # not in /tmp/ray (where other engineers' `ray.init()` would find this cluster).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rmp-", dir="/tmp"))
    script = tmp_path / "placement_probe.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": str(REPO_ROOT),
        # The probe calls a deployment handle from plain (non-async) code.
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
        # HAProxy's metrics and stats listeners: not the ports the pytest session's cluster holds.
        **private_haproxy_ports(),
    }
    # Neither the pytest process's Ray address nor its auth mode (a `ray.init()` there sets it).
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(ports)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        # SIGINT first: the probe's `finally` shuts its cluster down.
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    took = time.monotonic() - started
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"probe failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-6000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    print(f"\n[multinode] probe ran {took:.1f} s; pack {r['pack']}; strict {r['strict_pack']}")

    # Cleanup: the subprocess shut its cluster down; nothing of it lingers.
    deadline = time.monotonic() + 30
    while (left := _still_alive(r["pids"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours by construction (children of the probe); fail below either way
        psutil.Process(pid).kill()
    assert not left, f"processes of the two-node cluster outlived cluster.shutdown(): {left}"
    assert not port_open(ports["gcs"]) and not port_open(ports["serve"])

    assert r["options"]["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 1}]
    assert r["options"]["placement_group_strategy"] == "PACK"

    # Two live nodes, one CPU each, both on loopback (Ray's own view and the state API's).
    nodes = r["nodes"]
    assert len(nodes) == 2 and all(n["alive"] and n["cpus"] == 1 for n in nodes), nodes
    assert {n["ip"] for n in nodes} == {"127.0.0.1"}
    assert {n["ip"] for n in r["state_nodes"]} == {"127.0.0.1"}
    node_ids = {n["node_id"] for n in nodes}

    # PACK: placed, one bundle per node (the state API and the GCS table agree).
    pack = r["pack"]
    assert pack["ready"] and pack["state"] == "CREATED" and pack["strategy"] == "PACK"
    assert set(pack["bundle_nodes"]) == node_ids
    assert pack["table_bundle_nodes"] == pack["bundle_nodes"]

    # STRICT_PACK: the same two bundles on one 1-CPU node: never placed.
    strict = r["strict_pack"]
    assert not strict["ready"] and strict["waited_s"] >= 9 and strict["state"] == "PENDING"
    assert not any(strict["bundle_nodes"])

    # Serve itself: the replica sits in its own TP=2 PACK group, bundles on both nodes, the replica
    # in the first bundle; the same answer through Serve's HTTP proxy on loopback.
    s = r["serve"]
    assert s["strategy"] == "PACK"
    assert list(s["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert set(s["bundles_to_node_id"].values()) == node_ids
    assert s["node_id"] == s["bundles_to_node_id"]["0"]
    served = r["serve_http"]
    print("answers before the first 200:", served["before"])
    assert (served["status"], served["body"]) == (200, s), served
    # Only HAProxy's own answers may come first (see get_when_routed), never one from the app.
    assert all(status in (404, 500, 503) for status, _ in served["before"]), served["before"]
    assert [pg["id"] for pg in r["serve_pgs"]] == [s["pg_id"]]
    assert set(r["serve_pgs"][0]["bundle_nodes"]) == node_ids
