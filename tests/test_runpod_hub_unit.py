"""Pure checks of the RunPod Hub files (.runpod/hub.json and .runpod/tests.json).

No Ray, Serve or engine: the Hub's variables are checked against the settings model and the listed
vLLM option names, and the Hub's test jobs against the project's own job normalization.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from configs.loader import OWNED_ARGUMENTS, SERVER_ONLY_ARGUMENTS
from configs.settings import QUANTIZATION_METHODS, Settings
from deployments.runpod_format.native import BatchPolicy, normalize_job
from tests.test_native_unit import CHAT_FIELDS, COMPLETION_FIELDS

ROOT = Path(__file__).resolve().parent.parent
HUB_FILE = ROOT / ".runpod" / "hub.json"
TESTS_FILE = ROOT / ".runpod" / "tests.json"
OPTION_NAMES_FILE = ROOT / "configs" / "vllm_option_names.txt"

CATEGORIES = {"audio", "embedding", "language", "video", "image"}
INPUT_TYPES = {"string", "number", "boolean", "huggingface"}
SETTINGS_FIELDS = frozenset(Settings.model_fields) - {"engine_cli_overrides"}
# The Hub's first screen; everything else sits behind "advanced".
BASIC_KEYS = {"MODEL_NAME", "HF_TOKEN", "MAX_MODEL_LEN"}


def load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hub() -> dict[str, Any]:
    return load(HUB_FILE)


@pytest.fixture(scope="module")
def hub_tests() -> dict[str, Any]:
    return load(TESTS_FILE)


@pytest.fixture(scope="module")
def env_inputs(hub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The env entries that are user inputs, by key."""
    return {entry["key"]: entry["input"] for entry in hub["config"]["env"] if "input" in entry}


def vllm_option_names() -> frozenset[str]:
    """configs/vllm_option_names.txt: a `# vllm X.Y.Z` line, then one name a line."""
    lines = OPTION_NAMES_FILE.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("#"), f"{OPTION_NAMES_FILE} should start with its `# vllm` line"
    return frozenset(line.strip() for line in lines[1:] if line.strip() and not line.startswith("#"))


def forwarded_to_vllm(key: str) -> bool:
    """A variable the loader forwards to vLLM: a listed option that the product doesn't own and
    that isn't one of vLLM's own HTTP server (which this app doesn't run)."""
    dest = key.lower()
    return key in vllm_option_names() and dest not in OWNED_ARGUMENTS and dest not in SERVER_ONLY_ARGUMENTS


def plain(value: Any) -> Any:
    """A settings default as JSON would carry it: enums by value."""
    return value.value if isinstance(value, Enum) else value


# --- hub.json -----------------------------------------------------------------------------------


def test_hub_top_level(hub: dict[str, Any]) -> None:
    for key in ("title", "description", "type", "category", "config"):
        assert key in hub, f"hub.json lacks `{key}`"
    assert isinstance(hub["title"], str) and hub["title"].strip()
    assert isinstance(hub["description"], str) and hub["description"].strip()
    assert hub["type"] == "serverless"
    assert hub["category"] in CATEGORIES


def test_hub_config(hub: dict[str, Any]) -> None:
    config = hub["config"]
    assert config["runsOn"] in {"GPU", "CPU"}
    assert isinstance(config["containerDiskInGb"], int) and not isinstance(config["containerDiskInGb"], bool)
    assert config["containerDiskInGb"] > 0
    if config["runsOn"] == "GPU":
        assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
        assert isinstance(config["gpuIds"], str)
        assert all(gpu.strip() for gpu in config["gpuIds"].split(","))
    cuda = config.get("allowedCudaVersions")
    if cuda is not None:
        assert cuda and all(isinstance(v, str) and v.replace(".", "").isdigit() for v in cuda)
    assert isinstance(config["env"], list) and config["env"]


def test_hub_env_entry_shapes(hub: dict[str, Any]) -> None:
    keys = [entry.get("key") for entry in hub["config"]["env"]]
    assert len(keys) == len(set(keys)), "an env key is listed twice"
    for entry in hub["config"]["env"]:
        key = entry.get("key")
        assert isinstance(key, str) and key, entry
        if "value" in entry:
            assert set(entry) == {"key", "value"}, f"{key}: a static entry is {{key, value}}"
            continue
        assert set(entry) == {"key", "input"}, f"{key}: an entry is {{key, value}} or {{key, input}}"
        inp = entry["input"]
        assert isinstance(inp.get("name"), str) and inp["name"], key
        assert inp.get("type") in INPUT_TYPES, f"{key}: type {inp.get('type')!r}"
        assert isinstance(inp.get("description"), str) and inp["description"], key
        assert set(inp) <= {"name", "type", "description", "default", "options", "advanced", "required"}, key
        for flag in ("advanced", "required"):
            assert isinstance(inp.get(flag, False), bool), f"{key}: {flag}"
        for option in inp.get("options", []):
            assert set(option) == {"label", "value"}, f"{key}: option {option}"
        if "default" in inp:
            default = inp["default"]
            if inp["type"] == "boolean":
                assert isinstance(default, bool), key
            elif inp["type"] == "number":
                assert isinstance(default, (int, float)) and not isinstance(default, bool), key
            else:
                assert isinstance(default, str), key
            if "options" in inp:
                assert default in [o["value"] for o in inp["options"]], f"{key}: default is not an option"


def test_hub_env_keys_are_read_by_the_app(hub: dict[str, Any]) -> None:
    """Every variable the Hub offers is a setting or a forwarded vLLM option: none is ignored."""
    ignored = [
        entry["key"]
        for entry in hub["config"]["env"]
        if entry["key"] not in SETTINGS_FIELDS and not forwarded_to_vllm(entry["key"])
    ]
    assert not ignored, f"the app would ignore: {ignored}"


def test_hub_defaults_equal_the_settings_defaults(env_inputs: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for key, inp in env_inputs.items():
        if key not in SETTINGS_FIELDS:
            continue
        default = plain(Settings.model_fields[key].default)
        if default is None:
            assert "default" not in inp, f"{key}: the setting has no default, the Hub gives {inp['default']!r}"
            continue
        assert "default" in inp, f"{key}: the Hub omits the setting's default {default!r}"
        given = inp["default"]
        if isinstance(default, bool):
            assert isinstance(given, bool) and given is default, key
        elif isinstance(default, (int, float)):
            assert isinstance(given, (int, float)) and not isinstance(given, bool) and given == default, key
        else:
            assert given == default, key
        checked += 1
    assert checked, "no Settings default was compared"


def test_hub_options_and_defaults_validate(env_inputs: dict[str, dict[str, Any]]) -> None:
    """Each option and default of a setting is a value the settings model accepts."""
    for key, inp in env_inputs.items():
        if key not in SETTINGS_FIELDS:
            continue
        for value in [o["value"] for o in inp.get("options", [])] + ([inp["default"]] if "default" in inp else []):
            Settings(**{key: value})


def test_hub_quantization_options_are_vllms(env_inputs: dict[str, dict[str, Any]]) -> None:
    options = env_inputs["QUANTIZATION"]["options"]
    assert [o["value"] for o in options] == list(QUANTIZATION_METHODS)


def test_hub_model_name_is_required(env_inputs: dict[str, dict[str, Any]]) -> None:
    model = env_inputs["MODEL_NAME"]
    assert model["type"] == "huggingface"
    assert model.get("required") is True


def test_hub_advanced_inputs(env_inputs: dict[str, dict[str, Any]]) -> None:
    for key, inp in env_inputs.items():
        assert inp.get("advanced", False) is (key not in BASIC_KEYS), f"{key}: advanced"


def test_hub_presets_set_offered_variables(hub: dict[str, Any], env_inputs: dict[str, dict[str, Any]]) -> None:
    for preset in hub["config"].get("presets", []):
        assert isinstance(preset["name"], str) and preset["name"]
        assert preset["defaults"] and set(preset["defaults"]) <= set(env_inputs), preset["name"]


# --- tests.json ---------------------------------------------------------------------------------


def test_tests_file_shape(hub: dict[str, Any], hub_tests: dict[str, Any]) -> None:
    tests = hub_tests["tests"]
    assert isinstance(tests, list) and tests
    names = [test.get("name") for test in tests]
    assert len(names) == len(set(names)), "a test name is used twice"
    for test in tests:
        assert isinstance(test.get("name"), str) and test["name"], test
        assert isinstance(test.get("input"), dict), test["name"]
        timeout = test.get("timeout")
        if timeout is not None:
            assert isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0, test["name"]
    config = hub_tests["config"]
    assert isinstance(config["gpuTypeId"], str) and config["gpuTypeId"]
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    assert config["allowedCudaVersions"] == hub["config"]["allowedCudaVersions"]
    for entry in config["env"]:
        assert set(entry) == {"key", "value"} and isinstance(entry["value"], str), entry
        assert entry["key"] in SETTINGS_FIELDS or forwarded_to_vllm(entry["key"]), entry["key"]


def test_tests_jobs_pass_the_job_normalization(hub_tests: dict[str, Any]) -> None:
    for test in hub_tests["tests"]:
        job = normalize_job(
            test["input"],
            served_model="m",
            defaults=BatchPolicy(50, 1, 3),
            chat_fields=CHAT_FIELDS,
            completion_fields=COMPLETION_FIELDS,
        )
        assert job.route.startswith("/"), test["name"]


def test_tests_openai_jobs_name_the_served_model(hub_tests: dict[str, Any]) -> None:
    """An OpenAI job's `model` is the name the test endpoint serves, or it would answer 404."""
    env = {entry["key"]: entry["value"] for entry in hub_tests["config"]["env"]}
    served = Settings(**env).served_model_name
    for test in hub_tests["tests"]:
        body = test["input"].get("openai_input")
        if isinstance(body, dict) and "model" in body:
            assert body["model"] == served, test["name"]
