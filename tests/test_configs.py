"""Unit tests of `configs`: settings loading, vLLM arguments, Serve options, platform, docs.

Pure Python: no Ray, no Serve, no engine. vLLM is imported only for its argument parser.
Every `load_settings` call passes `environ=` explicitly; nothing here reads os.environ.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from configs import docs
from configs.engine_args import cpu_thread_binding, executor_backend, vllm_cli_args
from configs.loader import SettingsError, load_settings
from configs.placement import (
    engine_deployment_options,
    ingress_deployment_options,
    logical_cpus_needed,
    per_router_limit,
    placement_bundles,
    ray_init_kwargs,
)
from configs.platform import accelerator_from_resources, resolve_accelerator
from configs.settings import (
    DEMO_MODEL_SERVED_NAME,
    ENGINE,
    INGRESS,
    SCALING,
    SERVING,
    STREAMING,
    WORKER,
    Accelerator,
    PlacementStrategy,
    Settings,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A variable of the test runner's environment must never leak in: every call passes environ.


def load(env: dict[str, str] | None = None, args: dict | None = None, **kwargs) -> Settings:
    return load_settings(environ=env or {}, args=args, **kwargs)


def load_error(env: dict[str, str] | None = None, args: dict | None = None, **kwargs) -> str:
    with pytest.raises(SettingsError) as info:
        load(env, args, **kwargs)
    return str(info.value)


def settings(**values) -> Settings:
    """Settings from already-typed values (no environment, no vLLM)."""
    return load_settings(environ={}, args=values, forward_engine_args=False)


# --- load_settings: defaults ---------------------------------------------------------------------

WORKER_VLLM_DEFAULTS = {
    # Unset: every GPU of a node, as worker-vllm shards over every GPU it sees (1 on CPU).
    "TENSOR_PARALLEL_SIZE": None,
    "PIPELINE_PARALLEL_SIZE": 1,
    "GPU_MEMORY_UTILIZATION": 0.95,
    "MAX_NUM_SEQS": 256,
    "ENABLE_AUTO_TOOL_CHOICE": False,
    "MAX_CONCURRENCY": 300,
    "DEFAULT_BATCH_SIZE": 50,
    "DEFAULT_MIN_BATCH_SIZE": 1,
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": 3,
}


@pytest.mark.parametrize("forward", [True, False])
def test_defaults_equal_worker_vllms(forward):
    s = load({}, forward_engine_args=forward)
    for name, value in WORKER_VLLM_DEFAULTS.items():
        assert getattr(s, name) == value, name
    assert s.ENABLE_AUTO_TOOL_CHOICE is False
    assert s.engine_cli_overrides == ()


def test_other_defaults():
    s = load({})
    assert s.MODEL_NAME is None and s.uses_demo_model
    assert s.served_model_name == DEMO_MODEL_SERVED_NAME
    assert s.HF_TOKEN is None and s.API_KEY is None and s.api_keys == ()
    assert s.MAX_MODEL_LEN is None and s.QUANTIZATION is None
    assert s.CUSTOM_CHAT_TEMPLATE is None and s.TOOL_CALL_PARSER is None
    assert s.OPENAI_SERVED_MODEL_NAME_OVERRIDE is None
    assert s.NUM_REPLICAS == 1 and s.MIN_REPLICAS is None and s.MAX_REPLICAS is None
    assert not s.autoscaling
    assert s.PLACEMENT_STRATEGY is PlacementStrategy.STRICT_PACK
    assert s.ACCELERATOR is Accelerator.AUTO
    assert s.MAX_QUEUED_REQUESTS == 300
    assert s.SERVE_HOST == "127.0.0.1" and s.SERVE_PORT == 8000
    assert s.UNHEALTHY_EXIT_SECONDS == 300
    assert s.devices_per_engine == 1


def test_explicit_environ_ignores_os_environ(monkeypatch):
    monkeypatch.setenv("MAX_NUM_SEQS", "7")
    monkeypatch.setenv("ENABLE_PREFIX_CACHING", "true")
    monkeypatch.setenv("MODEL", "should-not-be-seen")
    s = load({})
    assert s.MAX_NUM_SEQS == 256
    assert s.engine_cli_overrides == ()


# --- load_settings: parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("TENSOR_PARALLEL_SIZE", "4", 4),
        ("PIPELINE_PARALLEL_SIZE", " 2 ", 2),
        ("MAX_NUM_SEQS", "8", 8),
        ("MAX_MODEL_LEN", "4096", 4096),
        ("MAX_CONCURRENCY", "12", 12),
        ("SERVE_PORT", "9000", 9000),
        ("GPU_MEMORY_UTILIZATION", "0.5", 0.5),
        ("GPU_MEMORY_UTILIZATION", "1", 1.0),
        ("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "1.5", 1.5),
        ("UNHEALTHY_EXIT_SECONDS", "2.5", 2.5),
        ("TARGET_ONGOING_REQUESTS", "3", 3.0),
        ("QUANTIZATION", "awq", "awq"),
        ("MODEL_NAME", "org/model", "org/model"),
        ("PLACEMENT_STRATEGY", "PACK", PlacementStrategy.PACK),
        ("ACCELERATOR", "cpu", Accelerator.CPU),
        ("ACCELERATOR", "gpu", Accelerator.GPU),
        ("DEMO_MODEL_DIR", "/tmp/demo", Path("/tmp/demo")),
    ],
)
def test_values_parse_from_strings(name, raw, expected):
    value = getattr(load({name: raw}), name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("off", False)],
)
def test_booleans_parse_from_strings(raw, expected):
    env = {"ENABLE_AUTO_TOOL_CHOICE": raw, "TOOL_CALL_PARSER": "hermes"}
    assert load(env).ENABLE_AUTO_TOOL_CHOICE is expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("MAX_MODEL_LEN", "abc"),
        ("MAX_MODEL_LEN", "0"),
        ("TENSOR_PARALLEL_SIZE", "0"),
        ("TENSOR_PARALLEL_SIZE", "1.5"),
        ("MAX_NUM_SEQS", "many"),
        ("GPU_MEMORY_UTILIZATION", "1.5"),
        ("GPU_MEMORY_UTILIZATION", "0"),
        ("GPU_MEMORY_UTILIZATION", "most"),
        ("ENABLE_AUTO_TOOL_CHOICE", "maybe"),
        ("SERVE_PORT", "70000"),
        ("PLACEMENT_STRATEGY", "ANYWHERE"),
        ("ACCELERATOR", "tpu"),
        ("MAX_QUEUED_REQUESTS", "-1"),
    ],
)
def test_bad_value_names_the_variable(name, raw):
    message = load_error({name: raw})
    assert f"{name}={raw!r}" in message


def test_bad_value_message_says_what_was_expected():
    message = load_error({"MAX_MODEL_LEN": "abc"})
    assert "MAX_MODEL_LEN='abc'" in message
    assert "integer" in message


def test_every_error_is_reported_at_once():
    message = load_error({"MAX_MODEL_LEN": "abc", "MAX_NUM_SEQS": "x", "MAX_LORAS": "y", "MODEL": "m"})
    for name in ("MAX_MODEL_LEN", "MAX_NUM_SEQS", "MAX_LORAS", "MODEL"):
        assert name in message


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


# --- load_settings: sources ----------------------------------------------------------------------


def test_args_override_environment():
    s = load({"MAX_NUM_SEQS": "8", "MODEL_NAME": "env/model"}, {"MAX_NUM_SEQS": 16})
    assert s.MAX_NUM_SEQS == 16
    assert s.MODEL_NAME == "env/model"


def test_args_keys_are_case_insensitive_and_typed():
    s = load({}, {"max_num_seqs": 16, "gpu_memory_utilization": 0.5, "enable_auto_tool_choice": True,
                  "tool_call_parser": "hermes", "accelerator": "cpu"})
    assert s.MAX_NUM_SEQS == 16
    assert s.GPU_MEMORY_UTILIZATION == 0.5
    assert s.ENABLE_AUTO_TOOL_CHOICE is True
    assert s.ACCELERATOR is Accelerator.CPU


def test_empty_arg_does_not_override_environment():
    assert load({"MAX_NUM_SEQS": "8"}, {"MAX_NUM_SEQS": ""}).MAX_NUM_SEQS == 8


@pytest.mark.parametrize(
    ("legacy", "name", "raw", "expected"),
    [("MIN_BATCH_SIZE", "DEFAULT_MIN_BATCH_SIZE", "5", 5),
     ("BATCH_SIZE_GROWTH_FACTOR", "DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "2.5", 2.5)],
)
def test_legacy_names_are_accepted(legacy, name, raw, expected):
    assert getattr(load({legacy: raw}), name) == expected
    assert getattr(load({}, {legacy.lower(): raw}), name) == expected


def test_current_name_wins_over_legacy_name_in_the_same_source():
    assert load({"MIN_BATCH_SIZE": "5", "DEFAULT_MIN_BATCH_SIZE": "2"}).DEFAULT_MIN_BATCH_SIZE == 2


def test_legacy_name_in_args_wins_over_environment():
    assert load({"DEFAULT_MIN_BATCH_SIZE": "2"}, {"MIN_BATCH_SIZE": 4}).DEFAULT_MIN_BATCH_SIZE == 4


def test_legacy_name_applies_when_current_name_is_empty():
    s = load({"DEFAULT_MIN_BATCH_SIZE": "", "MIN_BATCH_SIZE": "5"})
    assert s.DEFAULT_MIN_BATCH_SIZE == 5


def test_legacy_names_are_not_forwarded_to_vllm():
    assert load({"MIN_BATCH_SIZE": "2", "BATCH_SIZE_GROWTH_FACTOR": "2"}).engine_cli_overrides == ()


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_string_means_unset(empty):
    s = load({
        "MAX_MODEL_LEN": empty,
        "TENSOR_PARALLEL_SIZE": empty,
        "GPU_MEMORY_UTILIZATION": empty,
        "ENABLE_AUTO_TOOL_CHOICE": empty,
        "MODEL_NAME": empty,
        "HF_TOKEN": empty,
        "API_KEY": empty,
        "MIN_REPLICAS": empty,
        "ACCELERATOR": empty,
        "PLACEMENT_STRATEGY": empty,
    })
    assert s.MAX_MODEL_LEN is None
    assert s.TENSOR_PARALLEL_SIZE is None and s.tensor_parallel_size == 1
    assert s.GPU_MEMORY_UTILIZATION == 0.95
    assert s.ENABLE_AUTO_TOOL_CHOICE is False
    assert s.MODEL_NAME is None and s.uses_demo_model
    assert s.HF_TOKEN is None and s.API_KEY is None
    assert not s.autoscaling
    assert s.ACCELERATOR is Accelerator.AUTO
    assert s.PLACEMENT_STRATEGY is PlacementStrategy.STRICT_PACK


@pytest.mark.parametrize("name", ["SEED", "ENFORCE_EAGER", "ENABLE_PREFIX_CACHING", "DTYPE", "MODEL", "PORT"])
def test_empty_forwarded_variable_means_unset(name):
    assert load({name: ""}).engine_cli_overrides == ()


def test_unrelated_environment_variables_are_ignored():
    env = {"PATH": "/usr/bin", "HOME": "/root", "SOME_OTHER_TOOL_SETTING": "x", "lowercase_var": "y"}
    assert load(env).engine_cli_overrides == ()


# --- load_settings: forwarded vLLM arguments -----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "tokens"),
    [
        ({"ENABLE_PREFIX_CACHING": "true"}, ["--enable-prefix-caching"]),
        ({"ENABLE_PREFIX_CACHING": "false"}, ["--no-enable-prefix-caching"]),
        ({"ENFORCE_EAGER": "false"}, ["--no-enforce-eager"]),
        ({"ENFORCE_EAGER": "1"}, ["--enforce-eager"]),
        ({"SEED": "3"}, ["--seed", "3"]),
        ({"DTYPE": "bfloat16"}, ["--dtype", "bfloat16"]),
        ({"ENABLE_LORA": "true", "MAX_LORAS": "2"}, ["--enable-lora", "--max-loras", "2"]),
        (
            {"SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 2}'},
            ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
        ),
    ],
)
def test_vllm_arguments_are_forwarded(env, tokens):
    assert list(load(env).engine_cli_overrides) == tokens


def test_forwarded_arguments_parse_with_vllms_parser(vllm_parser):
    s = load({
        "ENABLE_PREFIX_CACHING": "true",
        "ENFORCE_EAGER": "false",
        "SEED": "3",
        "DTYPE": "bfloat16",
        "ENABLE_LORA": "yes",
        "MAX_LORAS": "2",
        "SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 2}',
    })
    ns = vllm_parser.parse_args(list(s.engine_cli_overrides))
    assert ns.enable_prefix_caching is True
    assert ns.enforce_eager is False
    assert ns.seed == 3
    assert ns.dtype == "bfloat16"
    assert ns.enable_lora is True
    assert ns.max_loras == 2
    assert ns.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}


def test_forwarded_arguments_from_args_take_native_values(vllm_parser):
    s = load({}, {
        "seed": 7,
        "enable_prefix_caching": True,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 2},
    })
    ns = vllm_parser.parse_args(list(s.engine_cli_overrides))
    assert ns.seed == 7
    assert ns.enable_prefix_caching is True
    assert ns.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}


def test_forwarded_args_come_after_environment_so_args_win(vllm_parser):
    s = load({"SEED": "1"}, {"SEED": 2})
    assert vllm_parser.parse_args(list(s.engine_cli_overrides)).seed == 2


def test_bad_integer_for_forwarded_argument_names_it():
    message = load_error({"MAX_LORAS": "abc"})
    assert "MAX_LORAS" in message
    assert "integer" in message


def test_bad_choice_for_forwarded_argument_lists_the_choices():
    message = load_error({"DTYPE": "bogus"})
    assert "DTYPE='bogus'" in message
    for choice in ("auto", "bfloat16", "float16", "float32", "half"):
        assert choice in message


def test_bad_boolean_for_forwarded_flag_names_it():
    message = load_error({"ENABLE_PREFIX_CACHING": "maybe"})
    assert "ENABLE_PREFIX_CACHING='maybe'" in message
    assert "boolean" in message


def test_bad_json_for_forwarded_config_names_it():
    assert "SPECULATIVE_CONFIG" in load_error({"SPECULATIVE_CONFIG": "{not json"})


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("MODEL", "MODEL_NAME"),
        ("SERVED_MODEL_NAME", "OPENAI_SERVED_MODEL_NAME_OVERRIDE"),
        ("DISTRIBUTED_EXECUTOR_BACKEND", "ACCELERATOR"),
        ("DATA_PARALLEL_SIZE", "NUM_REPLICAS"),
        ("CHAT_TEMPLATE", "CUSTOM_CHAT_TEMPLATE"),
    ],
)
@pytest.mark.parametrize("where", ["env", "args"])
def test_owned_vllm_arguments_name_the_right_variable(name, owner, where):
    value = "2" if name == "DATA_PARALLEL_SIZE" else "ray" if "BACKEND" in name else "x"
    if where == "env":
        message = load_error({name: value})
    else:
        message = load_error({}, {name.lower(): value})
    assert name in message
    assert f"use {owner}" in message


@pytest.mark.parametrize("name", ["HOST", "PORT", "UVICORN_LOG_LEVEL", "SSL_KEYFILE", "ROOT_PATH"])
def test_http_server_options_in_the_environment_are_ignored(name):
    value = "8080" if name == "PORT" else "0.0.0.0" if name == "HOST" else "info" if "LEVEL" in name else "x"
    s = load({name: value})
    assert s.engine_cli_overrides == ()
    assert s.SERVE_PORT == 8000 and s.SERVE_HOST == "127.0.0.1"


@pytest.mark.parametrize(("key", "value", "instead"), [("port", 1, "SERVE_PORT"), ("host", "0.0.0.0", "SERVE_HOST")])
def test_http_server_options_in_args_are_errors(key, value, instead):
    message = load_error({}, {key: value})
    assert key.upper() in message
    assert instead in message


def test_unknown_key_in_args_is_an_error():
    message = load_error({}, {"max_num_seq": 8})
    assert "MAX_NUM_SEQ" in message
    assert "unknown" in message


def test_internal_field_is_not_settable_from_args():
    assert "ENGINE_CLI_OVERRIDES" in load_error({}, {"engine_cli_overrides": ["--seed", "1"]})


def test_without_forwarding_vllms_parser_is_not_used(monkeypatch):
    import configs.loader

    def boom():
        raise AssertionError("vLLM's parser was consulted")

    monkeypatch.setattr(configs.loader, "vllm_options", boom)
    s = load({"ENABLE_PREFIX_CACHING": "true", "MODEL": "x", "MAX_NUM_SEQS": "4"}, forward_engine_args=False)
    assert s.engine_cli_overrides == ()
    assert s.MAX_NUM_SEQS == 4


def assert_loads_without_importing_vllm(load_call: str) -> None:
    """Runs `s = <load_call>` in a fresh interpreter: it must give MAX_NUM_SEQS 4 and leave vLLM unimported."""
    code = (
        "import sys\n"
        "from configs.loader import load_settings\n"
        f"s = {load_call}\n"
        "assert s.MAX_NUM_SEQS == 4\n"
        "loaded = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_without_forwarding_vllm_is_not_imported():
    assert_loads_without_importing_vllm(
        "load_settings(environ={'ENABLE_PREFIX_CACHING': 'true', 'MAX_NUM_SEQS': '4'}, forward_engine_args=False)"
    )


def test_the_option_name_list_is_the_installed_vllms():
    import configs.loader

    assert configs.loader.listed_option_names() == frozenset(configs.loader.vllm_options())
    assert {"ENABLE_PREFIX_CACHING", "MODEL", "PORT", "SEED"} <= configs.loader.listed_option_names()


def test_variables_naming_no_vllm_option_skip_vllms_parser_with_the_same_result(monkeypatch):
    import configs.loader

    env = {"MAX_NUM_SEQS": "4", "PATH": "/bin", "HOME": "/root"}
    with_parser = load(env)
    parsed, real = [], configs.loader.vllm_options()
    monkeypatch.setattr(configs.loader, "vllm_options", lambda: parsed.append(1) or real)
    assert load(env) == with_parser and parsed == []
    assert "MODEL_TAG is set by the product" in load_error({**env, "MODEL_TAG": "y"})  # checked by name
    # One vLLM option in the environment, any Serve-config arg, or a list for another vLLM: the parser.
    for case in ({"environ": {**env, "SEED": "3"}}, {"environ": env, "args": {"seed": 3}}):
        parsed.clear()
        load_settings(**case)
        assert parsed == [1], case
    parsed.clear()
    monkeypatch.setattr(configs.loader, "installed_vllm_version", lambda: "0.0.1")
    configs.loader.listed_option_names.cache_clear()
    try:
        load(env)
    finally:
        configs.loader.listed_option_names.cache_clear()
    assert parsed == [1]


def test_the_app_builders_settings_do_not_import_vllm():
    """6-7 s of CPU off the start-up's critical path: the driver builds the app without vLLM."""
    assert_loads_without_importing_vllm(
        "load_settings(environ={'MODEL_NAME': 'm', 'MAX_NUM_SEQS': '4', 'PATH': '/bin'})"
    )


# --- load_settings: secrets, keys, combinations ---------------------------------------------------


def test_api_key_comma_list_becomes_api_keys():
    s = load({"API_KEY": "alpha, beta,gamma "})
    assert s.api_keys == ("alpha", "beta", "gamma")
    assert load({"API_KEY": "single"}).api_keys == ("single",)


@pytest.mark.parametrize("value", [",", "alpha,", "alpha,,beta", " , ", ",alpha"])
def test_an_empty_api_key_stops_start_up(value):
    """A stray comma must not leave the API open (or keyed with fewer keys than meant)."""
    message = load_error({"API_KEY": value})
    assert "API_KEY" in message and "empty key" in message


@pytest.mark.parametrize("value", [12345, ["sk-list-secret", "b"], {"key": "sk-dict-secret"}, 3.5])
def test_a_non_string_secret_in_serve_args_is_an_error_that_never_echoes_it(value):
    for name in ("API_KEY", "HF_TOKEN"):
        message = load_error({}, {name.lower(): value})
        assert name in message and "value not shown" in message
        assert str(value) not in message and "secret" not in message.replace("value not shown", "")


def test_api_key_is_secret():
    s = load({"API_KEY": "sk-very-secret"})
    assert isinstance(s.API_KEY, SecretStr)
    assert "sk-very-secret" not in repr(s) and "sk-very-secret" not in str(s)


def test_hf_token_is_secret():
    s = load({"HF_TOKEN": "hf_abcdef123"})
    assert isinstance(s.HF_TOKEN, SecretStr)
    assert s.HF_TOKEN.get_secret_value() == "hf_abcdef123"
    assert "hf_abcdef123" not in repr(s)
    assert "hf_abcdef123" not in str(s)
    assert "hf_abcdef123" not in s.model_dump_json()


def test_secret_is_not_echoed_in_an_error():
    message = load_error({"HF_TOKEN": "hf_abcdef123", "MAX_MODEL_LEN": "abc"})
    assert "hf_abcdef123" not in message


def test_auto_tool_choice_needs_a_parser():
    message = load_error({"ENABLE_AUTO_TOOL_CHOICE": "true"})
    assert "ENABLE_AUTO_TOOL_CHOICE" in message and "TOOL_CALL_PARSER" in message
    s = load({"ENABLE_AUTO_TOOL_CHOICE": "true", "TOOL_CALL_PARSER": "hermes"})
    assert s.ENABLE_AUTO_TOOL_CHOICE and s.TOOL_CALL_PARSER == "hermes"


@pytest.mark.parametrize("env", [{"MIN_REPLICAS": "1"}, {"MAX_REPLICAS": "2"}])
def test_min_and_max_replicas_go_together(env):
    message = load_error(env)
    assert "MIN_REPLICAS" in message and "MAX_REPLICAS" in message


def test_min_replicas_must_not_exceed_max():
    assert "MIN_REPLICAS" in load_error({"MIN_REPLICAS": "3", "MAX_REPLICAS": "2"})
    s = load({"MIN_REPLICAS": "0", "MAX_REPLICAS": "2"})
    assert s.autoscaling and s.MIN_REPLICAS == 0 and s.MAX_REPLICAS == 2


def test_min_batch_size_must_not_exceed_batch_size():
    assert "DEFAULT_MIN_BATCH_SIZE" in load_error({"DEFAULT_MIN_BATCH_SIZE": "60"})
    assert "DEFAULT_MIN_BATCH_SIZE" in load_error({"MIN_BATCH_SIZE": "10", "DEFAULT_BATCH_SIZE": "5"})


def test_settings_are_frozen():
    s = load({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen instances
        s.MAX_NUM_SEQS = 1  # type: ignore[misc]


def test_derived_values():
    s = load({"TENSOR_PARALLEL_SIZE": "4", "PIPELINE_PARALLEL_SIZE": "2", "MODEL_NAME": "org/m"})
    assert s.devices_per_engine == 8
    assert not s.uses_demo_model


# --- engine_args ---------------------------------------------------------------------------------


def _value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, (flag, args)
    return args[args.index(flag) + 1]


def test_executor_backend():
    assert executor_backend(Accelerator.GPU) == "ray"
    assert executor_backend(Accelerator.CPU) == "mp"


def test_gpu_engine_uses_ray_and_gpu_memory_utilization():
    s = settings(GPU_MEMORY_UTILIZATION=0.8)
    args = vllm_cli_args(s, Accelerator.GPU, "/models/m")
    assert _value(args, "--model") == "/models/m"
    assert _value(args, "--distributed-executor-backend") == "ray"
    assert _value(args, "--gpu-memory-utilization") == "0.8"
    assert _value(args, "--tensor-parallel-size") == "1"
    assert _value(args, "--pipeline-parallel-size") == "1"
    assert _value(args, "--max-num-seqs") == "256"


def test_cpu_engine_uses_mp_and_no_gpu_memory_utilization():
    args = vllm_cli_args(settings(), Accelerator.CPU, "/models/m")
    assert _value(args, "--distributed-executor-backend") == "mp"
    assert "--gpu-memory-utilization" not in args


def test_accelerator_must_be_resolved():
    with pytest.raises(ValueError):
        vllm_cli_args(settings(), Accelerator.AUTO, "/models/m")


@pytest.mark.parametrize(
    ("values", "served"),
    [
        ({"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "alias", "MODEL_NAME": "org/m"}, "alias"),
        ({"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "alias"}, "alias"),
        ({"MODEL_NAME": "org/m"}, "org/m"),
        ({}, DEMO_MODEL_SERVED_NAME),
    ],
)
def test_served_model_name(values, served):
    args = vllm_cli_args(settings(**values), Accelerator.CPU, "/models/local")
    assert _value(args, "--served-model-name") == served
    assert _value(args, "--model") == "/models/local"


def test_optional_arguments_only_when_set():
    args = vllm_cli_args(settings(), Accelerator.GPU, "m")
    for flag in ("--max-model-len", "--quantization", "--chat-template", "--enable-auto-tool-choice",
                 "--tool-call-parser"):
        assert flag not in args


def test_chat_template_tools_length_and_quantization():
    s = settings(CUSTOM_CHAT_TEMPLATE="{{ messages }}", ENABLE_AUTO_TOOL_CHOICE=True, TOOL_CALL_PARSER="hermes",
                 MAX_MODEL_LEN=2048, QUANTIZATION="fp8")
    args = vllm_cli_args(s, Accelerator.GPU, "m")
    assert _value(args, "--chat-template") == "{{ messages }}"
    assert "--enable-auto-tool-choice" in args
    assert _value(args, "--tool-call-parser") == "hermes"
    assert _value(args, "--max-model-len") == "2048"
    assert _value(args, "--quantization") == "fp8"


def test_tool_parser_without_auto_choice():
    args = vllm_cli_args(settings(TOOL_CALL_PARSER="mistral"), Accelerator.CPU, "m")
    assert _value(args, "--tool-call-parser") == "mistral"
    assert "--enable-auto-tool-choice" not in args


def test_forwarded_overrides_come_last():
    s = load({"SEED": "3", "ENABLE_PREFIX_CACHING": "true", "MAX_NUM_SEQS": "8"})
    args = vllm_cli_args(s, Accelerator.GPU, "m")
    assert args[-3:] == ["--seed", "3", "--enable-prefix-caching"]
    assert args[-3:] == list(s.engine_cli_overrides)


@pytest.mark.parametrize("accelerator", [Accelerator.GPU, Accelerator.CPU])
def test_cli_args_parse_with_vllms_parser(vllm_parser, accelerator):
    s = load({
        "MODEL_NAME": "org/model",
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "alias",
        "TENSOR_PARALLEL_SIZE": "2",
        "PIPELINE_PARALLEL_SIZE": "2",
        "MAX_NUM_SEQS": "32",
        "GPU_MEMORY_UTILIZATION": "0.7",
        "MAX_MODEL_LEN": "2048",
        "QUANTIZATION": "fp8",
        "CUSTOM_CHAT_TEMPLATE": "{{ messages }}",
        "ENABLE_AUTO_TOOL_CHOICE": "true",
        "TOOL_CALL_PARSER": "hermes",
        "ENABLE_PREFIX_CACHING": "true",
        "ENFORCE_EAGER": "false",
        "SEED": "3",
        "DTYPE": "bfloat16",
        "SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 2}',
    })
    ns = vllm_parser.parse_args(vllm_cli_args(s, accelerator, "/models/model"))
    assert ns.model == "/models/model"
    assert ns.served_model_name == ["alias"]
    assert ns.tensor_parallel_size == 2
    assert ns.pipeline_parallel_size == 2
    assert ns.max_num_seqs == 32
    assert ns.max_model_len == 2048
    assert ns.quantization == "fp8"
    assert ns.chat_template == "{{ messages }}"
    assert ns.enable_auto_tool_choice is True
    assert ns.tool_call_parser == "hermes"
    assert ns.enable_prefix_caching is True
    assert ns.enforce_eager is False
    assert ns.seed == 3
    assert ns.dtype == "bfloat16"
    assert ns.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}
    if accelerator is Accelerator.GPU:
        assert ns.distributed_executor_backend == "ray"
        assert ns.gpu_memory_utilization == 0.7
    else:
        assert ns.distributed_executor_backend == "mp"
        default = vllm_parser.parse_args([]).gpu_memory_utilization
        assert ns.gpu_memory_utilization == default


def test_default_cli_args_parse_with_vllms_parser(vllm_parser):
    ns = vllm_parser.parse_args(vllm_cli_args(load({}), Accelerator.CPU, "/models/demo"))
    assert ns.model == "/models/demo"
    assert ns.served_model_name == [DEMO_MODEL_SERVED_NAME]
    assert ns.tensor_parallel_size == 1 and ns.pipeline_parallel_size == 1
    assert ns.max_num_seqs == 256
    assert ns.distributed_executor_backend == "mp"
    assert ns.enable_auto_tool_choice is False


# --- cpu_thread_binding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "world", "expected"),
    [
        ([0, 1], 2, "0|1"),
        (list(range(8)), 2, "0,1,2,3|4,5,6,7"),
        (list(range(8)), 1, "0,1,2,3,4,5,6,7"),
        (list(range(8)), 4, "0,1|2,3|4,5|6,7"),
        ([3, 1, 2, 0], 2, "0,1|2,3"),
        ([0, 1, 2], 2, "0|1"),
        ([4, 5, 6, 7], 2, "4,5|6,7"),
    ],
)
def test_cpu_thread_binding(cores, world, expected):
    assert cpu_thread_binding(cores, world) == expected


@pytest.mark.parametrize(("cores", "world"), [([0], 2), ([], 1), ([0, 1], 3), ([0, 1], 0)])
def test_cpu_thread_binding_needs_enough_cores(cores, world):
    with pytest.raises(ValueError):
        cpu_thread_binding(cores, world)


# --- placement -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp"), list(itertools.product([1, 2, 4, 8], [1, 2])))
def test_gpu_placement_bundles(tp, pp):
    bundles = placement_bundles(tp, pp, Accelerator.GPU)
    assert len(bundles) == tp * pp
    assert bundles[0] == {"CPU": 1, "GPU": 1}
    assert all(b == {"GPU": 1} for b in bundles[1:])
    assert sum(b["GPU"] for b in bundles) == tp * pp


@pytest.mark.parametrize(("tp", "pp"), list(itertools.product([1, 2, 4, 8], [1, 2])))
def test_cpu_placement_bundles(tp, pp):
    bundles = placement_bundles(tp, pp, Accelerator.CPU)
    assert len(bundles) == tp * pp
    assert all(b == {"CPU": 1} for b in bundles)


def test_placement_bundles_are_independent_dicts():
    bundles = placement_bundles(2, 2, Accelerator.CPU)
    bundles[0]["CPU"] = 5
    assert all(b == {"CPU": 1} for b in bundles[1:])


@pytest.mark.parametrize(("tp", "pp", "accelerator"), [(0, 1, Accelerator.GPU), (1, 0, Accelerator.CPU),
                                                      (1, 1, Accelerator.AUTO)])
def test_placement_bundles_reject_bad_input(tp, pp, accelerator):
    with pytest.raises(ValueError):
        placement_bundles(tp, pp, accelerator)


def test_engine_options_fixed_replicas():
    s = settings(NUM_REPLICAS=3, TENSOR_PARALLEL_SIZE=2)
    options = engine_deployment_options(s, Accelerator.GPU)
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options
    assert options["placement_group_bundles"] == placement_bundles(2, 1, Accelerator.GPU)
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # The replica's CPU is in the first bundle; the actor itself must take no GPU outside the group.
    assert options["ray_actor_options"]["num_gpus"] == 0


def test_engine_options_autoscaling():
    s = settings(MIN_REPLICAS=1, MAX_REPLICAS=4, NUM_REPLICAS=2, MAX_NUM_SEQS=64)
    options = engine_deployment_options(s, Accelerator.CPU)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}


def test_engine_options_autoscaling_target():
    s = settings(MIN_REPLICAS=0, MAX_REPLICAS=2, TARGET_ONGOING_REQUESTS=5)
    assert engine_deployment_options(s, Accelerator.GPU)["autoscaling_config"]["target_ongoing_requests"] == 5
    s = settings(MIN_REPLICAS=0, MAX_REPLICAS=2, MAX_NUM_SEQS=1)
    assert engine_deployment_options(s, Accelerator.GPU)["autoscaling_config"]["target_ongoing_requests"] >= 1


@pytest.mark.parametrize("strategy", ["STRICT_PACK", "PACK"])
def test_engine_options_placement_strategy(strategy):
    options = engine_deployment_options(load({"PLACEMENT_STRATEGY": strategy}), Accelerator.GPU)
    assert options["placement_group_strategy"] == strategy
    assert isinstance(options["placement_group_strategy"], str)


@pytest.mark.parametrize(("seqs", "concurrency"), [(256, 300), (512, 300), (1, 1), (8, 1000), (1000, 8)])
@pytest.mark.parametrize("accelerator", [Accelerator.GPU, Accelerator.CPU])
def test_engine_max_ongoing_requests_covers_batch_and_concurrency(seqs, concurrency, accelerator):
    s = settings(MAX_NUM_SEQS=seqs, MAX_CONCURRENCY=concurrency)
    limit = engine_deployment_options(s, accelerator)["max_ongoing_requests"]
    assert limit >= seqs
    assert limit >= concurrency


@pytest.mark.parametrize(("concurrency", "queued"), [(300, 300), (1, 0), (50, 1000)])
def test_router_deployment_options(concurrency, queued):
    s = settings(MAX_CONCURRENCY=concurrency, MAX_QUEUED_REQUESTS=queued)
    options = ingress_deployment_options(s)
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"]["num_cpus"] == 0
    # Serve's own limit must sit above what the router admits and queues (the router answers 429).
    assert options["max_ongoing_requests"] > concurrency + queued
    assert ingress_deployment_options(settings(ROUTER_REPLICAS=3))["num_replicas"] == 3
    # The router's own request line replaces Serve's access line.
    assert options["logging_config"] == {"enable_access_log": False}


@pytest.mark.parametrize(
    ("total", "routers", "expected"),
    [(300, 1, 300), (300, 2, 150), (301, 2, 151), (300, 7, 43), (1, 4, 1), (10, 0, 10), (5, 5, 1)],
)
def test_per_router_limit(total, routers, expected):
    assert per_router_limit(total, routers) == expected


def test_an_empty_queue_stays_empty_when_split():
    assert per_router_limit(0, 2, least=0) == 0
    assert per_router_limit(1, 2, least=0) == 1


def test_per_router_limits_cover_the_total():
    for total in (1, 7, 300):
        for routers in (1, 2, 3, 8):
            assert per_router_limit(total, routers) * routers >= total


def test_logical_cpus_needed():
    assert logical_cpus_needed(settings(TENSOR_PARALLEL_SIZE=2), Accelerator.CPU) == 2
    assert logical_cpus_needed(settings(TENSOR_PARALLEL_SIZE=2, NUM_REPLICAS=3), Accelerator.CPU) == 6
    assert logical_cpus_needed(settings(TENSOR_PARALLEL_SIZE=4), Accelerator.GPU) == 1
    assert logical_cpus_needed(settings(MIN_REPLICAS=1, MAX_REPLICAS=3), Accelerator.CPU) == 3


def test_ray_init_joins_ray_address_or_starts_a_head_of_its_own():
    assert ray_init_kwargs(settings(RAY_ADDRESS="auto", TENSOR_PARALLEL_SIZE=4), 2) == {"address": "auto"}
    # Never a bare ray.init(): it would join a `ray start` cluster found on this machine.
    assert ray_init_kwargs(settings(), 2) == {"address": "local", "num_cpus": 2}
    assert ray_init_kwargs(settings(TENSOR_PARALLEL_SIZE=2, NUM_REPLICAS=3), 2) == {"address": "local", "num_cpus": 6}
    assert ray_init_kwargs(settings(TENSOR_PARALLEL_SIZE=2, NUM_REPLICAS=3), 32)["num_cpus"] == 32
    # auto counts as CPU before Ray runs (the larger ask); GPU asks one CPU per engine.
    assert ray_init_kwargs(settings(TENSOR_PARALLEL_SIZE=4, ACCELERATOR="auto"), 1)["num_cpus"] == 4
    assert ray_init_kwargs(settings(TENSOR_PARALLEL_SIZE=4, ACCELERATOR="gpu", NUM_REPLICAS=2), 1)["num_cpus"] == 2


# --- platform ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "resources", "expected"),
    [
        (Accelerator.AUTO, {"GPU": 2.0, "CPU": 8.0}, Accelerator.GPU),
        (Accelerator.AUTO, {"GPU": 0.5}, Accelerator.GPU),
        (Accelerator.AUTO, {"CPU": 8.0}, Accelerator.CPU),
        (Accelerator.AUTO, {"GPU": 0}, Accelerator.CPU),
        (Accelerator.AUTO, {}, Accelerator.CPU),
        (Accelerator.CPU, {"GPU": 4.0}, Accelerator.CPU),
        (Accelerator.GPU, {}, Accelerator.GPU),
    ],
)
def test_accelerator_from_resources(requested, resources, expected):
    assert accelerator_from_resources(requested, resources) is expected


@pytest.mark.parametrize("accelerator", [Accelerator.GPU, Accelerator.CPU])
def test_resolve_explicit_accelerator_needs_no_cluster(accelerator):
    assert resolve_accelerator(accelerator) is accelerator


# --- docs ----------------------------------------------------------------------------------------

PUBLIC_FIELDS = [name for name, info in Settings.model_fields.items() if not info.exclude]


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_table_groups_in_order():
    table = docs.configuration_table()
    headings = [line[4:] for line in table.splitlines() if line.startswith("### ")]
    assert headings == [ENGINE, SERVING, STREAMING, SCALING, INGRESS, WORKER]
    lines = table.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            assert lines[i + 1] == ""
            assert lines[i + 2] == "| Variable | Default | Description |"
            assert lines[i + 3].startswith("| ---")


def test_table_lists_every_setting_once_in_its_group():
    table = docs.configuration_table()
    rows = _rows(table)
    assert sorted(rows) == sorted(PUBLIC_FIELDS)
    assert "engine_cli_overrides" not in table
    for name in PUBLIC_FIELDS:
        assert table.count(f"| `{name}` |") == 1
    current = None
    for line in table.splitlines():
        if line.startswith("### "):
            current = line[4:]
        elif line.startswith("| `"):
            name = line.split("`")[1]
            assert Settings.model_fields[name].json_schema_extra["group"] == current, name


def test_table_defaults_and_descriptions():
    rows = _rows(docs.configuration_table())
    assert rows["TENSOR_PARALLEL_SIZE"][1] == ""
    assert rows["GPU_MEMORY_UTILIZATION"][1] == "`0.95`"
    assert rows["MAX_NUM_SEQS"][1] == "`256`"
    assert rows["MAX_CONCURRENCY"][1] == "`300`"
    assert rows["DEFAULT_BATCH_SIZE_GROWTH_FACTOR"][1] == "`3`"
    assert rows["ENABLE_AUTO_TOOL_CHOICE"][1] == "`false`"
    assert rows["SERVE_HOST"][1] == "`127.0.0.1`"
    # Enums show their value.
    assert rows["PLACEMENT_STRATEGY"][1] == "`STRICT_PACK`"
    assert rows["ACCELERATOR"][1] == "`auto`"
    # None and secrets show nothing.
    for name in ("MODEL_NAME", "MAX_MODEL_LEN", "HF_TOKEN", "API_KEY", "MIN_REPLICAS", "DEMO_MODEL_DIR"):
        assert rows[name][1] == "", name
    for name in PUBLIC_FIELDS:
        assert Settings.model_fields[name].description.split(" ")[0] in rows[name][2]
    assert "integer" in rows["MAX_MODEL_LEN"][2]
    assert "secret" in rows["HF_TOKEN"][2]
    assert "gpu" in rows["ACCELERATOR"][2] and "cpu" in rows["ACCELERATOR"][2]


def test_secret_defaults_are_never_shown():
    class Probe:
        annotation = SecretStr | None
        metadata: list = []

        @staticmethod
        def get_default(call_default_factory=True):
            return SecretStr("do-not-show")

    assert docs.default_text(Probe()) == ""  # type: ignore[arg-type]


def test_replace_between_markers():
    text = f"# Title\n\nIntro.\n\n{docs.BEGIN_MARKER}\nold table\n{docs.END_MARKER}\n\nAfter.\n"
    new = docs.replace_between_markers(text, "| new |\n")
    assert new.startswith("# Title\n\nIntro.\n\n" + docs.BEGIN_MARKER)
    assert new.endswith(docs.END_MARKER + "\n\nAfter.\n")
    assert "old table" not in new and "| new |" in new
    assert docs.replace_between_markers(new, "| new |\n") == new


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{docs.BEGIN_MARKER}\nonly the beginning\n",
        f"only the end\n{docs.END_MARKER}\n",
        f"{docs.END_MARKER}\nreversed\n{docs.BEGIN_MARKER}\n",
        f"{docs.BEGIN_MARKER}\n{docs.END_MARKER}\n{docs.BEGIN_MARKER}\n{docs.END_MARKER}\n",
    ],
)
def test_replace_between_markers_rejects_bad_markers(text):
    with pytest.raises(docs.DocsError):
        docs.replace_between_markers(text, "table")


def test_write_and_check(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# App\n\n## Configuration\n\n{docs.BEGIN_MARKER}\n{docs.END_MARKER}\n\nMore.\n")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1  # docs/configuration.md is missing
    assert "configuration.md" in capsys.readouterr().err

    assert docs.main(["--write", "--root", str(tmp_path)]) == 0
    page = (tmp_path / "docs" / "configuration.md").read_text()
    table = docs.configuration_table().strip()
    assert table in readme.read_text() and table in page
    assert readme.read_text().startswith("# App\n") and readme.read_text().endswith("\nMore.\n")
    for name in ("ENABLE_PREFIX_CACHING", "SEED", "DTYPE", "ENFORCE_EAGER", "ENABLE_LORA", "MAX_LORAS",
                 "SPECULATIVE_CONFIG", "MODEL", "SERVED_MODEL_NAME", "DISTRIBUTED_EXECUTOR_BACKEND",
                 "DATA_PARALLEL_SIZE", "CHAT_TEMPLATE"):
        assert f"`{name}" in page, name
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0

    # A hand edit between the markers makes the check fail; --write repairs it and keeps the intro.
    page_path = tmp_path / "docs" / "configuration.md"
    page_path.write_text(page.replace("| `MAX_NUM_SEQS` |", "| `MAX_NUM_SEQ` |").replace("# Configuration",
                                                                                         "# Settings"))
    capsys.readouterr()
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert docs.main(["--write", "--root", str(tmp_path)]) == 0
    assert page_path.read_text().startswith("# Settings")
    assert docs.check(tmp_path) == []


def test_write_fails_clearly_without_readme_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# App\n")
    assert docs.main(["--write", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "README.md" in err and docs.BEGIN_MARKER in err
    assert readme.read_text() == "# App\n"
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1


def test_print_mode_prints_the_table(capsys):
    assert docs.main([]) == 0
    assert capsys.readouterr().out == docs.configuration_table()


def test_readme_and_configuration_page_are_up_to_date():
    problems = docs.check(REPO_ROOT)
    assert problems == [], "\n".join(problems)


def test_autoscaling_settings_reach_the_built_deployment(monkeypatch):
    """MIN/MAX_REPLICAS and TARGET_ONGOING_REQUESTS end up in the engine deployment Serve deploys."""
    from configs import loader
    from deployments import app as app_module

    monkeypatch.setattr(app_module, "resolve_accelerator", lambda requested: Accelerator.CPU)
    settings = loader.load_settings(environ={}, args={
        "MODEL_NAME": "some/model", "MIN_REPLICAS": 1, "MAX_REPLICAS": 3, "TARGET_ONGOING_REQUESTS": 8,
    }, forward_engine_args=False)
    application = app_module.build_app_from_settings(settings)
    [(bound_engine, _)] = application._bound_deployment.init_args[0]  # ingress([(engine, settings)], settings)
    engine = bound_engine._bound_deployment
    config = engine._deployment_config
    assert config.autoscaling_config.min_replicas == 1
    assert config.autoscaling_config.max_replicas == 3
    assert config.autoscaling_config.target_ongoing_requests == 8
    assert engine._replica_config.placement_group_bundles == [{"CPU": 1}]
