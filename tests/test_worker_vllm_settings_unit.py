"""worker-vllm parity of the settings: every variable of the seed's table (and the worker-vllm
variables users carry over) either changes what the app runs or stops start-up with a message that
names it. Nothing is accepted and dropped. Pure, but for vLLM's own argument parser and config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from configs.engine_args import engine_process_environment, model_cache_environment, vllm_cli_args
from configs.loader import SettingsError, default_base_path, load_settings
from configs.placement import engine_deployment_options, ingress_deployment_options
from configs.platform import default_tensor_parallel_size
from configs.settings import QUANTIZATION_METHODS, Accelerator, Settings
from deployments.runpod_format.native import batch_defaults


def load(env: dict[str, Any]) -> Settings:
    return load_settings(environ={k: str(v) for k, v in env.items()})


def effects(settings: Settings) -> tuple[Any, ...]:
    """Everything a setting can change: the engine's vLLM arguments, its process environment and
    deployment options, and what the router reads (its options, limits, names, batches)."""
    return (
        vllm_cli_args(settings, Accelerator.GPU, "m"),
        engine_process_environment(settings, Accelerator.GPU, [0, 1]),
        engine_deployment_options(settings, Accelerator.GPU),
        ingress_deployment_options(settings),
        settings.served_model_name,
        settings.api_keys,
        settings.RAW_OPENAI_OUTPUT,
        batch_defaults(settings),
    )


# The seed's "Endpoint Configuration" table (worker-vllm's README), each with a value a user would
# set: a valid one changes what runs, an invalid one stops start-up naming the variable.
SEED_TABLE: dict[str, str] = {
    "MODEL_NAME": "facebook/opt-125m",
    "HF_TOKEN": "hf_secret",
    "MAX_MODEL_LEN": "4096",
    "QUANTIZATION": "awq",
    "TENSOR_PARALLEL_SIZE": "2",
    "GPU_MEMORY_UTILIZATION": "0.8",
    "MAX_NUM_SEQS": "64",
    "CUSTOM_CHAT_TEMPLATE": "{{ messages }}",
    "ENABLE_AUTO_TOOL_CHOICE": "true",
    "TOOL_CALL_PARSER": "hermes",
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "alias",
    "MAX_CONCURRENCY": "30",
}
# worker-vllm's other variables users carry over (its configuration reference).
WORKER_VLLM_VARIABLES: dict[str, str] = {
    "MODEL_REVISION": "v2",
    "TOKENIZER_NAME": "org/tokenizer",
    "TOKENIZER_REVISION": "t1",
    "OPENAI_RESPONSE_ROLE": "bot",
    "RAW_OPENAI_OUTPUT": "0",
    "ROPE_SCALING": '{"rope_type": "linear", "factor": 2.0}',
    "ROPE_THETA": "50000",
    "LORA_MODULES": '[{"name": "sql", "path": "org/sql-lora"}]',
    "BASE_PATH": "/runpod-volume",
    "DEFAULT_BATCH_SIZE": "20",
    "DEFAULT_MIN_BATCH_SIZE": "2",
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "2",
    "MIN_BATCH_SIZE": "2",
    "BATCH_SIZE_GROWTH_FACTOR": "2",
    "API_KEY": "k",
    # Forwarded to vLLM under its own name.
    "ENABLE_PREFIX_CACHING": "true",
    "ENFORCE_EAGER": "true",
    "TRUST_REMOTE_CODE": "true",
    "DTYPE": "bfloat16",
    "MAX_LORA_RANK": "32",
    "SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 2}',
}
# Needing a partner: the pair together changes what runs.
PAIRS: dict[str, dict[str, str]] = {
    "ENABLE_AUTO_TOOL_CHOICE": {"TOOL_CALL_PARSER": "hermes"},
    "SPECULATIVE_MODEL": {"NUM_SPECULATIVE_TOKENS": "3"},
    "NUM_SPECULATIVE_TOKENS": {"SPECULATIVE_MODEL": "org/draft"},
}


@pytest.mark.parametrize("name", [*SEED_TABLE, *WORKER_VLLM_VARIABLES, "SPECULATIVE_MODEL", "NUM_SPECULATIVE_TOKENS"])
def test_each_worker_vllm_variable_changes_what_runs(name: str):
    value = {**SEED_TABLE, **WORKER_VLLM_VARIABLES, "SPECULATIVE_MODEL": "org/draft",
             "NUM_SPECULATIVE_TOKENS": "3"}[name]
    partner = PAIRS.get(name, {})
    try:
        baseline = effects(load(partner))
    except SettingsError:  # the partner alone can't run (speculative decoding): against neither
        baseline = effects(load({}))
    assert effects(load({**partner, name: value})) != baseline, f"{name}={value} was accepted and dropped"


@pytest.mark.parametrize(("name", "value"), [
    ("QUANTIZATION", "squeezellm"),  # the seed's, gone from vLLM 0.32
    ("QUANTIZATION", "bitsandbytes"),
    ("TENSOR_PARALLEL_SIZE", "0"),
    ("GPU_MEMORY_UTILIZATION", "1.5"),
    ("MAX_NUM_SEQS", "many"),
    ("ENABLE_AUTO_TOOL_CHOICE", "true"),  # without TOOL_CALL_PARSER
    ("MAX_CONCURRENCY", "0"),
    ("ROPE_SCALING", "linear"),
    ("ROPE_THETA", "-1"),
    ("LORA_MODULES", '[{"name": "sql"}]'),
    ("LORA_MODULES", "sql=org/sql-lora"),
    ("SPECULATIVE_MODEL", "org/draft"),  # without NUM_SPECULATIVE_TOKENS
    ("NUM_SPECULATIVE_TOKENS", "3"),  # without SPECULATIVE_MODEL
    ("RAW_OPENAI_OUTPUT", "maybe"),
])
def test_a_value_that_cannot_run_stops_start_up_naming_the_variable(name: str, value: str):
    with pytest.raises(SettingsError) as info:
        load({name: value})
    assert name in str(info.value)


def test_the_quantization_methods_are_vllms():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as VLLM_METHODS

    assert QUANTIZATION_METHODS == tuple(VLLM_METHODS)


@pytest.mark.parametrize(("env", "flag", "expected"), [
    ({"MODEL_REVISION": "v2"}, "revision", "v2"),
    ({"TOKENIZER_NAME": "org/tok"}, "tokenizer", "org/tok"),
    ({"TOKENIZER_REVISION": "t1"}, "tokenizer_revision", "t1"),
    ({"OPENAI_RESPONSE_ROLE": "bot"}, "response_role", "bot"),
    ({"ROPE_THETA": "50000"}, "hf_overrides", {"rope_theta": 50000.0}),
    ({"ROPE_SCALING": '{"rope_type": "yarn", "factor": 4.0}', "ROPE_THETA": "1e6"}, "hf_overrides",
     {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_theta": 1e6}),
    ({"SPECULATIVE_MODEL": "org/draft", "NUM_SPECULATIVE_TOKENS": "3"}, "speculative_config",
     {"model": "org/draft", "num_speculative_tokens": 3}),
    ({"LORA_MODULES": '[{"name": "a", "path": "/lora/a"}, {"name": "b", "path": "org/b", "base_model_name": "m"}]'},
     "lora_modules", None),
])
def test_worker_vllm_variables_reach_vllms_own_parser(vllm_parser, env, flag, expected):
    namespace = vllm_parser.parse_args(vllm_cli_args(load(env), Accelerator.CPU, "m"))
    if flag == "lora_modules":
        assert namespace.enable_lora is True
        assert [(m.name, m.path, m.base_model_name) for m in namespace.lora_modules] == [
            ("a", "/lora/a", None), ("b", "org/b", "m")]
    else:
        assert getattr(namespace, flag) == expected


def test_lora_modules_take_one_object_alone_too():
    settings = load({"LORA_MODULES": '{"name": "a", "path": "/lora/a"}'})
    assert [m.name for m in settings.LORA_MODULES] == ["a"]


def test_rope_settings_reach_the_models_config(tiny_model: Path, vllm_parser):
    """Through vLLM's own config loading: the override lands in the model's Hugging Face config."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    settings = load({"ROPE_SCALING": '{"rope_type": "linear", "factor": 2.0}', "ROPE_THETA": "50000"})
    args = vllm_parser.parse_args(vllm_cli_args(settings, Accelerator.CPU, str(tiny_model)))
    hf_config = AsyncEngineArgs.from_cli_args(args).create_model_config().hf_config
    assert hf_config.rope_parameters["rope_type"] == "linear" and hf_config.rope_parameters["factor"] == 2.0
    assert hf_config.rope_theta == 50000.0


@pytest.mark.parametrize(("env", "option"), [
    ({"ROPE_THETA": "5", "HF_OVERRIDES": "{}"}, "HF_OVERRIDES"),
    ({"MODEL_REVISION": "v2", "REVISION": "v3"}, "REVISION"),
    ({"TOKENIZER_NAME": "a", "TOKENIZER": "b"}, "TOKENIZER"),
    ({"OPENAI_RESPONSE_ROLE": "a", "RESPONSE_ROLE": "b"}, "RESPONSE_ROLE"),
    ({"SPECULATIVE_MODEL": "d", "NUM_SPECULATIVE_TOKENS": "2", "SPECULATIVE_CONFIG": '{"method": "ngram"}'},
     "SPECULATIVE_CONFIG"),
    ({"LORA_MODULES": '[{"name": "a", "path": "/a"}]', "LORA_MODULES_EXTRA": "x"}, None),
])
def test_a_worker_vllm_variable_and_the_vllm_option_for_the_same_flag_is_an_error(env, option):
    if option is None:  # an unrelated variable beside it: fine
        load(env)
        return
    with pytest.raises(SettingsError) as info:
        load(env)
    assert option in str(info.value)


# --- TENSOR_PARALLEL_SIZE unset -------------------------------------------------------------------


@pytest.mark.parametrize(("accelerator", "gpus", "expected"), [
    (Accelerator.CPU, [], 1),
    (Accelerator.CPU, [8.0], 1),
    (Accelerator.GPU, [4.0], 4),
    (Accelerator.GPU, [2.0, 8.0, 0.0], 8),
    (Accelerator.GPU, [], 1),
])
def test_unset_tensor_parallel_size_is_the_gpus_of_a_node(accelerator, gpus, expected):
    assert default_tensor_parallel_size(accelerator, gpus) == expected


def test_unset_tensor_parallel_size_needs_a_resolved_accelerator():
    with pytest.raises(ValueError):
        default_tensor_parallel_size(Accelerator.AUTO, [1.0])


def test_set_tensor_parallel_size_wins():
    settings = load({"TENSOR_PARALLEL_SIZE": "2"})
    assert settings.TENSOR_PARALLEL_SIZE == 2 and settings.devices_per_engine == 2
    assert load({}).devices_per_engine == 1


# --- BASE_PATH: the model cache on a network volume -----------------------------------------------


def test_base_path_defaults_to_runpods_volume_when_mounted(tmp_path: Path):
    assert default_base_path({}, volume=tmp_path) == tmp_path
    assert default_base_path({}, volume=tmp_path / "absent") is None
    assert default_base_path({"BASE_PATH": "/data"}, volume=tmp_path) is None  # set: nothing to default


def test_base_path_is_the_hugging_face_cache_of_the_engine():
    env = engine_process_environment(load({"BASE_PATH": "/vol", "MODEL_NAME": "org/m"}), Accelerator.GPU, [0])
    assert env["HF_HOME"] == env["HF_HUB_CACHE"] == "/vol/huggingface-cache/hub"
    assert env["HF_DATASETS_CACHE"] == "/vol/huggingface-cache/datasets"
    assert model_cache_environment(None) == {}
    assert "HF_HOME" not in engine_process_environment(load({"MODEL_NAME": "org/m"}), Accelerator.GPU, [0])


def test_engine_environment_is_offline_only_for_the_demo_model():
    assert engine_process_environment(load({}), Accelerator.CPU, [0])["HF_HUB_OFFLINE"] == "1"
    env = engine_process_environment(load({"MODEL_NAME": "org/m", "HF_TOKEN": "t"}), Accelerator.CPU, [0])
    assert "HF_HUB_OFFLINE" not in env and env["HF_TOKEN"] == "t"


def test_cpu_engines_with_two_devices_bind_one_core_each():
    env = engine_process_environment(load({"TENSOR_PARALLEL_SIZE": "2"}), Accelerator.CPU, [0, 1])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_process_environment(
        load({"TENSOR_PARALLEL_SIZE": "2"}), Accelerator.GPU, [0, 1])


def test_json_settings_come_from_serve_config_args_parsed_too():
    settings = load_settings(environ={}, args={"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                               "lora_modules": [{"name": "a", "path": "/a"}]})
    assert settings.ROPE_SCALING == {"rope_type": "linear", "factor": 2.0}
    assert json.loads(settings.LORA_MODULES[0].model_dump_json()) == {"name": "a", "path": "/a",
                                                                        "base_model_name": None}


def test_allowed_media_domains_reach_vllm_and_redirects_are_off(vllm_parser):
    settings = load({"ALLOWED_MEDIA_DOMAINS": "images.example.com, 127.0.0.2"})
    assert settings.allowed_media_domains == ("images.example.com", "127.0.0.2")
    namespace = vllm_parser.parse_args(vllm_cli_args(settings, Accelerator.CPU, "m"))
    assert namespace.allowed_media_domains == ["images.example.com", "127.0.0.2"]
    assert "--allowed-media-domains" not in vllm_cli_args(load({}), Accelerator.CPU, "m")
    assert engine_process_environment(load({}), Accelerator.CPU, [0])["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
