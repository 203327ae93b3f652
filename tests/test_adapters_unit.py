"""Runtime LoRA's pure parts: the settings' flags, the checks of a load or unload body, and the one
answer the caller gets from every replica's (deployments.adapters). The fan-out itself is proven on
two real replicas in tests/test_guarded.py."""

from __future__ import annotations

import json

import pytest

from configs.engine_args import vllm_cli_args
from configs.loader import load_settings
from configs.settings import Accelerator
from deployments.adapters.fanout import REQUIRED_FIELDS, adapter_body, refused
from deployments.adapters.outcome import AdapterOutcome, merged_load, merged_unload
from deployments.ingress.errors import MalformedBody, error_body

OK = AdapterOutcome(200, "Success: LoRA adapter 'a' added successfully.")
MISSING = AdapterOutcome(404, "No adapter found for a at /x", "NotFoundError")
REFUSED = AdapterOutcome(400, "bad rank", "BadRequestError", "lora_path")


def test_runtime_lora_turns_on_enable_lora_once_and_is_off_by_default():
    assert "--enable-lora" not in vllm_cli_args(load_settings({}), Accelerator.CPU, "m")
    on = vllm_cli_args(load_settings({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}), Accelerator.CPU, "m")
    assert on.count("--enable-lora") == 1
    both = load_settings({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
                          "LORA_MODULES": json.dumps([{"name": "sql", "path": "/a"}])})
    args = vllm_cli_args(both, Accelerator.CPU, "m")
    assert args.count("--enable-lora") == 1 and "--lora-modules" in args
    assert both.static_adapter_names == {"sql"}


def test_a_body_must_be_an_object_naming_its_fields():
    assert adapter_body(b'{"lora_name": "a", "lora_path": "/p", "load_inplace": true}', REQUIRED_FIELDS["load"])
    for body, param in ((b"[1]", "body"), (b"nope", "body"), (b"", "body"), (b'{"lora_name": "a"}', "lora_path"),
                        (b'{"lora_name": "", "lora_path": "/p"}', "lora_name"),
                        (b'{"lora_name": 3, "lora_path": "/p"}', "lora_name")):
        with pytest.raises(MalformedBody) as caught:
            adapter_body(body, REQUIRED_FIELDS["load"])
        status, envelope = error_body(caught.value)
        assert status == 400 and envelope["error"]["param"] == param
    assert adapter_body(b'{"lora_name": "a"}', REQUIRED_FIELDS["unload"]) == {"lora_name": "a"}


def test_the_base_model_and_start_up_adapters_are_refused_others_pass():
    assert refused("base", "base", frozenset(), "load").param == "lora_name"
    assert "LORA_MODULES" in refused("sql", "base", frozenset({"sql"}), "unload").message
    assert refused("other", "base", frozenset({"sql"}), "load") is None


def test_a_load_succeeds_only_on_every_replica_and_says_where_it_failed():
    assert merged_load([OK, OK]) == OK
    assert merged_load([MISSING]) == MISSING
    partial = merged_load([OK, REFUSED])
    assert partial.status == 400 and partial.param == "lora_path" and "failed on 1 of 2" in partial.message
    died = merged_load([OK, RuntimeError("actor died")])
    assert died.status == 503 and "actor died" in died.message
    assert merged_load([]).status == 503


def test_an_unload_succeeds_where_some_replica_had_it_and_none_failed_otherwise():
    assert merged_unload([OK, MISSING]) == OK
    assert merged_unload([MISSING, MISSING]) == MISSING
    assert merged_unload([OK, REFUSED]) == REFUSED
    assert merged_unload([OK, RuntimeError("gone")]).status == 503
    assert merged_unload([]).status == 503
