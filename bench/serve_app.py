"""A Ray Serve system as its users run it, in its own process: a local Ray cluster on loopback,
Serve's HTTP proxy on 127.0.0.1:PORT, the app, then block until SIGTERM.

    python -m bench.serve_app {ours|ours-serve|rayllm|rayllm-tuned} --port P --model PATH --info FILE

`ours` is this project's app (deployments.app.build_app_from_settings), `ours-serve` the same with
STREAM_TRANSPORT=serve; `rayllm` is Ray Serve LLM (ray.serve.llm.build_openai_app on vLLM's CPU
build), `rayllm-tuned` the same app in the mode bench.servers sets its environment for. FILE
receives the Ray address (for the RunPod-handler load, which drives the app's handle from another
process) as soon as Ray is up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from bench.common import MAX_MODEL_LEN, MAX_NUM_SEQS, RAY_LOGICAL_CPUS, RAY_OBJECT_STORE_BYTES, SERVED_MODEL

APP_NAMES = {"ours": "llm", "ours-serve": "llm", "ours-prefix": "llm", "ours-pow2": "llm", "rayllm": "rayllm",
             "rayllm-tuned": "rayllm"}


def build_ours(model: str, stream_transport: str, settings: dict):
    from configs.loader import load_settings
    from deployments.app import build_app_from_settings

    # Settings from args only (never the developer's shell), as the tests do.
    settings = load_settings(environ={}, args={
        "MODEL_NAME": model,
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED_MODEL,
        "MAX_MODEL_LEN": MAX_MODEL_LEN,
        "MAX_NUM_SEQS": MAX_NUM_SEQS,
        "STREAM_TRANSPORT": stream_transport,
        **settings,
    })
    return build_app_from_settings(settings)


def build_rayllm(model: str):
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(
        model_loading_config={"model_id": SERVED_MODEL, "model_source": model},
        accelerator_config={"kind": "cpu"},
        engine_kwargs={"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS},
        deployment_config={"num_replicas": 1},
    )
    return build_openai_app({"llm_configs": [config]})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(APP_NAMES))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--info", required=True)
    parser.add_argument("--settings", default="{}", help="our app's settings (JSON) beyond the benchmark's")
    args = parser.parse_args()

    ours = args.system.startswith("ours")
    if ours:
        # Our app runs as `make serve` runs it (Ray Serve LLM runs with Ray's defaults), switches
        # set before Serve is imported (it reads them then).
        from configs.ray_env import apply_serve_performance_env

        apply_serve_performance_env()

    import ray
    from ray import serve

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # address="local": a new cluster of our own, never one found in /tmp/ray (someone else's).
    ray.init(address="local", num_cpus=RAY_LOGICAL_CPUS, include_dashboard=False,
             object_store_memory=RAY_OBJECT_STORE_BYTES)
    context = ray.get_runtime_context()
    node_ip = ray.util.get_node_ip_address()
    info = {"ray_address": context.gcs_address, "node_ip": node_ip, "app": APP_NAMES[args.system],
            "pid": os.getpid()}
    tmp = Path(args.info + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.rename(args.info)
    print(f"[bench.serve_app] Ray at {context.gcs_address} (node ip {node_ip})", flush=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        if ours:
            app = build_ours(args.model, "serve" if args.system == "ours-serve" else "channel",
                             json.loads(args.settings))
        else:
            app = build_rayllm(args.model)
        started = time.monotonic()
        serve.run(app, name=APP_NAMES[args.system], route_prefix="/")
        print(f"[bench.serve_app] {args.system} running after {time.monotonic() - started:.1f} s", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
