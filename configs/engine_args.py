"""Settings -> vLLM's `vllm serve` arguments. Pure: no vLLM import, no environment."""

from __future__ import annotations

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
        "--tensor-parallel-size", str(settings.TENSOR_PARALLEL_SIZE),
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
    # Forwarded variables come last so vLLM sees exactly what the user asked for.
    return args + list(settings.engine_cli_overrides)


def cpu_thread_binding(cores: list[int], world_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world_size` CPU workers: the cores split into equal runs,
    one run per rank ("0|1" on two cores). vLLM refuses TP>1 on one NUMA node without it."""
    if world_size < 1 or len(cores) < world_size:
        raise ValueError(f"{world_size} CPU workers need at least {world_size} cores, have {len(cores)}")
    cores = sorted(cores)
    per_rank = len(cores) // world_size
    runs = [cores[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]
    return "|".join(",".join(str(c) for c in run) for run in runs)
