"""MODELS: several models in one app, one engine deployment each. An entry is either our settings
for that model (`{"MODEL_NAME": ..., "MAX_MODEL_LEN": ...}`) or Ray Serve LLM's `LLMConfig` shape
(`model_loading_config`, `engine_kwargs`, `deployment_config`, `accelerator_type`, ...), so that a
Ray Serve LLM config moves here by changing its `import_path`. Pure: entries in, settings names out
(configs.loader loads each model's settings from them, over the app's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from configs.settings import ENGINE, SCALING, SERVING, Settings

# What a model may set for itself; the rest is the app's (the ingress's limits, the RunPod worker...).
PER_MODEL_GROUPS = frozenset({ENGINE, SERVING, SCALING})
APP_WIDE_IN_THOSE_GROUPS = frozenset({
    "MAX_CONCURRENCY", "RAY_ADDRESS", "ACCELERATOR",
    # Runtime adapters are loaded by name with no base model named: one model per app for now.
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
})
# An entry in Ray Serve LLM's shape is known by this key.
LLM_CONFIG_MARK = "model_loading_config"
# LLMConfig's deployment_config keys with a setting here; its autoscaling_config's likewise.
DEPLOYMENT_CONFIG_SETTINGS = {"num_replicas": "NUM_REPLICAS"}
AUTOSCALING_SETTINGS = {
    "min_replicas": "MIN_REPLICAS",
    "max_replicas": "MAX_REPLICAS",
    "target_ongoing_requests": "TARGET_ONGOING_REQUESTS",
}
# LLMConfig keys that change nothing here (observability Ray Serve LLM has and this app has anyway).
IGNORED_LLM_CONFIG_KEYS = frozenset({"log_engine_metrics"})


class ModelEntryError(ValueError):
    """An entry of MODELS this app can't serve as given; the message names the key."""


def per_model_names() -> frozenset[str]:
    names = set()
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("group") in PER_MODEL_GROUPS:
            names.add(name)
    return frozenset(names - APP_WIDE_IN_THOSE_GROUPS)


def app_wide_names() -> frozenset[str]:
    """Our settings a MODELS entry may not set (they are the app's)."""
    return frozenset(Settings.model_fields) - per_model_names() - {"engine_cli_overrides", "model_settings"}


def entry_settings(entry: Any) -> dict[str, Any]:
    """One MODELS entry as setting names (ours, or vLLM's options upper-cased) -> values."""
    if isinstance(entry, str):
        entry = _yaml_file(entry)
    if not isinstance(entry, dict):
        raise ModelEntryError("must be an object (our settings, or Ray Serve LLM's LLMConfig), or a YAML file's path")
    if LLM_CONFIG_MARK in entry:
        flat = llm_config_settings(entry)
    else:
        flat = {str(key).upper(): value for key, value in entry.items()}
    if wide := sorted(set(flat) & app_wide_names()):
        raise ModelEntryError(f"{', '.join(wide)}: the app's, not a model's: set {'them' if len(wide) > 1 else 'it'} "
                              "outside MODELS")
    return flat


def llm_config_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Serve LLM's LLMConfig -> our settings for that model."""
    flat: dict[str, Any] = {}
    unknown = set(config) - {LLM_CONFIG_MARK, "engine_kwargs", "deployment_config", "accelerator_type", "runtime_env",
                             *IGNORED_LLM_CONFIG_KEYS}
    if "lora_config" in unknown:
        raise ModelEntryError("lora_config: serve adapters with LORA_MODULES in the entry instead")
    if unknown:
        raise ModelEntryError(f"{', '.join(sorted(unknown))}: not supported here")
    loading = config[LLM_CONFIG_MARK] or {}
    model_id, source = loading.get("model_id"), loading.get("model_source") or loading.get("model_id")
    if not isinstance(source, str) or not source:
        raise ModelEntryError("model_loading_config.model_source: a Hugging Face repo id or a local folder (a string)")
    flat["MODEL_NAME"] = source
    if isinstance(model_id, str) and model_id and model_id != source:
        flat["OPENAI_SERVED_MODEL_NAME_OVERRIDE"] = model_id
    if config.get("accelerator_type"):
        flat["ACCELERATOR_TYPE"] = config["accelerator_type"]
    env_vars = (config.get("runtime_env") or {}).get("env_vars") or {}
    if other := set(config.get("runtime_env") or {}) - {"env_vars"}:
        raise ModelEntryError(f"runtime_env.{', runtime_env.'.join(sorted(other))}: set it on the app's runtime_env")
    # Ray Serve LLM users pass settings such as HF_TOKEN this way; explicit keys below win.
    flat.update({str(k).upper(): v for k, v in env_vars.items()})
    flat.update({str(k).upper(): v for k, v in (config.get("engine_kwargs") or {}).items()})
    deployment = dict(config.get("deployment_config") or {})
    autoscaling = deployment.pop("autoscaling_config", None) or {}
    for key, name in DEPLOYMENT_CONFIG_SETTINGS.items():
        if key in deployment:
            flat[name] = deployment.pop(key)
    for key, name in AUTOSCALING_SETTINGS.items():
        if key in autoscaling:
            flat[name] = autoscaling[key]
    if deployment:
        raise ModelEntryError(f"deployment_config.{', deployment_config.'.join(sorted(deployment))}: not supported "
                              "here (the ingress's MAX_CONCURRENCY and MAX_QUEUED_REQUESTS limit requests)")
    return flat


def _yaml_file(path: str) -> Any:
    """Ray Serve LLM's llm_configs may name YAML files, one LLMConfig each."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ModelEntryError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ModelEntryError(f"{path}: not YAML ({exc})") from None
