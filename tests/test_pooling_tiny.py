"""vLLM's pooling routes through our router: the tiny Llama run as an embedding model (RUNNER and
CONVERT, as users set vLLM's options: `/v1/embeddings`, and `/score`, `/rerank`, `/pooling` by the
cosine of embeddings), and the same weights saved as a reranker checkpoint (a one-label sequence
classifier: `/score`, `/rerank`, `/classify`); and what a model answers on a route its tasks don't
serve. Two engine starts of their own."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.apps import TestApps
from tests.tiny_model import tiny_reranker_path


def _app_args(model: Path, served_name: str, **more: object) -> dict[str, object]:
    return {"MODEL_NAME": str(model), "OPENAI_SERVED_MODEL_NAME_OVERRIDE": served_name, "MAX_MODEL_LEN": 512, **more}


@pytest.fixture(scope="module")
def embed_app(apps: TestApps, tiny_model: Path):
    # The causal LM run as an embedding model, as users set vLLM's --runner/--convert. MAX_MESSAGES
    # is a conversation's limit: an embeddings `input` list is not one.
    yield apps.start("embed", _app_args(tiny_model, "tiny-embed", RUNNER="pooling", CONVERT="embed", MAX_MESSAGES=8))
    apps.stop("embed")  # the other modules' apps keep the memory and the cores


@pytest.fixture(scope="module")
def rerank_app(apps: TestApps, tiny_model: Path):
    # A reranker checkpoint (a sequence classifier with one label, as bge-reranker ships): vLLM
    # finds the task from its architecture, with no setting.
    yield apps.start("rerank", _app_args(tiny_reranker_path(tiny_model.parent), "tiny-rerank"))
    apps.stop("rerank")


def _post(app, path: str, body: dict) -> httpx.Response:
    with app.http() as http:
        return http.post(path, json=body)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


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
    # The Messages API says the same in Anthropic's envelope.
    with pytest.raises(anthropic.NotFoundError) as err:
        embed_app.anthropic().messages.create(model="tiny-embed", max_tokens=2,
                                              messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["type"] == "not_found_error" and "/v1/messages" in err.value.body["error"]["message"]
    # Both apps keep serving.
    assert tiny_app.client().completions.create(model="tiny", prompt="fox", max_tokens=2).usage.completion_tokens
    assert embed_app.client().embeddings.create(model="tiny-embed", input="fox").data


DOCUMENTS = ["a lazy dog sleeps", "fox", "the quick brown fox jumps"]


def test_score_on_an_embedding_model_is_the_cosine_of_its_embeddings(embed_app):
    embedded = embed_app.client().embeddings.create(model="tiny-embed", input=["fox", *DOCUMENTS])
    vectors = [d.embedding for d in embedded.data]
    expected = [_cosine(vectors[0], v) for v in vectors[1:]]
    assert math.isclose(expected[1], 1.0, rel_tol=1e-4) and expected[0] < 0.99
    for path in ("/score", "/v1/score", "/openai/v1/score"):
        for pair in ({"text_1": "fox", "text_2": DOCUMENTS}, {"queries": "fox", "documents": DOCUMENTS}):
            response = _post(embed_app, path, {"model": "tiny-embed", **pair})
            assert response.status_code == 200, response.text
            result = response.json()
            assert [d["index"] for d in result["data"]] == [0, 1, 2]
            scores = [d["score"] for d in result["data"]]
            close = [math.isclose(s, e, rel_tol=1e-3, abs_tol=1e-4) for s, e in zip(scores, expected, strict=True)]
            assert all(close), (scores, expected)
            assert result["usage"]["prompt_tokens"] > 3


def test_rerank_orders_the_documents_by_their_scores(embed_app):
    scores = [d["score"] for d in _post(embed_app, "/score", {"model": "tiny-embed", "text_1": "fox",
                                                                "text_2": DOCUMENTS}).json()["data"]]
    ranked = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    answers = []
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/openai/v1/rerank"):
        response = _post(embed_app, path, {"model": "tiny-embed", "query": "fox", "documents": DOCUMENTS})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["index"] for r in results] == ranked
        assert [r["document"]["text"] for r in results] == [DOCUMENTS[i] for i in ranked]
        assert all(math.isclose(r["relevance_score"], scores[r["index"]], rel_tol=1e-4) for r in results)
        answers.append(results)
    assert all(a == answers[0] for a in answers)  # the aliases are the same route
    top = _post(embed_app, "/rerank", {"model": "tiny-embed", "query": "fox", "documents": DOCUMENTS, "top_n": 1})
    assert [r["index"] for r in top.json()["results"]] == [1]  # the document that is the query itself


def test_pooling_returns_the_models_own_output(embed_app):
    response = _post(embed_app, "/pooling", {"model": "tiny-embed", "input": ["fox", "dog"]})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    embedding = embed_app.client().embeddings.create(model="tiny-embed", input="fox").data[0].embedding
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["data"]) == len(embedding)
    assert math.isclose(_cosine(data[0]["data"], embedding), 1.0, rel_tol=1e-4)


def test_bad_scoring_requests_are_400_envelopes(embed_app):
    cases = [
        ("/score", {"model": "tiny-embed", "text_1": "fox"}, None),  # no second side
        ("/rerank", {"model": "tiny-embed", "query": "fox", "documents": DOCUMENTS, "top_n": -1}, None),
        # A list where vLLM types an object: refused by the router before vLLM sees it.
        ("/rerank", {"model": "tiny-embed", "query": "fox", "documents": DOCUMENTS, "chat_template_kwargs": []},
         "chat_template_kwargs"),
    ]
    for path, body, param in cases:
        response = _post(embed_app, path, body)
        assert response.status_code == 400, (path, body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param:
            assert error["param"] == param
    assert _post(embed_app, "/score", {"model": "tiny-embed", "text_1": "a", "text_2": "a"}).status_code == 200


def test_cross_encoder_scores_reranks_and_classifies(rerank_app):
    """A one-label classifier reads each (query, document) pair as one input: its scores are its
    own (random weights here), so they are checked for agreement between the routes."""
    response = _post(rerank_app, "/v1/score", {"model": "tiny-rerank", "text_1": "fox", "text_2": DOCUMENTS})
    assert response.status_code == 200, response.text
    scores = [d["score"] for d in response.json()["data"]]
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores) and len(set(scores)) == 3, scores
    reranked = _post(rerank_app, "/rerank", {"model": "tiny-rerank", "query": "fox", "documents": DOCUMENTS})
    results = reranked.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    assert all(math.isclose(r["relevance_score"], scores[r["index"]], rel_tol=1e-4, abs_tol=1e-6) for r in results)
    classified = _post(rerank_app, "/classify", {"model": "tiny-rerank", "input": ["fox", "dog"]})
    assert classified.status_code == 200, classified.text
    data = classified.json()["data"]
    assert [(d["index"], d["num_classes"], len(d["probs"])) for d in data] == [(0, 1, 1), (1, 1, 1)]
    # A cross-encoder has no embeddings, an embedding model no classifier: 404 envelopes naming the tasks.
    with pytest.raises(openai.NotFoundError) as err:
        rerank_app.client().embeddings.create(model="tiny-rerank", input="fox")
    assert "classify" in err.value.body["message"]


def test_scoring_routes_on_a_generating_model_are_404_envelopes(tiny_app):
    for path in ("/score", "/v1/rerank", "/classify", "/pooling"):
        response = _post(tiny_app, path, {"model": "tiny", "query": "fox", "documents": ["fox"]})
        assert response.status_code == 404, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "NotFoundError" and "generate" in error["message"]
    assert tiny_app.client().completions.create(model="tiny", prompt="fox", max_tokens=2).usage.completion_tokens


def test_rerank_as_a_runpod_openai_route_job(embed_app):
    native = embed_app.router().options(stream=True).native
    body = {"model": "tiny-embed", "query": "fox", "documents": DOCUMENTS}
    [result] = list(native.remote({"openai_route": "/v1/rerank", "openai_input": body}, uuid.uuid4().hex))
    direct = _post(embed_app, "/rerank", body).json()
    assert result["results"] == direct["results"]


def test_embeddings_as_a_runpod_openai_route_job(embed_app):
    native = embed_app.router().options(stream=True).native
    [result] = list(native.remote({"openai_route": "/v1/embeddings",
                                   "openai_input": {"model": "tiny-embed", "input": "fox"}}, uuid.uuid4().hex))
    direct = embed_app.client().embeddings.create(model="tiny-embed", input="fox")
    assert result["object"] == "list" and result["data"][0]["embedding"] == direct.data[0].embedding


def test_schemathesis_finds_no_server_error_on_pooling_routes(embed_app, tmp_path):
    """vLLM's pooling request models (unions of several each) as the schema declares them, fuzzed
    on each route once, aliases aside (the coverage phase of the EmbeddingRequest union alone
    outlasts any budget here, so it is left out)."""
    done = embed_app.schemathesis(tmp_path, "--include-path-regex", "^(/v1/embeddings|/score|/rerank|/pooling)$",
                                  max_examples=40, phases="examples,fuzzing", max_time=60)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Tested: 4\n" in done.stdout, done.stdout[-3000:]
    assert embed_app.client().embeddings.create(model="tiny-embed", input="fox").data
