"""Shared test fixtures: one local Ray cluster on loopback for the whole session, the tiny model,
and Serve apps started once and shared by many tests (each engine start costs 30-90 s here)."""

from __future__ import annotations

import os
from pathlib import Path

# Loopback only: Ray otherwise moves to the eth0 address, and vLLM's message queue too.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configs.ray_env import apply_serve_performance_env, private_haproxy_ports  # noqa: E402

apply_serve_performance_env()  # the tests run Serve as `make serve` runs it
# HAProxy's metrics and stats listeners get ports of this session's own: a `make serve` or another
# session's cluster on this machine may hold the defaults. Clusters the tests start in
# subprocesses (serve deploy, two nodes, the benchmark) pick their own in turn.
os.environ.update(private_haproxy_ports())

# This pytest process calls deployment handles from plain (non-async) test code, which Serve allows
# only with the handle's router on its own loop. Ray reads the switch when ray.serve is imported:
# set it for this process only, then drop it so the cluster's processes keep the defaults above.
os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = "1"
import ray.serve  # noqa: E402, F401

del os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"]

import pytest  # noqa: E402

from tests.apps import TestApps  # noqa: E402
from tests.tiny_model import tiny_llama_path  # noqa: E402

CACHE_ROOT = Path(os.environ.get("TEST_CACHE_DIR", Path.home() / ".cache" / "ray-vllm-serve" / "tests"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_llama_path(CACHE_ROOT)


@pytest.fixture(scope="session")
def vllm_parser():
    """vLLM's own `vllm serve` argument parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def apps():
    """The session's Ray cluster and Serve instance; apps start on first use and stay up."""
    registry = TestApps()
    yield registry
    registry.shutdown()


@pytest.fixture(scope="session")
def tiny_app(apps: TestApps, tiny_model: Path):
    """The tiny model, TP=1: most OpenAI-route and native-job tests share it."""
    return apps.start("tiny", {
        "MODEL_NAME": str(tiny_model),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "tiny",
        "MAX_MODEL_LEN": 512,
        "MAX_CONCURRENCY": 32,
        "MAX_QUEUED_REQUESTS": 32,
        # Far above any of its requests (the tiny model writes 480 tokens in well under a second);
        # test_faults_tiny hangs the engine and waits this out.
        "REQUEST_TIMEOUT": 20,
        # test_faults_tiny leaves streams unread: a small buffer and stall time keep that test short.
        "STREAM_BUFFER_BYTES": 256 * 1024,
        "STREAM_STALL_TIMEOUT": 5,
    })
