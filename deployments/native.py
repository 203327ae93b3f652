"""RunPod worker-vllm's native job format, as pure functions: native input -> an OpenAI request for
vLLM's own serving layer, and that request's event stream -> worker-vllm's output batches.

Input (the job's `input`): `prompt` | `messages`, `apply_chat_template`, `sampling_params`, `stream`,
`max_batch_size`, `min_batch_size`, `batch_size_growth_factor`; or `openai_route` + `openai_input`.
Output: `{"choices": [{"tokens": [text, ...]}], "usage": {"input": N, "output": M}}` per batch.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import ClientError
from deployments.routes import JOB_ROUTES, engine_route

# worker-vllm sent 100 when max_tokens was absent (vLLM's own default of 16 bit its users).
DEFAULT_MAX_TOKENS = 100

NATIVE_KEYS = frozenset({
    "prompt", "messages", "apply_chat_template", "sampling_params", "stream",
    "max_batch_size", "min_batch_size", "batch_size_growth_factor",
})
OPENAI_KEYS = frozenset({
    "openai_route", "openai_input", "max_batch_size", "min_batch_size", "batch_size_growth_factor",
})
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


def _expect(value: Any, kind: type | tuple[type, ...], param: str, what: str) -> Any:
    # bool is an int in Python; a number field must not take true/false.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise NativeInputError(f"`{param}` must be {what}, got {value!r}", param)
    if not isinstance(value, kind):
        raise NativeInputError(f"`{param}` must be {what}, got {type(value).__name__}", param)
    return value


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
    if "openai_route" in job_input:
        return _normalize_openai_job(job_input, defaults)
    unknown = sorted(set(job_input) - NATIVE_KEYS)
    if unknown:
        raise NativeInputError(
            f"unknown input field `{unknown[0]}` (expected: {', '.join(sorted(NATIVE_KEYS | {'openai_route'}))})",
            unknown[0],
        )
    stream = _expect(job_input.get("stream", False), bool, "stream", "a boolean")
    apply_template = _expect(job_input.get("apply_chat_template", False), bool, "apply_chat_template", "a boolean")
    policy = batch_policy(job_input, defaults)

    body: dict[str, Any] = {"model": served_model}
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
    params: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
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
        # The router consumes a stream even for non-streaming jobs (they get one batch at the end).
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    route = "/v1/chat/completions" if chat else "/v1/completions"
    return NativeJob("generate", "POST", route, body, stream, n, candidates, policy, chat,
                     whole=bool(params.get("use_beam_search")))


def _normalize_openai_job(job_input: dict[str, Any], defaults: BatchPolicy) -> NativeJob:
    unknown = sorted(set(job_input) - OPENAI_KEYS)
    if unknown:
        raise NativeInputError(f"unknown input field `{unknown[0]}` beside `openai_route`", unknown[0])
    route = _expect(job_input["openai_route"], str, "openai_route", "a string")
    route = engine_route("/" + route.strip("/"))
    if route not in JOB_ROUTES:
        raise NativeInputError(
            f"unknown openai_route `{job_input['openai_route']}` (expected one of {', '.join(JOB_ROUTES)})",
            "openai_route",
        )
    method = JOB_ROUTES[route]
    body = job_input.get("openai_input")
    if method == "POST":
        body = _expect(body, dict, "openai_input", "an object (the OpenAI request body)")
    elif body not in (None, {}):
        _expect(body, dict, "openai_input", "an object")
    stream = bool(body.get("stream", False)) if isinstance(body, dict) else False
    return NativeJob("openai", method, route, body if method == "POST" else None, stream,
                     batch=batch_policy(job_input, defaults))


# --- the event stream ---------------------------------------------------------------------------


def split_sse(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Whole SSE events (without their blank-line terminator) and the incomplete rest."""
    *events, rest = buffer.split(b"\n\n")
    return [e for e in events if e.strip()], rest


def event_payload(event: bytes) -> dict[str, Any] | None:
    """The JSON of one `data:` event; None for `[DONE]`."""
    text = event.decode("utf-8").strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    if text == "[DONE]":
        return None
    return json.loads(text)


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


def iter_events(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Events of a byte stream cut anywhere (for pure tests; the router does the same async)."""
    buffer = b""
    for chunk in chunks:
        events, buffer = split_sse(buffer + chunk)
        for event in events:
            payload = event_payload(event)
            if payload is not None:
                yield payload
