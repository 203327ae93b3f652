"""Anthropic's Messages API (as `vllm serve` has it) against the real Serve app and vLLM engine on
CPU, with Anthropic's official client: answers, streams, token counts, and every failure in
Anthropic's error envelope (the router's own and the engine's)."""

from __future__ import annotations

import json
import uuid

import anthropic
import pytest

MESSAGES = [{"role": "user", "content": "the capital of france"}]
# Anthropic's client no longer has a `temperature` argument; vLLM's Messages route still reads it.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def app(tiny_app):
    return tiny_app


def assert_anthropic_error(response, status: int, err_type: str) -> str:
    """Anthropic's envelope, exactly: {"type": "error", "error": {"type", "message"}}."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == err_type and body["error"]["message"], body
    return body["error"]["message"]


def test_a_streamed_message_is_the_answered_one_and_the_chat_answer_on_both_prefixes(app):
    # The Messages API is vLLM's chat under Anthropic's shapes: the same prompt, tokens and text.
    chat = app.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    for prefix in ("", "/openai"):
        client = app.anthropic(prefix)
        message = client.messages.create(model="tiny", messages=MESSAGES, max_tokens=12, **GREEDY)
        assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
        text = "".join(block.text for block in message.content if block.type == "text")
        assert text == chat.choices[0].message.content
        assert message.usage.input_tokens == chat.usage.prompt_tokens
        assert message.usage.output_tokens == chat.usage.completion_tokens
        assert message.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
        with client.messages.stream(model="tiny", messages=MESSAGES, max_tokens=12, **GREEDY) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == text
        assert final.stop_reason == message.stop_reason
        assert final.usage.output_tokens == message.usage.output_tokens


def test_a_system_prompt_and_a_conversation(app):
    message = app.anthropic().messages.create(
        model="tiny", system="You answer in one word.", max_tokens=4, **GREEDY,
        messages=[*MESSAGES, {"role": "assistant", "content": "paris"}, {"role": "user", "content": "and spain"}],
    )
    assert message.usage.input_tokens > 0 and message.usage.output_tokens <= 4


def test_count_tokens_counts_what_the_message_reads(app):
    client = app.anthropic()
    counted = client.messages.count_tokens(model="tiny", messages=MESSAGES)
    message = client.messages.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert counted.input_tokens == message.usage.input_tokens > 0


@pytest.mark.parametrize("body, status, err_type, mentions", [
    (b"{not json", 400, "invalid_request_error", "JSON"),  # the router's check
    (b'{"model": "tiny", "messages": [], "max_tokens": 0}', 400, "invalid_request_error", "max_tokens"),
    (b'{"model": "tiny", "messages": "hello", "max_tokens": 5}', 400, "invalid_request_error", "messages"),  # vLLM's
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "metadata": []}',
     400, "invalid_request_error", "metadata"),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}',
     404, "not_found_error", "nope"),
])
def test_bad_requests_get_anthropics_envelope(app, body, status, err_type, mentions):
    with app.http() as http:
        response = http.post("/v1/messages", content=body, headers={"content-type": "application/json"})
    assert mentions in assert_anthropic_error(response, status, err_type)


def test_the_official_client_raises_its_own_errors_and_the_service_keeps_serving(app):
    client = app.anthropic()
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", messages=MESSAGES, max_tokens=2)
    assert err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    assert "512" in err.value.body["error"]["message"]  # the context length, from the router's limit
    with app.http() as http:
        assert_anthropic_error(http.get("/v1/messages"), 405, "invalid_request_error")
    assert client.messages.create(model="tiny", messages=MESSAGES, max_tokens=2).content


def test_a_runpod_openai_route_job_streams_to_message_stop(app):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    native = app.router().options(stream=True).native
    outputs = list(native.remote({"openai_route": "/v1/messages", "openai_input": body}, uuid.uuid4().hex))
    events = [event for out in outputs for event in out.split("\n\n") if event.strip()]
    names = [event.split("\n", 1)[0].removeprefix("event: ") for event in events]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    text = "".join(json.loads(event.split("data: ", 1)[1]).get("delta", {}).get("text", "") for event in events)
    answered = app.anthropic().messages.create(model="tiny", messages=MESSAGES, max_tokens=8, **GREEDY)
    assert text == answered.content[0].text


def test_schemathesis_finds_no_server_error_on_the_messages_routes(app, tmp_path):
    """vLLM's Anthropic request models, as the schema declares them, fuzzed on both routes."""
    done = app.schemathesis(tmp_path, "--include-path-regex", "^/v1/messages(/count_tokens)?$",
                            max_examples=30, phases="examples,fuzzing", max_time=60)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Tested: 2\n" in done.stdout, done.stdout[-3000:]
    assert app.anthropic().messages.create(model="tiny", messages=MESSAGES, max_tokens=2).content
