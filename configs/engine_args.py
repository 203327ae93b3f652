"""Settings -> vLLM's `vllm serve` arguments. Pure: no vLLM import, no environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from configs.settings import Accelerator, Settings


def executor_backend(accelerator: Accelerator) -> str:
    """GPU engines run their workers as Ray actors inside the replica's placement group; vLLM's CPU
    build has no Ray executor, so a CPU engine runs its workers as local processes."""
    return "ray" if accelerator is Accelerator.GPU else "mp"


def vllm_cli_args(settings: Settings, accelerator: Accelerator, model_path: str) -> list[str]:
    """The argument list vLLM's own parser turns into its engine and frontend arguments."""
    if accelerator is Accelerator.AUTO:
        raise ValueError("resolve the accelerator first (configs.platform.resolve_accelerator)")
    args = [
        "--model", model_path,
        "--served-model-name", settings.served_model_name,
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--pipeline-parallel-size", str(settings.PIPELINE_PARALLEL_SIZE),
        "--max-num-seqs", str(settings.MAX_NUM_SEQS),
        "--distributed-executor-backend", executor_backend(accelerator),
    ]
    if accelerator is Accelerator.GPU:
        args += ["--gpu-memory-utilization", str(settings.GPU_MEMORY_UTILIZATION)]
    if settings.MAX_MODEL_LEN is not None:
        args += ["--max-model-len", str(settings.MAX_MODEL_LEN)]
    if settings.QUANTIZATION:
        args += ["--quantization", settings.QUANTIZATION]
    if settings.CUSTOM_CHAT_TEMPLATE:
        args += ["--chat-template", settings.CUSTOM_CHAT_TEMPLATE]
    if settings.ENABLE_AUTO_TOOL_CHOICE:
        args += ["--enable-auto-tool-choice"]
    if settings.TOOL_CALL_PARSER:
        args += ["--tool-call-parser", settings.TOOL_CALL_PARSER]
    args += worker_vllm_model_args(settings)
    if settings.allowed_media_domains:
        args += ["--allowed-media-domains", *settings.allowed_media_domains]
    # Forwarded variables come last so vLLM sees exactly what the user asked for.
    return args + list(settings.engine_cli_overrides)


def hf_overrides(settings: Settings) -> dict[str, Any]:
    """worker-vllm's ROPE_SCALING / ROPE_THETA: vLLM 0.32 has no flags of their own; they override
    the model's Hugging Face config."""
    overrides: dict[str, Any] = {}
    if settings.ROPE_SCALING is not None:
        overrides["rope_scaling"] = settings.ROPE_SCALING
    if settings.ROPE_THETA is not None:
        overrides["rope_theta"] = settings.ROPE_THETA
    return overrides


def speculative_config(settings: Settings) -> dict[str, Any] | None:
    """worker-vllm's SPECULATIVE_MODEL / NUM_SPECULATIVE_TOKENS as vLLM's speculative config."""
    if not settings.SPECULATIVE_MODEL:
        return None
    return {"model": settings.SPECULATIVE_MODEL, "num_speculative_tokens": settings.NUM_SPECULATIVE_TOKENS}


def worker_vllm_model_args(settings: Settings) -> list[str]:
    """worker-vllm's variables whose vLLM flags have other names or shapes."""
    args: list[str] = []
    for flag, value in (
        ("--revision", settings.MODEL_REVISION),
        ("--tokenizer", settings.TOKENIZER_NAME),
        ("--tokenizer-revision", settings.TOKENIZER_REVISION),
    ):
        if value:
            args += [flag, value]
    if settings.OPENAI_RESPONSE_ROLE != "assistant":
        args += ["--response-role", settings.OPENAI_RESPONSE_ROLE]
    if overrides := hf_overrides(settings):
        args += ["--hf-overrides", json.dumps(overrides)]
    if (speculative := speculative_config(settings)) is not None:
        args += ["--speculative-config", json.dumps(speculative)]
    if settings.LORA_MODULES or settings.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        args += ["--enable-lora"]
    if settings.LORA_MODULES:
        args += ["--lora-modules"]
        args += [module.model_dump_json(exclude_none=True) for module in settings.LORA_MODULES]
    return args


def model_cache_environment(base_path: Path | None) -> dict[str, str]:
    """worker-vllm's cache layout under BASE_PATH (a RunPod network volume): models downloaded by
    one worker are found by the next, and RunPod's cached models (`huggingface-cache/hub` on the
    volume) are read where they are."""
    if base_path is None:
        return {}
    cache = base_path / "huggingface-cache"
    return {
        "HF_HOME": str(cache / "hub"),
        "HF_HUB_CACHE": str(cache / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(cache / "hub"),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
    }


# Variables of engine_process_environment an operator may set otherwise (theirs win).
OPERATOR_OVERRIDABLE = frozenset({"VLLM_CPU_OMP_THREADS_BIND", "VLLM_MEDIA_URL_ALLOW_REDIRECTS"})


def engine_process_environment(settings: Settings, accelerator: Accelerator, cores: list[int]) -> dict[str, str]:
    """Environment vLLM reads in an engine replica, from the settings it was given. Pure."""
    env: dict[str, str] = {}
    if settings.uses_demo_model:
        # Offline mode applies to the embedded demo model only: users' models are downloaded.
        env["HF_HUB_OFFLINE"] = "1"
    if settings.HF_TOKEN is not None:
        env["HF_TOKEN"] = settings.HF_TOKEN.get_secret_value()
    env.update(model_cache_environment(settings.BASE_PATH))
    # A public media URL must not redirect the engine's fetch to an address the ingress refuses.
    env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
    if accelerator is Accelerator.CPU and settings.devices_per_engine > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(cores, settings.devices_per_engine)
    return env


def cpu_thread_binding(cores: list[int], world_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world_size` CPU workers: the cores split into equal runs,
    one run per rank ("0|1" on two cores). vLLM refuses TP>1 on one NUMA node without it."""
    if world_size < 1 or len(cores) < world_size:
        raise ValueError(f"{world_size} CPU workers need at least {world_size} cores, have {len(cores)}")
    cores = sorted(cores)
    per_rank = len(cores) // world_size
    runs = [cores[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]
    return "|".join(",".join(str(c) for c in run) for run in runs)
