"""RunPod worker-vllm's native job format, as pure functions: native input -> an OpenAI request for
vLLM's own serving layer, and that request's event stream -> worker-vllm's output batches.

Input (the job's `input`): `prompt` | `messages`, `apply_chat_template`, `sampling_params`, `stream`,
`max_batch_size`, `min_batch_size`, `batch_size_growth_factor`; or `openai_route` + `openai_input`;
or today's worker-vllm's `route` + `body` (+ `method`). Other top-level keys are ignored with a
warning, as worker-vllm ignores them.
Output: `{"choices": [{"tokens": [text, ...]}], "usage": {"input": N, "output": M}}` per batch; an
OpenAI-shaped job streams its SSE events in batches of the same sizes (raw text, or parsed chunks).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from configs.settings import Settings
from deployments.ingress.errors import ClientError
from deployments.ingress.routes import JOB_ROUTES, engine_route
from deployments.transport.sse import event_payload, split_sse

# The seed's documented sampling defaults (RunPod's vLLM guide, "Sampling Parameters"): a job that
# doesn't set one gets these, never the model's generation config (which vLLM's OpenAI layer would
# apply). worker-vllm's code later sent max_tokens 100; the documented 16 is the contract.
SEED_SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
# Beam search takes only these of them (vLLM's beam search has its own temperature handling).
BEAM_SEARCH_DEFAULTS = ("max_tokens",)

NATIVE_KEYS = frozenset({
    "prompt", "messages", "apply_chat_template", "sampling_params", "stream", "model",
    "max_batch_size", "min_batch_size", "batch_size_growth_factor",
})
BATCH_KEYS = frozenset({"max_batch_size", "min_batch_size", "batch_size_growth_factor"})
OPENAI_KEYS = frozenset({"openai_route", "openai_input"}) | BATCH_KEYS
# Today's worker-vllm (its `vllm serve` wrapper): any route of the server, with its body and method.
ROUTE_KEYS = frozenset({"route", "body", "method"}) | BATCH_KEYS
DEFAULT_OPENAI_ROUTE = "/v1/chat/completions"  # an `openai_input` without `openai_route`
# Request fields the native format sets itself: not sampling parameters.
RESERVED_FIELDS = frozenset({
    "messages", "prompt", "model", "stream", "stream_options", "return_token_ids", "request_id",
})


class NativeInputError(ClientError):
    """A job input the caller must fix; `param` names the field."""


class GenerationFailed(Exception):
    """The engine reported an error mid-stream."""


@dataclass(frozen=True)
class BatchPolicy:
    """worker-vllm's streaming batches: first `min_size` tokens, growing by `growth` up to `max_size`."""

    max_size: int
    min_size: int
    growth: float

    def sizes(self) -> Iterator[int]:
        """1, 3, 9, 27, 50, 50, ... for 50/1/3. A fractional size rounds up (worker-vllm compared
        its token counter against the float, which is the same thing)."""
        size = float(self.min_size)
        while True:
            yield max(1, math.ceil(size))
            size = min(size * self.growth, float(self.max_size))


@dataclass(frozen=True)
class NativeJob:
    kind: str  # "generate" (native output) or "openai" (OpenAI objects / SSE)
    method: str
    route: str
    body: dict[str, Any] | None
    stream: bool
    n: int = 1
    candidates: int = 1  # best_of: candidates sampled, of which the n best are returned
    batch: BatchPolicy = field(default_factory=lambda: BatchPolicy(50, 1, 3))
    chat: bool = True
    whole: bool = False  # the engine answers whole (beam search), not as a stream
    warnings: tuple[str, ...] = ()  # ignored input keys, for the job's log


def _expect(value: Any, kind: type | tuple[type, ...], param: str, what: str) -> Any:
    # bool is an int in Python; a number field must not take true/false.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise NativeInputError(f"`{param}` must be {what}, got {value!r}", param)
    if not isinstance(value, kind):
        raise NativeInputError(f"`{param}` must be {what}, got {type(value).__name__}", param)
    return value


def batch_defaults(settings: Settings) -> BatchPolicy:
    """DEFAULT_BATCH_SIZE / DEFAULT_MIN_BATCH_SIZE / DEFAULT_BATCH_SIZE_GROWTH_FACTOR: a job's batches
    unless it sets its own."""
    return BatchPolicy(
        settings.DEFAULT_BATCH_SIZE, settings.DEFAULT_MIN_BATCH_SIZE, settings.DEFAULT_BATCH_SIZE_GROWTH_FACTOR
    )


def batch_policy(job_input: dict[str, Any], defaults: BatchPolicy) -> BatchPolicy:
    max_size = _expect(job_input.get("max_batch_size", defaults.max_size), int, "max_batch_size", "an integer")
    min_size = _expect(job_input.get("min_batch_size", defaults.min_size), int, "min_batch_size", "an integer")
    growth = _expect(
        job_input.get("batch_size_growth_factor", defaults.growth), (int, float), "batch_size_growth_factor", "a number"
    )
    if max_size < 1:
        raise NativeInputError("`max_batch_size` must be >= 1", "max_batch_size")
    if not 1 <= min_size <= max_size:
        raise NativeInputError("`min_batch_size` must be between 1 and max_batch_size", "min_batch_size")
    if growth < 1:
        raise NativeInputError("`batch_size_growth_factor` must be >= 1", "batch_size_growth_factor")
    return BatchPolicy(max_size, min_size, float(growth))


def normalize_job(
    job_input: Any,
    *,
    served_model: str,
    defaults: BatchPolicy,
    chat_fields: frozenset[str],
    completion_fields: frozenset[str],
) -> NativeJob:
    """A RunPod job's input -> the OpenAI request that answers it. Raises NativeInputError naming
    the field for anything invalid: nothing is silently ignored."""
    if not isinstance(job_input, dict):
        raise NativeInputError("the job's `input` must be a JSON object", "input")
    if "openai_route" in job_input or "openai_input" in job_input:
        return _normalize_openai_job(job_input, defaults)
    if "route" in job_input:
        return _normalize_route_job(job_input, defaults, served_model)
    warnings = ignored_keys(job_input, NATIVE_KEYS)
    stream = _expect(job_input.get("stream", False), bool, "stream", "a boolean")
    apply_template = _expect(job_input.get("apply_chat_template", False), bool, "apply_chat_template", "a boolean")
    policy = batch_policy(job_input, defaults)

    # With several models (MODELS) a job names one by `model`, as an OpenAI request does.
    model = _expect(job_input.get("model", served_model), str, "model", "a model name (a string)")
    body: dict[str, Any] = {"model": model}
    if job_input.get("messages") is not None:
        messages = _expect(job_input["messages"], list, "messages", "a list of messages")
        if not messages:
            raise NativeInputError("`messages` must not be empty", "messages")
        for i, message in enumerate(messages):
            _expect(message, dict, f"messages[{i}]", "an object with `role` and `content`")
            if not isinstance(message.get("role"), str):
                raise NativeInputError(f"`messages[{i}].role` must be a string", f"messages[{i}].role")
        body["messages"] = messages
        chat = True
    elif job_input.get("prompt") is not None:
        prompt = _expect(job_input["prompt"], str, "prompt", "a string")
        chat = apply_template
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
    else:
        raise NativeInputError("the input needs `prompt` or `messages`", "prompt")

    sampling = job_input.get("sampling_params")
    sampling = {} if sampling is None else _expect(sampling, dict, "sampling_params", "an object")
    allowed = chat_fields if chat else completion_fields
    n, candidates = 1, None
    params: dict[str, Any] = {}
    for name, value in sampling.items():
        param = f"sampling_params.{name}"
        if name == "best_of":
            if value is not None:
                candidates = _expect(value, int, param, "an integer")
                if candidates < 1:
                    raise NativeInputError("`best_of` must be >= 1", param)
            continue
        if name == "early_stopping":
            # vLLM 0.32's beam search always runs every beam to its end; only the default is honest.
            if value not in (False, None):
                raise NativeInputError(
                    "`early_stopping` other than false is not supported by vLLM 0.32's beam search", param
                )
            continue
        if name in RESERVED_FIELDS or name not in allowed:
            raise NativeInputError(f"unknown sampling parameter `{name}`", param)
        params[name] = value
    if "n" in params:
        n = _expect(params["n"], int, "sampling_params.n", "an integer")
        if n < 1:
            raise NativeInputError("`n` must be >= 1", "sampling_params.n")
    if candidates is None:
        candidates = n
    if candidates < n:
        raise NativeInputError(f"`best_of` ({candidates}) must be >= n ({n})", "sampling_params.best_of")
    if candidates > n:
        if params.get("use_beam_search"):
            raise NativeInputError("`best_of` does not combine with use_beam_search", "sampling_params.best_of")
        # Sample every candidate with the sampled tokens' log-probabilities, to keep the n best.
        params["n"] = candidates
        params["logprobs"] = True if chat else 0
        if chat:
            params.pop("top_logprobs", None)
    beam = bool(params.get("use_beam_search"))
    for name, value in SEED_SAMPLING_DEFAULTS.items():
        if name not in params and (not beam or name in BEAM_SEARCH_DEFAULTS):
            params[name] = value
    body.update(params)
    # Per-choice token counts, exact even when a delta carries several tokens. No logprobs are asked
    # for to split such a delta into each token's text: they cost ~12 % of the tokens per second of
    # a stream at concurrency 1 here (the worker computes them, and the engine replica decodes and
    # serializes one more object per token). A job that asks for logprobs gets that split.
    body["return_token_ids"] = True
    if params.get("use_beam_search"):
        # vLLM's beam search answers only whole (it can't stream): its beams arrive at the end.
        body["stream"] = False
    else:
        # The ingress consumes a stream even for non-streaming jobs (they get one batch at the end).
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    route = "/v1/chat/completions" if chat else "/v1/completions"
    return NativeJob("generate", "POST", route, body, stream, n, candidates, policy, chat, whole=beam,
                     warnings=warnings)


def ignored_keys(job_input: dict[str, Any], known: frozenset[str]) -> tuple[str, ...]:
    """worker-vllm ignores top-level keys it doesn't know; so do we, but say so in the job's log
    (a misspelt `sampling_param` must not pass unnoticed)."""
    return tuple(
        f"ignored unknown input field `{key}` (known: {', '.join(sorted(known))})"
        for key in sorted(set(job_input) - known, key=str)
    )


def _job_route(value: Any, param: str) -> str:
    route = _expect(value, str, param, "a string")
    route = engine_route("/" + route.strip("/"))
    if route not in JOB_ROUTES:
        raise NativeInputError(f"unknown {param} `{value}` (expected one of {', '.join(JOB_ROUTES)})", param)
    return route


def _openai_body(method: str, body: Any, param: str) -> dict[str, Any] | None:
    if method == "POST":
        return _expect(body, dict, param, "an object (the OpenAI request body)")
    if body not in (None, {}):
        _expect(body, dict, param, "an object")
    return None


def _openai_job(route: str, method: str, body: dict[str, Any] | None, job_input: dict[str, Any],
                defaults: BatchPolicy, warnings: tuple[str, ...]) -> NativeJob:
    stream = bool(body.get("stream", False)) if body is not None else False
    return NativeJob("openai", method, route, body, stream, batch=batch_policy(job_input, defaults),
                     warnings=warnings)


def _normalize_openai_job(job_input: dict[str, Any], defaults: BatchPolicy) -> NativeJob:
    """worker-vllm's `openai_route` + `openai_input` (an input alone goes to chat completions)."""
    route = _job_route(job_input.get("openai_route", DEFAULT_OPENAI_ROUTE), "openai_route")
    method = JOB_ROUTES[route]
    body = _openai_body(method, job_input.get("openai_input"), "openai_input")
    return _openai_job(route, method, body, job_input, defaults, ignored_keys(job_input, OPENAI_KEYS))


def _normalize_route_job(job_input: dict[str, Any], defaults: BatchPolicy, served_model: str) -> NativeJob:
    """Today's worker-vllm's `route` + `body` (+ `method`, default POST with a body, else GET). As
    there, a body without `model` is for the served model."""
    route = _job_route(job_input["route"], "route")
    body = job_input.get("body")
    method = _expect(job_input.get("method") or ("POST" if body else "GET"), str, "method", "a string").upper()
    if method != JOB_ROUTES[route]:
        raise NativeInputError(f"`method` {method} does not serve `{route}`: it takes {JOB_ROUTES[route]}", "method")
    body = _openai_body(method, body, "body")
    if body is not None and "model" not in body:
        body = {"model": served_model, **body}
    return _openai_job(route, method, body, job_input, defaults, ignored_keys(job_input, ROUTE_KEYS))


# --- the event stream ---------------------------------------------------------------------------


class SseBatcher:
    """An OpenAI-shaped job's SSE stream -> worker-vllm's batches of 1, 3, 9, ... events (the job's
    BatchPolicy): with `raw` (RAW_OPENAI_OUTPUT, worker-vllm's default) each batch is the events' text
    (`data: {...}\\n\\n`, `data: [DONE]` included); otherwise a list of the parsed chunk objects."""

    def __init__(self, policy: BatchPolicy, raw: bool) -> None:
        self._sizes = policy.sizes()
        self._size = next(self._sizes)
        self._raw = raw
        self._buffer = b""
        self._batch: list[Any] = []

    def feed(self, part: bytes) -> list[str | list[dict[str, Any]]]:
        events, self._buffer = split_sse(self._buffer + part)
        return self._add(events)

    def finish(self) -> list[str | list[dict[str, Any]]]:
        """The last batch (and an event the stream ended without its blank line)."""
        rest, self._buffer = self._buffer, b""
        batches = self._add([rest] if rest.strip() else [])
        if self._batch:
            batches.append(self._take())
        return batches

    def _add(self, events: list[bytes]) -> list[str | list[dict[str, Any]]]:
        batches = []
        for event in events:
            if self._raw:
                self._batch.append(event.decode("utf-8") + "\n\n")
            elif (payload := event_payload(event)) is not None:
                self._batch.append(payload)
            else:
                continue
            if len(self._batch) >= self._size:
                batches.append(self._take())
                self._size = next(self._sizes)
        return batches

    def _take(self) -> str | list[dict[str, Any]]:
        batch, self._batch = self._batch, []
        return "".join(batch) if self._raw else batch


@dataclass
class _Choice:
    tokens: list[str] = field(default_factory=list)  # one entry per delta (one token each, normally)
    counts: list[int] = field(default_factory=list)  # tokens in each entry
    logprob: float = 0.0


class NativeAssembler:
    """Turns vLLM's OpenAI stream events into worker-vllm's output batches."""

    def __init__(self, job: NativeJob) -> None:
        self.job = job
        self.choices = [_Choice() for _ in range(job.candidates)]
        self.prompt_tokens = 0
        self.completion_tokens: int | None = None
        self._sizes = job.batch.sizes()
        self._threshold = next(self._sizes)
        self._sent = [0] * job.candidates  # entries of each choice already yielded
        self._buffered = job.candidates > job.n or not job.stream

    def _usage(self) -> dict[str, int]:
        output = self.completion_tokens
        if output is None:
            output = sum(sum(c.counts) for c in self.choices)
        return {"input": self.prompt_tokens, "output": output}

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in event:
            error = event["error"]
            raise GenerationFailed(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        usage = event.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens) or 0
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        for raw in event.get("choices") or []:
            index = raw.get("index", 0)
            if not 0 <= index < len(self.choices):
                continue
            choice = self.choices[index]
            if self.job.chat:
                # A stream event carries a delta; a whole response (beam search) a message.
                text = (raw.get("delta") or raw.get("message") or {}).get("content") or ""
                logprobs = (raw.get("logprobs") or {}).get("content") or []
                choice.logprob += sum(item.get("logprob") or 0.0 for item in logprobs)
                token_texts = [item.get("token") or "" for item in logprobs]
            else:
                text = raw.get("text") or ""
                logprobs = raw.get("logprobs") or {}
                choice.logprob += sum(lp or 0.0 for lp in logprobs.get("token_logprobs") or [])
                token_texts = logprobs.get("tokens") or []
            count = len(raw.get("token_ids") or [])
            if count == 0 and not text:
                continue  # the role chunk, or a finish marker without a token
            if self.job.whole:
                # A whole response (beam search): its text is one entry of all its tokens.
                choice.tokens.append(text)
                choice.counts.append(max(count, 1))
                continue
            for piece in split_delta(text, count, token_texts):
                choice.tokens.append(piece)
                choice.counts.append(1)
        return [] if self._buffered else self._ready_batches()

    def _pending(self, index: int) -> int:
        return sum(self.choices[index].counts[self._sent[index]:])

    def _ready_batches(self) -> list[dict[str, Any]]:
        batches = []
        while self.job.n and max(self._pending(i) for i in range(self.job.n)) >= self._threshold:
            batches.append(self._take_batch(limit=self._threshold))
            self._threshold = next(self._sizes)
        return batches

    def _take_batch(self, limit: int | None) -> dict[str, Any]:
        """Up to `limit` tokens of each choice not yet sent (all of them when limit is None)."""
        out = []
        for i in range(self.job.n):
            choice, start = self.choices[i], self._sent[i]
            end, taken = start, 0
            while end < len(choice.tokens) and (limit is None or taken < limit):
                taken += choice.counts[end]
                end += 1
            out.append({"tokens": choice.tokens[start:end]})
            self._sent[i] = end
        return {"choices": out, "usage": self._usage()}

    def finish(self) -> list[dict[str, Any]]:
        if self.job.candidates > self.job.n:
            self._select_best()
        if not self.job.stream:
            return [{
                "choices": [{"tokens": ["".join(c.tokens)]} for c in self.choices[: self.job.n]],
                "usage": self._usage(),
            }]
        batches = self._ready_batches()
        if any(self._pending(i) for i in range(self.job.n)):
            batches.append(self._take_batch(limit=None))
        return batches

    def _select_best(self) -> None:
        """best_of: keep the n candidates with the highest cumulative log-probability."""
        best = heapq.nlargest(self.job.n, range(len(self.choices)), key=lambda i: self.choices[i].logprob)
        self.choices = [self.choices[i] for i in best]
        self._sent = [0] * len(self.choices)


def split_delta(text: str, count: int, token_texts: list[str]) -> list[str]:
    """One entry per token of a delta the engine handed over at once (a slow consumer gets several
    tokens merged): the tokens' own texts (from their logprobs, when the job asked for them) when
    they spell the delta, else the delta in the first entry and empty ones after it, so counts and
    the joined text stay exact."""
    if count <= 1:
        return [text]
    if len(token_texts) == count and "".join(token_texts) == text:
        return list(token_texts)
    return [text] + [""] * (count - 1)
