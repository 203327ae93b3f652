"""MODELS: entries in our settings' shape and in Ray Serve LLM's `llm_configs` shape become each
model's settings over the app's; what can't be served as given is an error naming the entry and key.
Pure (the app with several models runs in tests/test_lifecycle_fast.py and tests/test_runpod_smol.py)."""

from __future__ import annotations

import json

import pytest

from configs.loader import SettingsError, load_settings
from configs.placement import engine_deployment_options, placement_bundles
from configs.settings import Accelerator
from deployments.app import engine_deployment_names

RAY_SERVE_LLM_ENTRY = {
    "model_loading_config": {"model_id": "qwen", "model_source": "Qwen/Qwen2.5-0.5B-Instruct"},
    "accelerator_type": "L4",
    "engine_kwargs": {"max_model_len": 8192, "tensor_parallel_size": 2, "enable_chunked_prefill": True},
    "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}},
    "runtime_env": {"env_vars": {"HF_TOKEN": "hf_x"}},
    "log_engine_metrics": True,
}


def load_error(environ=None, args=None) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ or {}, args, forward_engine_args=True)
    return str(caught.value)


def test_without_models_the_app_is_its_one_model():
    settings = load_settings({"MODEL_NAME": "org/a"})
    assert settings.models == (settings,)


def test_our_entries_override_the_apps_settings_and_keep_the_rest():
    settings = load_settings({"MAX_MODEL_LEN": "2048", "MAX_CONCURRENCY": "7", "MODELS": json.dumps([
        {"MODEL_NAME": "org/a"}, {"model_name": "org/b", "MAX_MODEL_LEN": 512, "ENFORCE_EAGER": True}])})
    a, b = settings.models
    assert (a.served_model_name, a.MAX_MODEL_LEN, a.MAX_CONCURRENCY) == ("org/a", 2048, 7)
    assert (b.served_model_name, b.MAX_MODEL_LEN, b.MAX_CONCURRENCY) == ("org/b", 512, 7)
    assert "--enforce-eager" in b.engine_cli_overrides and "--enforce-eager" not in a.engine_cli_overrides
    assert a.MODELS is None and b.MODELS is None


def test_ray_serve_llm_llm_configs_move_by_changing_import_path(tmp_path):
    import yaml

    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({"model_loading_config": {"model_id": "org/tiny"}}))
    settings = load_settings({}, {"llm_configs": [RAY_SERVE_LLM_ENTRY, str(second)]})
    qwen, tiny = settings.models
    assert (qwen.served_model_name, qwen.MODEL_NAME, qwen.MAX_MODEL_LEN, qwen.TENSOR_PARALLEL_SIZE) == (
        "qwen", "Qwen/Qwen2.5-0.5B-Instruct", 8192, 2)
    assert (qwen.MIN_REPLICAS, qwen.MAX_REPLICAS, qwen.TARGET_ONGOING_REQUESTS) == (1, 4, 16)
    assert qwen.HF_TOKEN.get_secret_value() == "hf_x" and "--enable-chunked-prefill" in qwen.engine_cli_overrides
    assert tiny.MODEL_NAME == tiny.served_model_name == "org/tiny"
    options = engine_deployment_options(qwen, Accelerator.GPU)
    assert options["placement_group_bundles"] == [{"CPU": 1, "GPU": 1, "accelerator_type:L4": 0.001},
                                                  {"GPU": 1, "accelerator_type:L4": 0.001}]
    assert options["autoscaling_config"]["max_replicas"] == 4
    # On CPU there is no GPU type to ask for.
    assert placement_bundles(1, 1, Accelerator.CPU, "L4") == [{"CPU": 1}]


def test_what_cant_be_served_as_given_names_the_entry_and_the_key():
    message = load_error({"MODELS": json.dumps([
        {"MODEL_NAME": "a", "MAX_CONCURRENCY": 3},
        {"model_loading_config": {}},
        {"model_loading_config": {"model_id": "b"}, "lora_config": {"dynamic_lora_loading_path": "s3://x"}},
        {"model_loading_config": {"model_id": "c"}, "deployment_config": {"max_ongoing_requests": 5}},
        {"MODEL_NAME": "d", "NOT_A_SETTING": 1},
        "/nonexistent/model.yaml",
        {"model_loading_config": {"model_id": "e"}, "runtime_env": {"pip": ["x"]}},
    ])})
    for expected in ("MODELS[0]: MAX_CONCURRENCY: the app's", "MODELS[1]: model_loading_config.model_source",
                     "MODELS[2]: lora_config", "MODELS[3]: deployment_config.max_ongoing_requests",
                     "MODELS[4]: NOT_A_SETTING: unknown setting", "MODELS[5]: /nonexistent/model.yaml",
                     "MODELS[6]: runtime_env.pip"):
        assert expected in message, message
    assert "given twice" in load_error({"MODELS": '[{"MODEL_NAME": "a"}, {"MODEL_NAME": "a"}]'})
    assert "is empty" in load_error({"MODELS": "[]"})
    assert "both name the models" in load_error({}, {"MODELS": [{"MODEL_NAME": "a"}], "llm_configs": []})
    assert "MODELS.1" in load_error({"MODELS": '[{"MODEL_NAME": "a"}, 7]'})
    two = '[{"MODEL_NAME": "a"}, {"MODEL_NAME": "b"}]'
    assert "serves one model" in load_error({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "MODELS": two})


def test_one_engine_deployment_per_model_named_for_it():
    assert engine_deployment_names(["tiny"]) == ["EngineServer"]
    assert engine_deployment_names(["HuggingFaceTB/SmolLM2-135M-Instruct", "tiny", "tiny!"]) == [
        "EngineServer-HuggingFaceTB-SmolLM2-135M-Instruct", "EngineServer-tiny", "EngineServer-tiny-"]
