"""RunPod worker-vllm's native jobs through the router's handle (what the RunPod worker calls),
against the real Serve app and vLLM engine on CPU."""

from __future__ import annotations

import json
import uuid

import pytest


@pytest.fixture(scope="module")
def app(tiny_app):
    return tiny_app


def run_job(app, job_input) -> list:
    native = app.router().options(stream=True).native
    return list(native.remote(job_input, uuid.uuid4().hex))


def token_counts(batches, choice=0) -> list[int]:
    return [len(b["choices"][choice]["tokens"]) for b in batches]


def test_stream_batches_grow_1_3_9_27_50(app, tiny_tokenizer):
    batches = run_job(app, {
        "prompt": "the quick brown fox",
        "sampling_params": {"max_tokens": 100, "ignore_eos": True, "temperature": 0},
        "stream": True,
    })
    assert token_counts(batches) == [1, 3, 9, 27, 50, 10]
    prompt_tokens = len(tiny_tokenizer("the quick brown fox")["input_ids"])
    assert batches[-1]["usage"] == {"input": prompt_tokens, "output": 100}
    outputs = [b["usage"]["output"] for b in batches]
    assert outputs == sorted(outputs) and outputs[0] >= 1


def test_per_request_batch_sizes_override_the_defaults(app):
    batches = run_job(app, {
        "prompt": "fox",
        "sampling_params": {"max_tokens": 12, "ignore_eos": True},
        "stream": True, "max_batch_size": 4, "min_batch_size": 2, "batch_size_growth_factor": 1.5,
    })
    assert token_counts(batches) == [2, 3, 4, 3]


def test_max_tokens_defaults_to_the_seeds_16(app):
    [batch] = run_job(app, {"prompt": "fox", "sampling_params": {"ignore_eos": True}})
    assert batch["usage"]["output"] == 16


def test_unknown_top_level_keys_are_ignored(app):
    """As worker-vllm does: the job runs (the router's log names the key)."""
    [batch] = run_job(app, {"prompt": "fox", "surprise": 1, "sampling_params": {"max_tokens": 3, "ignore_eos": True}})
    assert batch["usage"]["output"] == 3


def test_non_streaming_text_equals_the_http_completion(app):
    [batch] = run_job(app, {"prompt": "the lazy dog", "sampling_params": {"max_tokens": 20, "temperature": 0}})
    http = app.client().completions.create(model="tiny", prompt="the lazy dog", max_tokens=20, temperature=0)
    assert batch["choices"] == [{"tokens": [http.choices[0].text]}]
    assert batch["usage"] == {"input": http.usage.prompt_tokens, "output": http.usage.completion_tokens}


def test_messages_and_apply_chat_template_use_the_chat_template(app):
    messages = [{"role": "user", "content": "robots write stories"}]
    http = app.client().chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    [from_messages] = run_job(app, {"messages": messages, "sampling_params": {"max_tokens": 16, "temperature": 0}})
    [from_prompt] = run_job(app, {
        "prompt": "robots write stories", "apply_chat_template": True,
        "sampling_params": {"max_tokens": 16, "temperature": 0},
    })
    assert from_messages["choices"][0]["tokens"] == [http.choices[0].message.content]
    assert from_prompt == from_messages


def test_stream_tokens_join_to_the_non_streaming_text(app):
    params = {"max_tokens": 30, "temperature": 0, "ignore_eos": True}
    [whole] = run_job(app, {"prompt": "paris", "sampling_params": params})
    batches = run_job(app, {"prompt": "paris", "sampling_params": params, "stream": True})
    joined = "".join(t for b in batches for t in b["choices"][0]["tokens"])
    assert joined == whole["choices"][0]["tokens"][0]


def test_n_gives_one_choice_each(app):
    batches = run_job(app, {"prompt": "fox", "sampling_params": {"n": 2, "max_tokens": 5, "ignore_eos": True},
                            "stream": True})
    assert all(len(b["choices"]) == 2 for b in batches)
    assert sum(token_counts(batches, 0)) == 5 and sum(token_counts(batches, 1)) == 5
    assert batches[-1]["usage"]["output"] == 10


def test_best_of_returns_n_of_the_candidates(app):
    [batch] = run_job(app, {"prompt": "fox", "sampling_params": {
        "n": 1, "best_of": 3, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "seed": 1}})
    assert len(batch["choices"]) == 1
    assert batch["usage"]["output"] == 24  # every candidate was generated
    streamed = run_job(app, {"prompt": "fox", "stream": True, "sampling_params": {
        "n": 1, "best_of": 3, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "seed": 1}})
    assert sum(token_counts(streamed)) == 8


def test_beam_search_runs(app):
    [batch] = run_job(app, {"prompt": "fox", "sampling_params": {
        "use_beam_search": True, "n": 2, "length_penalty": 0.5, "early_stopping": False, "max_tokens": 6}})
    assert len(batch["choices"]) == 2
    assert all(c["tokens"][0] for c in batch["choices"])


@pytest.mark.parametrize("job_input, field", [
    ({"sampling_params": {"max_tokens": 4}}, "prompt"),
    ({"prompt": "x", "sampling_params": {"bogus_param": 1}}, "bogus_param"),
    ({"prompt": "x", "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"prompt": "x", "sampling_params": {"n": 2, "best_of": 1}}, "best_of"),
    ({"prompt": "x", "sampling_params": {"use_beam_search": True, "early_stopping": True}}, "early_stopping"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"route": "/v1/models", "method": "POST", "body": {"x": 1}}, "method"),
    ({"openai_route": "/v2/score", "openai_input": {}}, "openai_route"),
    ({"openai_route": "/v1/chat/completions"}, "openai_input"),
    ("just a string", "input"),
])
def test_invalid_inputs_name_the_field(app, job_input, field):
    outputs = run_job(app, job_input)
    assert len(outputs) == 1 and set(outputs[0]) == {"error"}, outputs
    assert field in outputs[0]["error"]


def test_openai_route_models_and_non_streaming_chat(app):
    [models] = run_job(app, {"openai_route": "/v1/models"})
    assert [m["id"] for m in models["data"]] == ["tiny"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    [chat] = run_job(app, {"openai_route": "/v1/chat/completions", "openai_input": body})
    with app.http() as http:
        direct = http.post("/v1/chat/completions", json=body).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == direct["choices"][0]["message"]


def test_openai_route_stream_yields_whole_sse_events(app):
    body = {"model": "tiny", "prompt": "fox", "max_tokens": 12, "temperature": 0, "stream": True}
    outputs = run_job(app, {"openai_route": "/openai/v1/completions", "openai_input": body})
    # worker-vllm's batches (DEFAULT_BATCH_SIZE 50, min 1, growth 3): 1, 3, 9, ... events each.
    assert [out.count("data: ") for out in outputs][:3] == [1, 3, 9]
    text = ""
    for out in outputs:
        assert isinstance(out, str) and out.endswith("\n\n")
        for event in out.split("\n\n"):
            if event.strip() and event.strip() != "data: [DONE]":
                payload = json.loads(event.removeprefix("data: "))
                text += payload["choices"][0]["text"] if payload["choices"] else ""
    assert outputs[-1].rstrip().endswith("data: [DONE]")
    direct = app.client().completions.create(model="tiny", prompt="fox", max_tokens=12, temperature=0)
    assert text == direct.choices[0].text


def test_openai_route_responses_api_streams_to_its_completed_event(app):
    body = {"model": "tiny", "input": "fox", "max_output_tokens": 12, "temperature": 0}
    [whole] = run_job(app, {"openai_route": "/openai/v1/responses", "openai_input": body})
    assert whole["object"] == "response"
    outputs = run_job(app, {"openai_route": "/v1/responses", "openai_input": {**body, "stream": True}})
    events = [event for out in outputs for event in out.split("\n\n") if event.strip()]
    names = [event.split("\n", 1)[0].removeprefix("event: ") for event in events]
    assert names[0] == "response.created" and names[-1] == "response.completed", names
    text = "".join(json.loads(event.split("\ndata: ", 1)[1])["delta"]
                   for name, event in zip(names, events, strict=True) if name == "response.output_text.delta")
    whole_text = "".join(part["text"] for item in whole["output"] if item["type"] == "message"
                         for part in item["content"] if part["type"] == "output_text")
    assert text == whole_text


def test_todays_route_body_method_jobs(app):
    """Today's worker-vllm job shape: any route with its body (and method); the body's model
    defaults to the served one."""
    [models] = run_job(app, {"route": "/v1/models"})
    assert [m["id"] for m in models["data"]] == ["tiny"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    [chat] = run_job(app, {"route": "/v1/chat/completions", "body": body, "method": "POST"})
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny"
    streamed = run_job(app, {"route": "/openai/v1/chat/completions", "body": {**body, "stream": True}})
    events = "".join(streamed)
    assert events.startswith("data: ") and events.rstrip().endswith("data: [DONE]")
