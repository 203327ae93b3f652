"""The ingress's request limits as pure functions: each violation is a 400 naming its field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.ingress.errors import ClientError, error_body
from deployments.ingress.limits import RequestLimits, check_request, parse_body, sequences_asked

LIMITS = RequestLimits(max_body_bytes=1 << 20, max_n=8, max_messages=4, max_model_len=512, max_sequences=16)


def rejection(payload: dict[str, Any], route: str = "/v1/completions") -> ClientError:
    with pytest.raises(ClientError) as info:
        check_request(payload, LIMITS, route=route)
    return info.value


@pytest.mark.parametrize("body", [b"[" * 2000 + b"]" * 2000, b'{"a": ' * 5000 + b"1" + b"}" * 5000,
                                  b"[" * 100_000])
def test_deeply_nested_json_is_a_400_naming_the_body(body: bytes):
    with pytest.raises(ClientError) as info:
        parse_body(body)
    status, envelope = error_body(info.value)
    assert status == 400 and envelope["error"]["param"] == "body"
    assert "deeply" in envelope["error"]["message"] or "JSON" in envelope["error"]["message"]


@pytest.mark.parametrize(("payload", "route", "expected"), [
    ({"prompt": "x"}, "/v1/completions", (1, "n")),
    ({"prompt": [1, 2, 3]}, "/v1/completions", (1, "n")),  # one prompt's token ids
    ({"prompt": ["a", "b", "c"], "n": 2}, "/v1/completions", (6, "prompt")),
    ({"prompt": [[1], [2]], "n": 3, "best_of": 4}, "/v1/completions", (8, "prompt")),
    ({"messages": [{"role": "user", "content": "x"}], "n": 5}, "/v1/chat/completions", (5, "n")),
    ({"input": ["a"] * 7}, "/v1/embeddings", (7, "input")),
    ({"input": [{"role": "user", "content": "x"}] * 3}, "/v1/responses", (1, "n")),  # a conversation
    ({"query": "q", "documents": ["a", "b", "c"]}, "/rerank", (3, "documents")),
    ({"queries": ["q"], "documents": ["a", "b"]}, "/score", (2, "documents")),
    ({"prompt": "x", "n": True}, "/v1/completions", (1, "n")),  # not a number: vLLM rejects it
])
def test_sequences_asked(payload: dict[str, Any], route: str, expected: tuple[int, str]):
    assert sequences_asked(payload, route) == expected


@pytest.mark.parametrize(("payload", "route", "param"), [
    ({"prompt": ["a"] * 17}, "/v1/completions", "prompt"),
    ({"prompt": ["a"] * 3, "n": 6}, "/v1/completions", "prompt"),
    ({"input": ["text"] * 20}, "/v1/embeddings", "input"),
    ({"query": "q", "documents": ["d"] * 17}, "/rerank", "documents"),
])
def test_fan_out_past_the_cap_is_a_400_naming_the_field(payload: dict[str, Any], route: str, param: str):
    error = rejection(payload, route)
    assert error.param == param and "MAX_SEQUENCES_PER_REQUEST" in str(error)


def test_fan_out_at_the_cap_passes():
    check_request({"prompt": ["a"] * 2, "n": 8}, LIMITS, route="/v1/completions")
    check_request({"input": ["a"] * 16}, LIMITS, route="/v1/embeddings")


@pytest.mark.parametrize(("payload", "param"), [
    ({"n": 9}, "n"),
    ({"max_tokens": 513}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}] * 5}, "messages"),
    ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
    ({"best_of": 3}, "best_of"),
])
def test_each_limit_names_its_field(payload: dict[str, Any], param: str):
    assert rejection(payload, "/v1/chat/completions").param == param


@pytest.mark.parametrize("payload", [{"n": 0}, {"n": -2}, {"n": "two"}, {"max_tokens": "many"}, {"max_tokens": True},
                                     {"messages": [{"content": "no role"}]}, {"messages": [{"role": 7}]}])
def test_what_vllm_refuses_itself_is_left_to_it(payload: dict[str, Any]):
    """vLLM's answer (its status, type and param) is what `vllm serve`'s clients know."""
    check_request(payload, LIMITS, route="/v1/chat/completions")


def test_a_malformed_body_gets_vllms_type_and_location():
    for body, param in ((b"{not json", "body.1"), (b"", "body"), (b"[]", "body"), (b"null", "body")):
        with pytest.raises(ClientError) as info:
            parse_body(body)
        status, envelope = error_body(info.value)
        assert (status, envelope["error"]["type"], envelope["error"]["param"]) == (400, "Bad Request", param)


def test_a_body_that_is_not_an_object_is_a_400():
    for body in (b"[]", b"null", b"3", json.dumps("x").encode()):
        with pytest.raises(ClientError) as info:
            parse_body(body)
        assert info.value.param == "body"
