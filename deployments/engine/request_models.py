"""vLLM's request models, read in the engine replica (which has vLLM imported anyway) and handed to
the ingress as plain data: the fields its request checks need and the JSON schemas its OpenAPI
document declares. The ingress never imports vLLM: that import costs ~4.5 s of CPU and ~480 MB in
each ingress replica, and on a small box it was taken from the engine replica starting beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestFields:
    chat: frozenset[str]  # fields vLLM's chat request accepts
    completion: frozenset[str]  # fields vLLM's completion request accepts
    objects: dict[str, frozenset[str]]  # per route: fields typed as objects


@dataclass(frozen=True)
class RequestSchemas:
    """vLLM's request models as JSON schema, for the ingress's OpenAPI document."""

    names: dict[str, str]  # per route: the schema name of its request model
    components: dict[str, Any]  # schema name -> JSON schema (the models and what they refer to)


def vllm_request_models() -> dict[str, tuple[str, Any]]:
    """vLLM's request model (or union of models) for each route the ingress forwards a body on, with
    its schema name: the one table behind the request checks and the OpenAPI schema."""
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.classify.protocol import ClassificationRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.pooling.protocol import PoolingRequest
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest

    return {
        "/v1/chat/completions": ("ChatCompletionRequest", ChatCompletionRequest),
        "/v1/completions": ("CompletionRequest", CompletionRequest),
        "/v1/responses": ("ResponsesRequest", ResponsesRequest),
        "/v1/embeddings": ("EmbeddingRequest", EmbeddingRequest),  # a union: texts or messages
        "/score": ("ScoreRequest", ScoreRequest),  # a union: text_1/text_2, queries/documents...
        "/rerank": ("RerankRequest", RerankRequest),
        "/classify": ("ClassificationRequest", ClassificationRequest),  # a union: texts or messages
        "/pooling": ("PoolingRequest", PoolingRequest),
        "/v1/messages": ("AnthropicMessagesRequest", AnthropicMessagesRequest),
        "/v1/messages/count_tokens": ("AnthropicCountTokensRequest", AnthropicCountTokensRequest),
        "/tokenize": ("TokenizeRequest", TokenizeRequest),  # a union: a prompt or messages
        "/detokenize": ("DetokenizeRequest", DetokenizeRequest),
    }


def object_fields(model: Any) -> frozenset[str]:
    """Fields a pydantic request model types as an object (a nested model or a dict, maybe optional).
    For a union of request models (vLLM's EmbeddingRequest), the fields every member that has them
    types as an object."""
    import dataclasses
    import types
    import typing

    from pydantic import BaseModel

    if typing.get_origin(model) is typing.Annotated:
        model = typing.get_args(model)[0]
    if typing.get_origin(model) in (typing.Union, types.UnionType):
        members = typing.get_args(model)
        found = {name for member in members for name in object_fields(member)}
        return frozenset(name for name in found
                         if all(name in object_fields(m) for m in members if name in m.model_fields))

    def is_object(annotation: Any) -> bool:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            return bool(args) and all(is_object(a) for a in args)
        if origin is typing.Annotated:
            return is_object(typing.get_args(annotation)[0])
        if origin is dict or annotation is dict:
            return True
        if not isinstance(annotation, type):
            return False
        return issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)

    return frozenset(name for name, field in model.model_fields.items() if is_object(field.annotation))


def load_request_fields() -> RequestFields:
    """From vLLM's request models (native sampling_params are checked against the chat and
    completion fields, since vLLM's request models ignore unknown fields)."""
    models = {route: model for route, (_, model) in vllm_request_models().items()}
    return RequestFields(
        chat=frozenset(models["/v1/chat/completions"].model_fields),
        completion=frozenset(models["/v1/completions"].model_fields),
        objects={route: object_fields(model) for route, model in models.items()},
    )


def load_request_schemas() -> RequestSchemas:
    from pydantic import TypeAdapter

    names: dict[str, str] = {}
    components: dict[str, Any] = {}
    for route, (name, model) in vllm_request_models().items():
        schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[name] = schema
        names[route] = name
    return RequestSchemas(names, components)
