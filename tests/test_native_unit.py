"""Pure tests of the RunPod worker-vllm native format: input normalization, batching, SSE parsing.

No Ray, Serve or engine: vLLM's protocol modules are imported only for their request field sets.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from deployments.ingress.errors import ClientError
from deployments.runpod_format.native import (
    SEED_SAMPLING_DEFAULTS,
    BatchPolicy,
    GenerationFailed,
    NativeAssembler,
    NativeInputError,
    NativeJob,
    SseBatcher,
    normalize_job,
)
from deployments.transport.sse import event_name, event_payload, iter_events, last_event, split_sse

CHAT_FIELDS = frozenset(ChatCompletionRequest.model_fields)
COMPLETION_FIELDS = frozenset(CompletionRequest.model_fields)
DEFAULTS = BatchPolicy(50, 1, 3)
MODEL = "served-model"

# worker-vllm's seed table of sampling parameters, with a valid value each.
SEED_PARAMS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "stop": ["\n\n", "END"],
    "stop_token_ids": [2, 7],
    "ignore_eos": True,
    "max_tokens": 33,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
}


def norm(job_input: Any, defaults: BatchPolicy = DEFAULTS) -> NativeJob:
    return normalize_job(
        job_input,
        served_model=MODEL,
        defaults=defaults,
        chat_fields=CHAT_FIELDS,
        completion_fields=COMPLETION_FIELDS,
    )


def norm_error(job_input: Any) -> NativeInputError:
    with pytest.raises(NativeInputError) as info:
        norm(job_input)
    return info.value


# --- BatchPolicy ---------------------------------------------------------------------------------


def first(policy: BatchPolicy, count: int) -> list[int]:
    return list(itertools.islice(policy.sizes(), count))


def test_batch_sizes_grow_geometrically_to_the_max():
    assert first(BatchPolicy(50, 1, 3), 8) == [1, 3, 9, 27, 50, 50, 50, 50]


def test_batch_sizes_fractional_growth_rounds_up():
    # 1, 1.5, 2.25, 3.375, 5.06, 7.59, min(11.39, 10) -> ceil each.
    assert first(BatchPolicy(10, 1, 1.5), 9) == [1, 2, 3, 4, 6, 8, 10, 10, 10]


def test_batch_sizes_min_equals_max_is_constant():
    assert first(BatchPolicy(7, 7, 3), 5) == [7] * 5
    assert first(BatchPolicy(1, 1, 1), 5) == [1] * 5


def test_batch_sizes_growth_one_stays_at_min():
    assert first(BatchPolicy(50, 4, 1), 4) == [4, 4, 4, 4]


# --- normalize_job: native generation jobs --------------------------------------------------------


def test_field_sets_are_real():
    assert {"messages", "max_tokens", "top_k"} <= CHAT_FIELDS
    assert {"prompt", "max_tokens", "top_k"} <= COMPLETION_FIELDS


def test_messages_go_to_the_chat_route():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    job = norm({"messages": messages})
    assert (job.kind, job.method, job.route, job.chat) == ("generate", "POST", "/v1/chat/completions", True)
    assert job.body["messages"] == messages
    assert job.body["model"] == MODEL
    assert "prompt" not in job.body
    assert job.stream is False
    assert (job.n, job.candidates) == (1, 1)
    assert job.batch == DEFAULTS
    # The router always consumes a stream with per-chunk usage and token ids.
    assert job.body["stream"] is True
    assert job.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert job.body["return_token_ids"] is True


def test_prompt_goes_to_the_completions_route():
    job = norm({"prompt": "Once upon a time", "stream": True})
    assert (job.route, job.chat, job.stream) == ("/v1/completions", False, True)
    assert job.body["prompt"] == "Once upon a time"
    assert "messages" not in job.body
    assert job.body["stream"] is True


def test_prompt_with_apply_chat_template_becomes_one_user_message():
    job = norm({"prompt": "hello", "apply_chat_template": True})
    assert (job.route, job.chat) == ("/v1/chat/completions", True)
    assert job.body["messages"] == [{"role": "user", "content": "hello"}]
    assert "prompt" not in job.body


@pytest.mark.parametrize("job_input", [
    {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    {"prompt": "hi", "stream": True},
])
def test_streaming_jobs_ask_for_no_logprobs_of_their_own(job_input):
    # Logprobs cost engine time on every token; token counts come from the token ids.
    assert "logprobs" not in norm(job_input).body


@pytest.mark.parametrize(("job_input", "asked"), [
    ({"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"logprobs": True}}, True),
    ({"prompt": "hi", "sampling_params": {"logprobs": 2}}, 2),
])
def test_a_job_that_asks_for_logprobs_gets_them(job_input, asked):
    assert norm({**job_input, "stream": True}).body["logprobs"] == asked


def test_messages_override_prompt():
    messages = [{"role": "user", "content": "from messages"}]
    job = norm({"prompt": "from prompt", "messages": messages})
    assert job.route == "/v1/chat/completions"
    assert job.body["messages"] == messages
    assert "prompt" not in job.body


# The seed's "Sampling Parameters" table: the defaults a job gets for what it doesn't set.
SEED_DEFAULTS: dict[str, Any] = {
    "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
}


def test_sampling_defaults_are_the_seeds():
    assert SEED_SAMPLING_DEFAULTS == SEED_DEFAULTS
    for job_input in ({"prompt": "x"}, {"messages": [{"role": "user", "content": "x"}]}):
        body = norm(job_input).body
        for name, value in SEED_DEFAULTS.items():
            assert body[name] == value, name
    assert norm({"prompt": "x", "sampling_params": {"max_tokens": 5}}).body["max_tokens"] == 5
    # What the job sets wins; the rest stay the seed's (not the model's generation config).
    body = norm({"prompt": "x", "sampling_params": {"temperature": 0.0, "top_k": 5}}).body
    assert (body["temperature"], body["top_k"], body["top_p"]) == (0.0, 5, 1.0)


def test_beam_search_gets_only_the_max_tokens_default():
    body = norm({"prompt": "x", "sampling_params": {"use_beam_search": True, "n": 2}}).body
    assert body["max_tokens"] == 16
    assert "temperature" not in body and "top_p" not in body


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_every_seed_sampling_param_passes_through(chat: bool):
    job_input: dict[str, Any] = {"sampling_params": dict(SEED_PARAMS)}
    if chat:
        job_input["messages"] = [{"role": "user", "content": "x"}]
    else:
        job_input["prompt"] = "x"
    job = norm(job_input)
    for name, value in SEED_PARAMS.items():
        assert job.body[name] == value, name
    assert job.chat is chat


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_each_seed_param_is_accepted_alone(name: str):
    job = norm({"prompt": "x", "sampling_params": {name: SEED_PARAMS[name]}})
    assert job.body[name] == SEED_PARAMS[name]


def test_null_or_missing_sampling_params_are_empty():
    assert norm({"prompt": "x", "sampling_params": None}).body["max_tokens"] == 16
    assert norm({"prompt": "x", "sampling_params": {}}).body["max_tokens"] == 16


def test_best_of_above_n_samples_candidates_chat():
    job = norm({
        "messages": [{"role": "user", "content": "x"}],
        "sampling_params": {"n": 2, "best_of": 4, "top_logprobs": 3},
    })
    assert (job.n, job.candidates) == (2, 4)
    assert job.body["n"] == 4
    assert job.body["logprobs"] is True
    assert "top_logprobs" not in job.body
    assert "best_of" not in job.body


def test_best_of_above_n_samples_candidates_completion():
    job = norm({"prompt": "x", "sampling_params": {"best_of": 3}})
    assert (job.n, job.candidates) == (1, 3)
    assert job.body["n"] == 3
    assert job.body["logprobs"] == 0
    assert job.body["logprobs"] is not False
    assert "best_of" not in job.body


def test_best_of_equal_to_n_changes_nothing():
    job = norm({"prompt": "x", "sampling_params": {"n": 2, "best_of": 2}})
    assert (job.n, job.candidates) == (2, 2)
    assert job.body["n"] == 2
    assert "logprobs" not in job.body


def test_best_of_below_n_is_an_error():
    error = norm_error({"prompt": "x", "sampling_params": {"n": 3, "best_of": 2}})
    assert error.param == "sampling_params.best_of"
    assert isinstance(error, ClientError)


def test_best_of_with_beam_search_is_an_error():
    error = norm_error({"prompt": "x", "sampling_params": {"best_of": 3, "use_beam_search": True}})
    assert error.param == "sampling_params.best_of"


@pytest.mark.parametrize("value", [0, -1, "3", 2.5, True])
def test_best_of_bad_values(value: Any):
    assert norm_error({"prompt": "x", "sampling_params": {"best_of": value}}).param == "sampling_params.best_of"


@pytest.mark.parametrize("value", [0, "2", True])
def test_n_bad_values(value: Any):
    assert norm_error({"prompt": "x", "sampling_params": {"n": value}}).param == "sampling_params.n"


def test_early_stopping_true_is_an_error():
    error = norm_error({"prompt": "x", "sampling_params": {"early_stopping": True}})
    assert error.param == "sampling_params.early_stopping"
    assert "early_stopping" in str(error)


@pytest.mark.parametrize("value", [False, None])
def test_early_stopping_false_is_accepted(value: Any):
    job = norm({"prompt": "x", "sampling_params": {"early_stopping": value, "use_beam_search": True}})
    assert "early_stopping" not in job.body
    assert job.body["use_beam_search"] is True


def test_unknown_sampling_param_is_named():
    error = norm_error({"prompt": "x", "sampling_params": {"temperature": 0.1, "frobnicate": 1}})
    assert error.param == "sampling_params.frobnicate"
    assert "frobnicate" in str(error)


def test_chat_only_param_is_unknown_for_completions():
    # top_logprobs is a chat-request field; a plain prompt goes to /v1/completions.
    assert "top_logprobs" not in COMPLETION_FIELDS
    error = norm_error({"prompt": "x", "sampling_params": {"top_logprobs": 2}})
    assert error.param == "sampling_params.top_logprobs"


@pytest.mark.parametrize("name", ["model", "stream", "messages", "prompt", "stream_options", "return_token_ids",
                                  "request_id"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_reserved_fields_in_sampling_params_are_errors(name: str, chat: bool):
    job_input: dict[str, Any] = {"sampling_params": {name: "x"}}
    if chat:
        job_input["messages"] = [{"role": "user", "content": "x"}]
    else:
        job_input["prompt"] = "x"
    error = norm_error(job_input)
    assert error.param == f"sampling_params.{name}"


def test_no_prompt_or_messages_is_an_error():
    assert norm_error({}).param == "prompt"
    assert norm_error({"sampling_params": {"temperature": 0}}).param == "prompt"
    assert norm_error({"prompt": None, "messages": None}).param == "prompt"


@pytest.mark.parametrize(
    ("job_input", "param"),
    [
        ({"prompt": 42}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"messages": "hello"}, "messages"),
        ({"messages": {"role": "user", "content": "x"}}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hello"]}, "messages[0]"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "ok"}, {"role": 3, "content": "x"}]}, "messages[1].role"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "apply_chat_template": "yes"}, "apply_chat_template"),
        ({"prompt": "x", "sampling_params": "temperature=0"}, "sampling_params"),
        ({"prompt": "x", "sampling_params": [["temperature", 0]]}, "sampling_params"),
        ({"prompt": "x", "sampling_params": []}, "sampling_params"),
        ({"prompt": "x", "sampling_params": ""}, "sampling_params"),
        ({"prompt": "x", "sampling_params": False}, "sampling_params"),
        ({"prompt": "x", "sampling_params": 0}, "sampling_params"),
        ({"prompt": "x", "max_batch_size": True}, "max_batch_size"),
        ({"prompt": "x", "max_batch_size": "50"}, "max_batch_size"),
        ({"prompt": "x", "max_batch_size": 2.5}, "max_batch_size"),
        ({"prompt": "x", "max_batch_size": 0}, "max_batch_size"),
        ({"prompt": "x", "min_batch_size": False}, "min_batch_size"),
        ({"prompt": "x", "min_batch_size": 0}, "min_batch_size"),
        ({"prompt": "x", "min_batch_size": 10, "max_batch_size": 5}, "min_batch_size"),
        ({"prompt": "x", "batch_size_growth_factor": 0.5}, "batch_size_growth_factor"),
        ({"prompt": "x", "batch_size_growth_factor": "3"}, "batch_size_growth_factor"),
        ({"prompt": "x", "batch_size_growth_factor": True}, "batch_size_growth_factor"),
    ],
)
def test_wrong_types_name_the_field(job_input: dict[str, Any], param: str):
    error = norm_error(job_input)
    assert error.param == param
    assert isinstance(error, ClientError)


def test_unknown_top_level_field_is_ignored_with_a_warning():
    """worker-vllm ignores top-level keys it doesn't know; the job runs and its log names the key."""
    job = norm({"prompt": "x", "temprature": 0.5})
    assert "temprature" not in job.body and job.body["temperature"] == 1.0
    assert len(job.warnings) == 1 and "`temprature`" in job.warnings[0]
    assert norm({"prompt": "x"}).warnings == ()


@pytest.mark.parametrize("job_input", [None, "hello", ["prompt", "x"], 3])
def test_input_not_a_dict_is_an_error(job_input: Any):
    assert norm_error(job_input).param == "input"


def test_per_request_batch_fields_override_defaults():
    job = norm({"prompt": "x", "max_batch_size": 8, "min_batch_size": 2, "batch_size_growth_factor": 1.5})
    assert job.batch == BatchPolicy(8, 2, 1.5)
    assert first(job.batch, 5) == [2, 3, 5, 7, 8]
    # Only one field given: the others come from the defaults.
    assert norm({"prompt": "x", "max_batch_size": 10}).batch == BatchPolicy(10, 1, 3.0)
    assert norm({"prompt": "x"}, defaults=BatchPolicy(20, 2, 2)).batch == BatchPolicy(20, 2, 2.0)
    # An integer growth factor is accepted and stored as a float.
    assert norm({"prompt": "x", "batch_size_growth_factor": 2}).batch.growth == 2.0


# --- normalize_job: openai_route jobs -------------------------------------------------------------


def test_openai_route_models_is_a_get_without_body():
    job = norm({"openai_route": "/v1/models"})
    assert (job.kind, job.method, job.route, job.body, job.stream) == ("openai", "GET", "/v1/models", None, False)
    # An empty openai_input for a GET route is tolerated and dropped.
    assert norm({"openai_route": "/v1/models", "openai_input": {}}).body is None


def test_openai_route_chat_is_a_post_with_the_stream_flag():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    job = norm({"openai_route": "/v1/chat/completions", "openai_input": body})
    assert (job.kind, job.method, job.route, job.stream) == ("openai", "POST", "/v1/chat/completions", True)
    assert job.body == body
    job = norm({"openai_route": "/v1/chat/completions", "openai_input": {**body, "stream": False}})
    assert job.stream is False
    job = norm({"openai_route": "/v1/chat/completions", "openai_input": {"messages": body["messages"]}})
    assert job.stream is False


@pytest.mark.parametrize("route", ["/openai/v1/completions", "openai/v1/completions", "/v1/completions/",
                                   "v1/completions"])
def test_openai_route_forms_are_normalized(route: str):
    job = norm({"openai_route": route, "openai_input": {"prompt": "x"}})
    assert (job.method, job.route) == ("POST", "/v1/completions")


def test_openai_route_batch_fields_override_defaults():
    job = norm({"openai_route": "/v1/completions", "openai_input": {"prompt": "x"}, "max_batch_size": 4})
    assert job.batch == BatchPolicy(4, 1, 3.0)


@pytest.mark.parametrize(("route", "engine_route"), [
    ("/score", "/score"), ("/v1/score", "/score"), ("/openai/v1/score", "/score"),
    ("/rerank", "/rerank"), ("/v1/rerank", "/rerank"), ("v2/rerank", "/rerank"),
    ("/classify", "/classify"), ("/pooling", "/pooling"), ("/v1/embeddings", "/v1/embeddings"),
])
def test_openai_route_pooling_routes_go_to_vllms_own_name(route: str, engine_route: str):
    job = norm({"openai_route": route, "openai_input": {"query": "q", "documents": ["d"]}})
    assert (job.method, job.route, job.stream) == ("POST", engine_route, False)


@pytest.mark.parametrize("route", ["/v2/score", "/v2/models", "/openai/score", "/", 42])
def test_unknown_openai_route_is_an_error(route: Any):
    assert norm_error({"openai_route": route, "openai_input": {}}).param == "openai_route"


@pytest.mark.parametrize("openai_input", [None, "prompt", ["x"]])
def test_post_route_needs_an_openai_input_object(openai_input: Any):
    job_input = {"openai_route": "/v1/chat/completions"}
    if openai_input is not None:
        job_input["openai_input"] = openai_input
    assert norm_error(job_input).param == "openai_input"


def test_get_route_rejects_a_non_object_input():
    assert norm_error({"openai_route": "/v1/models", "openai_input": "x"}).param == "openai_input"


def test_openai_route_ignores_native_fields_beside_it_with_a_warning():
    job = norm({"openai_route": "/v1/completions", "openai_input": {"prompt": "x"}, "prompt": "y"})
    assert job.body == {"prompt": "x"}
    assert len(job.warnings) == 1 and "`prompt`" in job.warnings[0]


def test_openai_input_without_a_route_is_a_chat_completion():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    job = norm({"openai_input": body})
    assert (job.kind, job.method, job.route, job.body) == ("openai", "POST", "/v1/chat/completions", body)


# --- normalize_job: today's worker-vllm `route` + `body` (+ `method`) jobs -----------------------


def test_route_job_with_a_body_is_a_post_for_the_served_model():
    job = norm({"route": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}],
                                                          "stream": True}})
    assert (job.kind, job.method, job.route, job.stream) == ("openai", "POST", "/v1/chat/completions", True)
    assert job.body["model"] == MODEL
    # A body naming its model keeps it (a LoRA adapter, say).
    assert norm({"route": "/v1/completions", "body": {"model": "other", "prompt": "x"}}).body["model"] == "other"


def test_route_job_without_a_body_is_a_get():
    job = norm({"route": "/v1/models"})
    assert (job.method, job.route, job.body) == ("GET", "/v1/models", None)
    assert norm({"route": "/openai/v1/models", "method": "get"}).method == "GET"


@pytest.mark.parametrize(("job_input", "param"), [
    ({"route": "/v1/models", "method": "POST", "body": {"x": 1}}, "method"),
    ({"route": "/v1/chat/completions", "method": "GET"}, "method"),
    ({"route": "/v1/chat/completions", "body": "x"}, "body"),
    ({"route": "/v1/nope", "body": {}}, "route"),
    ({"route": 3}, "route"),
])
def test_route_job_errors_name_the_field(job_input: dict[str, Any], param: str):
    assert norm_error(job_input).param == param


def test_route_job_batches_like_openai_route_jobs():
    job = norm({"route": "/v1/completions", "body": {"prompt": "x"}, "max_batch_size": 4, "extra": 1})
    assert job.batch == BatchPolicy(4, 1, 3.0)
    assert len(job.warnings) == 1 and "`extra`" in job.warnings[0]


# --- SseBatcher: OpenAI-shaped job streams in worker-vllm's batches -------------------------------


def sse_stream(count: int) -> bytes:
    return b"".join(b'data: {"i": %d}\n\n' % i for i in range(count)) + b"data: [DONE]\n\n"


def run_batcher(policy: BatchPolicy, raw: bool, stream: bytes, cut: int) -> list[Any]:
    batcher = SseBatcher(policy, raw)
    parts = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    return [batch for part in parts for batch in batcher.feed(part)] + batcher.finish()


@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_raw_batches_are_whole_events_in_growing_sizes(cut: int):
    """RAW_OPENAI_OUTPUT (worker-vllm's default): strings of whole SSE events, 1, 3, 9, ... events
    each, `data: [DONE]` in the last; however the bytes were cut."""
    batches = run_batcher(BatchPolicy(50, 1, 3), True, sse_stream(20), cut)
    assert [b.count("data:") for b in batches] == [1, 3, 9, 8]
    assert all(b.endswith("\n\n") for b in batches)
    assert "".join(batches).encode() == sse_stream(20)


@pytest.mark.parametrize("cut", [1, 1000])
def test_parsed_batches_are_lists_of_chunks_without_done(cut: int):
    batches = run_batcher(BatchPolicy(4, 2, 2), False, sse_stream(11), cut)
    assert [len(b) for b in batches] == [2, 4, 4, 1]
    assert [chunk["i"] for b in batches for chunk in b] == list(range(11))


def test_parsed_batches_read_named_events():
    """Responses and Messages streams carry an `event:` line before each `data:`."""
    stream = b'event: response.created\ndata: {"type": "response.created"}\n\n' \
             b'event: response.completed\ndata: {"type": "response.completed"}\n\n'
    batches = run_batcher(BatchPolicy(50, 50, 1), False, stream, 5)
    assert batches == [[{"type": "response.created"}, {"type": "response.completed"}]]
    raw = run_batcher(BatchPolicy(50, 50, 1), True, stream, 5)
    assert raw == [stream.decode()]


# --- NativeAssembler -------------------------------------------------------------------------------


def chat_event(text: str, index: int = 0, token_ids: list[int] | None = None, completion_tokens: int | None = None,
               logprob: float | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": {"content": text}, "token_ids": token_ids or [5]}
    if logprob is not None:
        choice["logprobs"] = {"content": [{"token": text, "logprob": logprob, "bytes": None, "top_logprobs": []}]}
    event: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}
    if completion_tokens is not None:
        event["usage"] = {"prompt_tokens": 7, "completion_tokens": completion_tokens,
                          "total_tokens": 7 + completion_tokens}
    return event


def completion_event(text: str, index: int = 0, completion_tokens: int | None = None,
                     logprob: float | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": text, "token_ids": [5]}
    if logprob is not None:
        choice["logprobs"] = {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": None,
                              "text_offset": [0]}
    event: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}
    if completion_tokens is not None:
        event["usage"] = {"prompt_tokens": 7, "completion_tokens": completion_tokens,
                          "total_tokens": 7 + completion_tokens}
    return event


ROLE_CHUNK = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
              "usage": {"prompt_tokens": 7, "completion_tokens": 0}}


def chat_job(stream: bool = True, **sampling: Any) -> NativeJob:
    return norm({"messages": [{"role": "user", "content": "x"}], "stream": stream, "sampling_params": sampling})


def completion_job(stream: bool = True, **sampling: Any) -> NativeJob:
    return norm({"prompt": "x", "stream": stream, "sampling_params": sampling})


def run(assembler: NativeAssembler, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    batches = []
    for event in events:
        batches.extend(assembler.feed(event))
    batches.extend(assembler.finish())
    return batches


def token_counts(batches: list[dict[str, Any]], choice: int = 0) -> list[int]:
    return [len(b["choices"][choice]["tokens"]) for b in batches]


def hundred_chat_events() -> list[dict[str, Any]]:
    events = [ROLE_CHUNK]
    events += [chat_event(f"t{i} ", completion_tokens=i + 1) for i in range(100)]
    events.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 100}})
    return events


def test_streamed_chat_batches_follow_the_schedule():
    batches = run(NativeAssembler(chat_job()), hundred_chat_events())
    assert token_counts(batches) == [1, 3, 9, 27, 50, 10]
    # Each batch's usage: the prompt, and the latest completion_tokens reported when it was cut.
    assert [b["usage"] for b in batches] == [
        {"input": 7, "output": n} for n in (1, 4, 13, 40, 90, 100)
    ]
    tokens = [t for b in batches for t in b["choices"][0]["tokens"]]
    assert tokens == [f"t{i} " for i in range(100)]
    assert all(len(b["choices"]) == 1 for b in batches)


def test_streamed_completion_batches_follow_the_schedule():
    events = [completion_event("x", completion_tokens=i + 1) for i in range(100)]
    batches = run(NativeAssembler(completion_job()), events)
    assert token_counts(batches) == [1, 3, 9, 27, 50, 10]
    assert batches[-1]["usage"] == {"input": 7, "output": 100}
    assert "".join(t for b in batches for t in b["choices"][0]["tokens"]) == "x" * 100


def test_batches_are_yielded_as_soon_as_full():
    assembler = NativeAssembler(chat_job())
    assert assembler.feed(ROLE_CHUNK) == []  # the role chunk is not a token
    assert token_counts(assembler.feed(chat_event("a", completion_tokens=1))) == [1]
    assert assembler.feed(chat_event("b", completion_tokens=2)) == []
    assert assembler.feed(chat_event("c", completion_tokens=3)) == []
    assert token_counts(assembler.feed(chat_event("d", completion_tokens=4))) == [3]
    assert token_counts(assembler.finish()) == []
    assembler.feed(chat_event("e", completion_tokens=5))
    assert [b["choices"][0]["tokens"] for b in assembler.finish()] == [["e"]]


def test_role_chunk_is_not_a_token():
    assembler = NativeAssembler(chat_job())
    assert assembler.feed(ROLE_CHUNK) == []
    assert assembler.finish() == []
    # Non-streaming: only the role chunk -> one batch with an empty text.
    assembler = NativeAssembler(chat_job(stream=False))
    assembler.feed(ROLE_CHUNK)
    assert assembler.finish() == [{"choices": [{"tokens": [""]}], "usage": {"input": 7, "output": 0}}]


def test_usage_without_usage_events_counts_tokens():
    events = [{"choices": [{"index": 0, "delta": {"content": "ab"}, "token_ids": [1, 2]}]},
              {"choices": [{"index": 0, "delta": {"content": "c"}, "token_ids": [3]}]}]
    batches = run(NativeAssembler(chat_job(stream=False)), events)
    assert batches == [{"choices": [{"tokens": ["abc"]}], "usage": {"input": 0, "output": 3}}]


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("per_part", [2, 3, 7, 40])
def test_several_events_per_part_give_the_same_batches(per_part: int):
    events = hundred_chat_events()
    expected = run(NativeAssembler(chat_job()), events)
    # The engine's byte stream, several whole events per part (as a slow consumer receives them).
    frames = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
    parts = [b"".join(frames[i:i + per_part]) for i in range(0, len(frames), per_part)]
    assembler = NativeAssembler(chat_job())
    batches = []
    for event in iter_events(parts):
        batches.extend(assembler.feed(event))
    batches.extend(assembler.finish())
    assert batches == expected
    assert token_counts(batches) == [1, 3, 9, 27, 50, 10]


def test_a_delta_with_two_token_ids_counts_two_tokens():
    assembler = NativeAssembler(chat_job())
    assert token_counts(assembler.feed(chat_event("a", completion_tokens=1))) == [1]
    # Threshold 3: a two-token delta plus a one-token delta fill it, one entry per token.
    assert assembler.feed(chat_event("bc", token_ids=[6, 7], completion_tokens=3)) == []
    batches = assembler.feed(chat_event("d", completion_tokens=4))
    assert [b["choices"][0]["tokens"] for b in batches] == [["bc", "", "d"]]
    assert batches[0]["usage"] == {"input": 7, "output": 4}


def test_a_merged_delta_splits_on_its_tokens_logprob_texts():
    assembler = NativeAssembler(chat_job())
    event = chat_event("bcd", token_ids=[6, 7, 8], completion_tokens=3)
    event["choices"][0]["logprobs"] = {"content": [{"token": t, "logprob": -1.0} for t in ("b", "c", "d")]}
    assembler.feed(chat_event("a", completion_tokens=1))
    batches = assembler.feed(event)
    assert [b["choices"][0]["tokens"] for b in batches] == [["b", "c", "d"]]


def test_two_token_deltas_alone_fill_batches_by_token_count():
    # 1 token first, then 2-token deltas: batches still hold exactly 1, 3, 9 tokens.
    events = [chat_event("a")] + [chat_event("xy", token_ids=[1, 2]) for _ in range(6)]
    batches = run(NativeAssembler(chat_job()), events)
    assert token_counts(batches) == [1, 3, 9]
    assert "".join(t for b in batches for t in b["choices"][0]["tokens"]) == "a" + "xy" * 6
    assert batches[-1]["usage"]["output"] == 13


def test_n2_interleaved_choices_share_batches():
    job = chat_job(n=2)
    assert (job.n, job.candidates) == (2, 2)
    events = []
    for i in range(40):
        events.append(chat_event(f"a{i}", index=0, completion_tokens=2 * i + 1))
        events.append(chat_event(f"b{i}", index=1, completion_tokens=2 * i + 2))
    batches = run(NativeAssembler(job), events)
    assert len(batches) > 1
    assert all(len(b["choices"]) == 2 for b in batches)
    assert [t for b in batches for t in b["choices"][0]["tokens"]] == [f"a{i}" for i in range(40)]
    assert [t for b in batches for t in b["choices"][1]["tokens"]] == [f"b{i}" for i in range(40)]
    # No batch carries more tokens of one choice than the schedule allows.
    for batch, size in zip(batches, DEFAULTS.sizes(), strict=False):
        assert all(len(c["tokens"]) <= size for c in batch["choices"])
    assert batches[-1]["usage"] == {"input": 7, "output": 80}


def test_n2_non_streaming_gives_both_texts():
    events = [chat_event("a", index=0), chat_event("B", index=1), chat_event("b", index=0), chat_event("C", index=1)]
    batches = run(NativeAssembler(chat_job(stream=False, n=2)), events)
    assert [b["choices"] for b in batches] == [[{"tokens": ["ab"]}, {"tokens": ["BC"]}]]


def test_non_streaming_gives_exactly_one_batch():
    assembler = NativeAssembler(chat_job(stream=False))
    for event in hundred_chat_events():
        assert assembler.feed(event) == []
    batches = assembler.finish()
    assert batches == [{"choices": [{"tokens": ["".join(f"t{i} " for i in range(100))]}],
                        "usage": {"input": 7, "output": 100}}]


def test_non_streaming_completion_gives_exactly_one_batch():
    events = [completion_event(c, completion_tokens=i + 1) for i, c in enumerate("hello")]
    batches = run(NativeAssembler(completion_job(stream=False)), events)
    assert batches == [{"choices": [{"tokens": ["hello"]}], "usage": {"input": 7, "output": 5}}]


def best_of_chat_events(texts: list[str], logprobs: list[list[float]]) -> list[dict[str, Any]]:
    events = [{"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(len(texts))]}]
    done = 0
    for step in range(max(len(t) for t in texts)):
        for i, text in enumerate(texts):
            if step < len(text):
                done += 1
                events.append(chat_event(text[step], index=i, completion_tokens=done, logprob=logprobs[i][step]))
    return events


def test_best_of_chat_non_streaming_picks_the_highest_logprob():
    job = chat_job(stream=False, best_of=3)
    assert (job.n, job.candidates) == (1, 3)
    # Sums: -3.0, -0.6, -1.2 -> candidate 1 wins, though candidate 0 has the best first token.
    texts = ["aaa", "bbb", "ccc"]
    logprobs = [[-0.1, -1.4, -1.5], [-0.2, -0.2, -0.2], [-0.4, -0.4, -0.4]]
    batches = run(NativeAssembler(job), best_of_chat_events(texts, logprobs))
    assert batches == [{"choices": [{"tokens": ["bbb"]}], "usage": {"input": 7, "output": 9}}]


def test_best_of_chat_streaming_emits_the_winner_on_the_schedule_after_finish():
    job = chat_job(stream=True, best_of=3)
    texts = ["a" * 20, "b" * 20, "c" * 20]
    logprobs = [[-1.0] * 20, [-0.5] * 20, [-0.1] * 20]  # candidate 2 wins
    assembler = NativeAssembler(job)
    for event in best_of_chat_events(texts, logprobs):
        assert assembler.feed(event) == []  # nothing is streamed before the winner is known
    batches = assembler.finish()
    assert token_counts(batches) == [1, 3, 9, 7]
    assert all(len(b["choices"]) == 1 for b in batches)
    assert "".join(t for b in batches for t in b["choices"][0]["tokens"]) == "c" * 20
    assert all(b["usage"] == {"input": 7, "output": 60} for b in batches)


def test_best_of_completion_picks_the_highest_summed_token_logprob():
    job = completion_job(stream=True, best_of=3)
    assert job.body["logprobs"] == 0
    events = []
    sums = {0: [-0.3, -0.3], 1: [-2.0, 0.0], 2: [-0.1, -0.1]}  # candidate 2 wins (-0.2)
    for step in range(2):
        for i in range(3):
            events.append(completion_event(f"{i}{step}", index=i, logprob=sums[i][step]))
    batches = run(NativeAssembler(job), events)
    assert [b["choices"][0]["tokens"] for b in batches] == [["20"], ["21"]]


def test_best_of_with_n2_keeps_the_two_best():
    job = completion_job(stream=False, n=2, best_of=4)
    events = [completion_event(f"c{i}", index=i, logprob=lp) for i, lp in enumerate([-3.0, -1.0, -4.0, -2.0])]
    batches = run(NativeAssembler(job), events)
    assert len(batches) == 1
    assert sorted(c["tokens"][0] for c in batches[0]["choices"]) == ["c1", "c3"]


def test_an_error_event_raises_generation_failed():
    assembler = NativeAssembler(chat_job())
    assembler.feed(chat_event("a", completion_tokens=1))
    with pytest.raises(GenerationFailed, match="^boom$"):
        assembler.feed({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})


def test_an_error_event_with_a_string_raises_generation_failed():
    with pytest.raises(GenerationFailed, match="bad thing"):
        NativeAssembler(completion_job()).feed({"error": "bad thing"})


def test_choices_out_of_range_are_ignored():
    batches = run(NativeAssembler(chat_job(stream=False)), [chat_event("a"), chat_event("z", index=5)])
    assert batches[0]["choices"] == [{"tokens": ["a"]}]


# --- split_sse / event_payload / iter_events -------------------------------------------------------


EVENTS = [
    {"choices": [{"index": 0, "delta": {"content": "é"}}]},
    {"choices": [{"index": 0, "delta": {"content": "日本"}}]},
    {"choices": [{"index": 0, "text": "naïve ☃ 🎉"}]},
    {"usage": {"prompt_tokens": 3, "completion_tokens": 4}},
]


def stream_bytes() -> bytes:
    return b"".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in EVENTS) + b"data: [DONE]\n\n"


def test_split_sse_keeps_the_incomplete_rest():
    events, rest = split_sse(b"data: 1\n\ndata: 2\n\ndata: 3")
    assert events == [b"data: 1", b"data: 2"]
    assert rest == b"data: 3"
    events, rest = split_sse(b"data: 1\n\n")
    assert (events, rest) == ([b"data: 1"], b"")
    assert split_sse(b"") == ([], b"")
    assert split_sse(b"\n\n\n\ndata: 1\n\n") == ([b"data: 1"], b"")


def test_event_payload():
    assert event_payload(b"data: {\"a\": 1}") == {"a": 1}
    assert event_payload(b"data:{\"a\": 1}") == {"a": 1}
    assert event_payload(b"  data: [DONE]  ") is None
    assert event_payload(b"data: [DONE]") is None
    assert event_payload("data: {\"t\": \"日本\"}".encode()) == {"t": "日本"}


def test_event_name_and_last_event():
    part = b"event: response.output_text.delta\ndata: {}\n\nevent: response.completed\ndata: {}\n\n"
    assert event_name(last_event(part)) == b"response.completed"
    assert event_name(b"\r\nevent:message_stop\ndata: {}") == b"message_stop"
    assert event_name(b"data: [DONE]") is None
    # A last event without its blank line still counts; an empty part has none.
    assert last_event(b"data: 1\n\nevent: error\ndata: {}") == b"event: error\ndata: {}"
    assert last_event(b"") is None and last_event(b"\n\n") is None


def test_multibyte_text_is_really_multibyte():
    raw = stream_bytes()
    assert "é".encode() in raw and "日本".encode() in raw  # not \u-escaped: cuts can fall inside a char


def test_iter_events_whole_stream():
    assert list(iter_events([stream_bytes()])) == EVENTS


def test_iter_events_one_byte_at_a_time():
    raw = stream_bytes()
    assert list(iter_events(raw[i:i + 1] for i in range(len(raw)))) == EVENTS


@pytest.mark.parametrize("seed", range(20))
def test_iter_events_cut_at_arbitrary_positions(seed: int):
    import random

    raw = stream_bytes()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 12)))
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert b"".join(parts) == raw
    assert list(iter_events(parts)) == EVENTS


@pytest.mark.parametrize("char", ["é", "日", "本", "🎉"])
def test_iter_events_cut_inside_each_multibyte_char(char: str):
    raw = stream_bytes()
    start = raw.index(char.encode())
    for inside in range(1, len(char.encode())):
        cut = start + inside
        with pytest.raises(UnicodeDecodeError):
            raw[:cut].decode("utf-8")  # the cut really splits the character
        assert list(iter_events([raw[:cut], raw[cut:]])) == EVENTS


def test_iter_events_skips_done_and_leaves_a_trailing_partial_event():
    raw = sse([{"a": 1}]) + b"data: {\"b\""
    assert list(iter_events([raw])) == [{"a": 1}]
