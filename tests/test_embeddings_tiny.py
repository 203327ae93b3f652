"""`/v1/embeddings` on a pooling model (the tiny Llama run as vLLM's `--runner pooling --convert
embed`, set as users set vLLM options: RUNNER and CONVERT), with the official client; and what a
model answers on a route its tasks don't serve. One engine start of its own."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from pathlib import Path

import openai
import pytest

from tests.apps import TestApps


@pytest.fixture(scope="module")
def embed_app(apps: TestApps, tiny_model: Path):
    app = apps.start("embed", {
        "MODEL_NAME": str(tiny_model),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "tiny-embed",
        "MAX_MODEL_LEN": 512,
        "RUNNER": "pooling",
        "CONVERT": "embed",
        "MAX_MESSAGES": 8,  # a conversation's limit: an embeddings `input` list is not one
    })
    yield app
    apps.stop("embed")  # the other modules' apps keep the memory and the cores


def test_embeddings_on_both_prefixes(embed_app):
    vectors = []
    for prefix in ("/v1", "/openai/v1"):
        result = embed_app.client(prefix).embeddings.create(model="tiny-embed", input=["hello world", "fox"])
        assert [d.index for d in result.data] == [0, 1]
        assert result.usage.prompt_tokens > 2
        vectors.append([d.embedding for d in result.data])
    first, second = vectors[0]
    assert len(first) == len(second) > 8 and first != second
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-3)  # normalized, as vLLM's embed does
    assert vectors[0] == vectors[1]  # the same request on either prefix


def test_an_input_list_is_a_batch_or_token_ids_not_a_conversation(embed_app):
    """MAX_MESSAGES (8 here) limits a Responses `input` list; an embeddings `input` list is a batch
    of texts or one prompt's token ids, and passes."""
    client = embed_app.client()
    ids = list(range(5, 45))
    result = client.embeddings.create(model="tiny-embed", input=ids)
    assert len(result.data) == 1 and result.usage.prompt_tokens == len(ids)
    batch = client.embeddings.create(model="tiny-embed", input=[f"text {i}" for i in range(12)])
    assert [d.index for d in batch.data] == list(range(12))


def test_a_route_the_model_does_not_serve_is_a_404_envelope(embed_app, tiny_app):
    with pytest.raises(openai.NotFoundError) as err:
        embed_app.client().chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["type"] == "NotFoundError" and "/v1/chat/completions" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        tiny_app.client().embeddings.create(model="tiny", input="hi")
    assert "/v1/embeddings" in err.value.body["message"] and "generate" in err.value.body["message"]
    # Both apps keep serving.
    assert tiny_app.client().completions.create(model="tiny", prompt="fox", max_tokens=2).usage.completion_tokens
    assert embed_app.client().embeddings.create(model="tiny-embed", input="fox").data


def test_embeddings_as_a_runpod_openai_route_job(embed_app):
    native = embed_app.router().options(stream=True).native
    [result] = list(native.remote({"openai_route": "/v1/embeddings",
                                   "openai_input": {"model": "tiny-embed", "input": "fox"}}, uuid.uuid4().hex))
    direct = embed_app.client().embeddings.create(model="tiny-embed", input="fox")
    assert result["object"] == "list" and result["data"][0]["embedding"] == direct.data[0].embedding


def test_schemathesis_finds_no_server_error_on_embeddings(embed_app, tmp_path):
    """vLLM's EmbeddingRequest (a union of five request models) as the schema declares it, fuzzed
    (the coverage phase of that union alone outlasts any budget here, so it is left out)."""
    st = Path(sys.executable).parent / "st"
    done = subprocess.run(
        [str(st), "run", f"{embed_app.base_url}/openapi.json", "--url", embed_app.base_url,
         "--checks", "not_a_server_error", "--max-examples", "40", "--workers", "1", "--seed", "7",
         "--phases", "examples,fuzzing", "--max-time", "60", "--no-color", "--generation-database", "none",
         "--include-path-regex", "embeddings"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Tested: 2\n" in done.stdout, done.stdout[-3000:]
    assert embed_app.client().embeddings.create(model="tiny-embed", input="fox").data
