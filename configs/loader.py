"""Reads the settings once: environment variables, then the Serve config's `args` (args win).

The only module of the project that reads `os.environ`. Anything that names a vLLM engine (or
request-semantics frontend) argument, upper-cased, is forwarded to vLLM with vLLM's own parser
types; a value that does not parse stops start-up with a message naming the variable.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from configs.settings import LEGACY_NAMES, Settings


class SettingsError(ValueError):
    """Start-up stops: one or more settings are wrong. The message names each variable."""


@dataclass(frozen=True)
class VllmOption:
    """One option of vLLM's `vllm serve` parser, as much as forwarding needs."""

    dest: str
    flag: str
    negative_flag: str | None  # --no-x for boolean options
    is_flag: bool  # takes no value
    type: Any
    choices: tuple[Any, ...] | None
    many: bool  # nargs + or *


# vLLM arguments the product owns: setting them directly is an error naming the right variable.
OWNED_ARGUMENTS: dict[str, str] = {
    "model": "MODEL_NAME",
    "model_tag": "MODEL_NAME",
    "served_model_name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "chat_template": "CUSTOM_CHAT_TEMPLATE",
    "distributed_executor_backend": "ACCELERATOR (the executor follows the platform: ray on GPU, mp on CPU)",
    "data_parallel_size": "NUM_REPLICAS (each replica is one engine)",
    "data_parallel_size_local": "NUM_REPLICAS (each replica is one engine)",
    "data_parallel_rank": "NUM_REPLICAS (each replica is one engine)",
    "data_parallel_backend": "NUM_REPLICAS (each replica is one engine)",
    "tp": "TENSOR_PARALLEL_SIZE",
    "pp": "PIPELINE_PARALLEL_SIZE",
}

# Options of vLLM's HTTP server itself (Serve's proxy and our router replace it). Common names such
# as HOST or PORT are set in many containers, so the environment's copies are not ours to read;
# naming one in the Serve config's args is an error.
SERVER_ONLY_ARGUMENTS: dict[str, str] = {
    "host": "SERVE_HOST",
    "port": "SERVE_PORT",
    "api_key": "API_KEY",
    "uds": "",
    "uvicorn_log_level": "",
    "disable_uvicorn_access_log": "",
    "disable_access_log_for_endpoints": "",
    "allow_credentials": "",
    "allowed_origins": "",
    "allowed_methods": "",
    "allowed_headers": "",
    "ssl_keyfile": "",
    "ssl_certfile": "",
    "ssl_ca_certs": "",
    "enable_ssl_refresh": "",
    "ssl_cert_reqs": "",
    "ssl_ciphers": "",
    "root_path": "",
    "middleware": "",
    "headless": "",
    "api_server_count": "",
    "config": "",
    "grpc": "",
    "grpc_port": "",
    "data_parallel_supervisor_port": "",
    "dp_supervisor_probe_interval_s": "",
    "dp_supervisor_probe_timeout_s": "",
    "dp_supervisor_probe_failure_threshold": "",
    "enable_request_id_headers": "",
    "disable_fastapi_docs": "",
    "enable_offline_docs": "",
    "help": "",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@lru_cache(maxsize=1)
def vllm_options() -> dict[str, VllmOption]:
    """vLLM's own `vllm serve` parser, keyed by the environment variable name of each option."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return options_from_parser(parser)


def options_from_parser(parser: argparse.ArgumentParser) -> dict[str, VllmOption]:
    table: dict[str, VllmOption] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in (argparse.SUPPRESS, "help"):
            continue
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        positive = [s for s in long_flags if not s.startswith("--no-")]
        negative = [s for s in long_flags if s.startswith("--no-")]
        if not positive:
            continue
        table[action.dest.upper()] = VllmOption(
            dest=action.dest,
            flag=positive[0],
            negative_flag=negative[0] if negative else None,
            is_flag=action.nargs == 0,
            type=action.type,
            choices=tuple(action.choices) if action.choices else None,
            many=action.nargs in ("+", "*"),
        )
    return table


def parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r}: expected a boolean (true or false)")


def _describe_type(kind: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string"}
    if kind in names:
        return names[kind]
    name = getattr(kind, "__name__", "")
    if "int" in name:
        return "an integer (e.g. 4096 or 4k)"
    if "dataclass" in name or "json" in name.lower():
        return "a JSON object"
    return "a value vLLM accepts"


def _as_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def option_tokens(name: str, raw: Any, option: VllmOption) -> list[str]:
    """CLI tokens for one forwarded setting, checked with the option's own type and choices."""
    if option.is_flag:
        if parse_bool(name, raw):
            return [option.flag]
        return [option.negative_flag] if option.negative_flag else []
    values = [_as_text(v) for v in raw] if isinstance(raw, (list, tuple)) else [_as_text(raw)]
    if option.many and len(values) == 1:
        values = values[0].split()
    for value in values:
        if option.type is not None:
            try:
                option.type(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise SettingsError(
                    f"{name}={value!r}: expected {_describe_type(option.type)} for vLLM's {option.flag} ({exc})"
                ) from None
        if option.choices and value not in {str(c) for c in option.choices}:
            allowed = ", ".join(str(c) for c in option.choices)
            raise SettingsError(f"{name}={value!r}: expected one of {allowed}")
    return [option.flag, *values]


def _engine_overrides(
    env: Mapping[str, str], args: Mapping[str, Any], options: Mapping[str, VllmOption]
) -> tuple[list[str], list[str]]:
    """CLI tokens for every variable that names a vLLM argument, and the errors found."""
    tokens: list[str] = []
    errors: list[str] = []
    sources = [(name, value, False) for name, value in env.items()]
    sources += [(name, value, True) for name, value in args.items()]
    for name, value, from_args in sources:
        # An empty value means "unset", as for our own settings (a misnamed args key still errs).
        empty = isinstance(value, str) and value.strip() == ""
        if empty and not from_args:
            continue
        option = options.get(name)
        owner = OWNED_ARGUMENTS.get(name.lower())
        if owner:
            errors.append(f"{name} is set by the product: use {owner}")
            continue
        if option is None:
            if from_args:
                errors.append(f"{name}: unknown setting (neither ours nor a vLLM engine argument)")
            continue
        if option.dest in SERVER_ONLY_ARGUMENTS:
            if from_args:
                instead = SERVER_ONLY_ARGUMENTS[option.dest]
                errors.append(
                    f"{name} is an option of vLLM's own HTTP server, which this app doesn't run"
                    + (f": use {instead}" if instead else "")
                )
            continue
        if empty:
            continue
        try:
            tokens += option_tokens(name, value, option)
        except SettingsError as exc:
            errors.append(str(exc))
    return tokens, errors


def _format_validation_error(exc: ValidationError, raw: Mapping[str, Any]) -> list[str]:
    messages = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        if name in raw:
            messages.append(f"{name}={raw[name]!r}: {err['msg']}")
        else:
            messages.append(f"{name}: {err['msg']}".replace("Value error, ", ""))
    return messages


def load_settings(
    environ: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    forward_engine_args: bool = True,
) -> Settings:
    """Settings from the environment and the Serve config's args (args win).

    `forward_engine_args=False` skips vLLM's parser (for processes that never build an engine,
    such as the RunPod handler); forwarded variables are then left for the app builder to check.
    """
    env = dict(os.environ if environ is None else environ)
    args_upper = {str(k).upper(): v for k, v in (args or {}).items()}
    fields = set(Settings.model_fields) - {"engine_cli_overrides"}

    def known(source: Mapping[str, Any]) -> dict[str, Any]:
        # An empty variable means "unset" (RunPod's UI leaves fields empty).
        source = {k: v for k, v in source.items() if not (isinstance(v, str) and v.strip() == "")}
        values = {k: v for k, v in source.items() if k in fields}
        for legacy, name in LEGACY_NAMES.items():
            if legacy in source and name not in source:
                values[name] = source[legacy]
        return values

    raw = {**known(env), **known(args_upper)}
    errors: list[str] = []
    tokens: list[str] = []
    if forward_engine_args:
        other_env = {k: v for k, v in env.items() if k not in fields and k not in LEGACY_NAMES}
        other_args = {k: v for k, v in args_upper.items() if k not in fields and k not in LEGACY_NAMES}
        tokens, errors = _engine_overrides(other_env, other_args, vllm_options())
    try:
        settings = Settings(**raw, engine_cli_overrides=tuple(tokens))
    except ValidationError as exc:
        errors = _format_validation_error(exc, raw) + errors
        settings = None
    if errors:
        raise SettingsError("Invalid settings:\n  " + "\n  ".join(errors))
    assert settings is not None
    return settings
