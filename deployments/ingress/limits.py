"""Request limits the ingress enforces before a request reaches an engine: body size, `n`,
`messages` (and a Responses `input` list), `max_tokens` against the context. Each violation is a
400 naming the field. Pure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from deployments.ingress.errors import ClientError, MalformedBody

ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int
    max_n: int
    max_messages: int
    max_model_len: int | None
    max_sequences: int = 1024


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object; MalformedBody (vLLM's answer: status, type, FastAPI's location
    as param) if it is none."""
    if not body.strip():
        raise MalformedBody("the request body is empty; send a JSON object", "body")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise MalformedBody("the request body is not UTF-8", "body") from None
    except json.JSONDecodeError as exc:
        raise MalformedBody(f"the request body is not valid JSON: {exc}", f"body.{exc.pos}") from None
    except ValueError as exc:
        raise MalformedBody(f"the request body is not valid JSON: {exc}", "body") from None
    except RecursionError:
        # `[[[[...` a few thousand deep: the parser's own depth limit, a client's mistake (not a 500).
        raise ClientError("the request body nests JSON too deeply", "body") from None
    if not isinstance(payload, dict):
        raise MalformedBody("the request body must be a JSON object", "body")
    return payload


def _int_field(payload: dict[str, Any], name: str) -> int | None:
    """The field when it is an integer. Anything else is vLLM's to refuse (or to coerce, as its
    request models do), so the client gets `vllm serve`'s answer."""
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


# Routes whose `input` is a conversation (limited like `messages`); elsewhere (embeddings) an
# `input` list is a batch of texts or one prompt's token ids.
CONVERSATION_INPUT_ROUTES = frozenset({"/v1/responses"})


# Fields that carry a batch of inputs, each generating (or pooled) on its own: a list of prompts,
# of texts to embed, of queries and documents to score (pairs are 1:N or N:N, so the longer list).
BATCH_FIELDS = ("prompt", "input", "queries", "documents", "items", "text_1", "text_2", "data_1", "data_2")


def _batch_size(value: Any) -> int:
    """How many inputs a batch field holds: a string or one prompt's token ids is one."""
    if isinstance(value, list) and value and not all(isinstance(item, int) for item in value):
        return len(value)
    return 1


def sequences_asked(payload: dict[str, Any], route: str) -> tuple[int, str]:
    """One request's fan-out, inputs x n x best_of, and the field that multiplies it most."""
    inputs, param = 1, "n"
    for name in BATCH_FIELDS:
        if name == "input" and route in CONVERSATION_INPUT_ROUTES:
            continue  # a conversation, one input
        size = _batch_size(payload.get(name))
        if size > inputs:
            inputs, param = size, name
    per_input = 1
    for name in ("n", "best_of"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > per_input:
            per_input = value
    return inputs * per_input, param


def check_request(payload: dict[str, Any], limits: RequestLimits, object_fields: frozenset[str] = frozenset(),
                  route: str = "") -> None:
    """Limits on a chat, completion or responses request body (vLLM's own validation runs after these).
    `object_fields` are fields the request model types as objects: some of vLLM 0.32's validators
    crash (a 500) on a list there instead of rejecting it."""
    for name in object_fields:
        value = payload.get(name)
        if value is not None and not isinstance(value, dict):
            raise ClientError(f"`{name}` must be an object, got {type(value).__name__}", name)
    n = _int_field(payload, "n")
    if n is not None and n > limits.max_n:  # below 1, vLLM refuses it itself
        raise ClientError(f"`n` must be at most {limits.max_n} (MAX_N), got {n}", "n")
    best_of = payload.get("best_of")
    if best_of is not None and best_of != (n or 1):
        # An OpenAI field vLLM 0.32's server no longer has (it would ignore it silently).
        raise ClientError(
            "`best_of` is not supported on this route by vLLM 0.32; RunPod native jobs support it", "best_of"
        )
    sequences, param = sequences_asked(payload, route)
    if sequences > limits.max_sequences:
        raise ClientError(
            f"the request asks for {sequences} sequences (inputs x n x best_of); at most {limits.max_sequences} "
            "(MAX_SEQUENCES_PER_REQUEST)", param,
        )
    messages = payload.get("messages")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise ClientError(
                f"`messages` has {len(messages)} entries; at most {limits.max_messages} (MAX_MESSAGES)", "messages"
            )
        for i, message in enumerate(messages):
            # Which roles exist is the chat template's business (vLLM passes custom roles to it, as
            # `vllm serve` does); a string role that is not a name at all is refused here. A missing
            # or non-string role is vLLM's to refuse, with its own answer.
            role = message.get("role") if isinstance(message, dict) else None
            if isinstance(role, str) and not ROLE_NAME.fullmatch(role):
                raise ClientError(f"`messages[{i}].role` must be a role name, got {role!r}", f"messages[{i}].role")
    items = payload.get("input") if route in CONVERSATION_INPUT_ROUTES else None
    if isinstance(items, list) and len(items) > limits.max_messages:
        raise ClientError(f"`input` has {len(items)} items; at most {limits.max_messages} (MAX_MESSAGES)", "input")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = _int_field(payload, name)
        if value is None:
            continue
        if value < 1:
            raise ClientError(f"`{name}` must be >= 1, got {value}", name)
        if limits.max_model_len is not None and value > limits.max_model_len:
            raise ClientError(
                f"`{name}` ({value}) exceeds the model's context length ({limits.max_model_len})", name
            )


def check_size(length: int, limits: RequestLimits) -> None:
    if length > limits.max_body_bytes:
        raise ClientError(
            f"the request body exceeds {limits.max_body_bytes} bytes (MAX_REQUEST_BYTES)", "body"
        )
