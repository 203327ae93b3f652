"""The ingress's Prometheus metrics (exported through Ray's metrics agent) and its one log line per
request: request id, route, status, tokens, latency; JSON when LOG_FORMAT=json; never prompt text."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from configs.settings import LogFormat

logger = logging.getLogger("ray.serve")

# Histogram buckets in seconds: TTFT lives in milliseconds on a GPU, seconds under load.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
# Generated tokens in a usage object: chat and completions name them completion_tokens, the
# Responses API output_tokens.
_USAGE = re.compile(rb'"(?:completion|output)_tokens":\s*(\d+)')


class RouterMetrics:
    def __init__(self, application: str = "") -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "llm_router_requests_total", "Requests the ingress answered, by route and status.",
            tag_keys=("route", "status", "application"),
        )
        self.rejections = Counter(
            "llm_router_rejections_total", "Requests rejected before reaching an engine, by reason.",
            tag_keys=("reason", "application"),
        )
        self.ttft = Histogram(
            "llm_router_ttft_seconds", "Time to the first response bytes (first token of a stream).",
            boundaries=LATENCY_BUCKETS, tag_keys=("route", "application"),
        )
        self.latency = Histogram(
            "llm_router_request_latency_seconds", "End-to-end request latency.",
            boundaries=LATENCY_BUCKETS, tag_keys=("route", "application"),
        )
        self.in_flight = Gauge("llm_router_in_flight_requests", "Generation requests holding a slot.",
                               tag_keys=("application",))
        self.queued = Gauge("llm_router_queued_requests", "Requests waiting for a slot.", tag_keys=("application",))
        # Several apps (or clusters' dashboards) may share one scrape: every series names its app.
        for metric in (self.requests, self.rejections, self.ttft, self.latency, self.in_flight, self.queued):
            metric.set_default_tags({"application": application})


@dataclass
class RequestRecord:
    """What one request's log line and metrics report."""

    request_id: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    first_byte: float | None = None
    tokens: int | None = None
    chunks: int = 0

    def saw_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()

    def count_stream_part(self, part: bytes) -> None:
        self.chunks += part.count(b"data: ")
        if b'"usage"' in part:
            found = _USAGE.findall(part)
            if found:
                self.tokens = int(found[-1])

    def read_usage(self, body: bytes) -> None:
        found = _USAGE.findall(body)
        if found:
            self.tokens = int(found[-1])


def format_line(record: RequestRecord, log_format: LogFormat, now: float | None = None) -> str:
    end = time.perf_counter() if now is None else now
    fields = {
        "request_id": record.request_id,
        "route": record.route,
        "status": record.status,
        "tokens": record.tokens,
        "chunks": record.chunks or None,
        "latency_ms": round((end - record.started) * 1000, 1),
        "ttft_ms": round((record.first_byte - record.started) * 1000, 1) if record.first_byte else None,
    }
    if log_format is LogFormat.JSON:
        return json.dumps(fields)
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)


class RequestObserver:
    """Ends a request's record: one log line and the metrics, in one place."""

    def __init__(self, log_format: LogFormat, metrics: RouterMetrics | None, limiter: Any = None) -> None:
        self.log_format = log_format
        self.metrics = metrics
        self.limiter = limiter

    def finish(self, record: RequestRecord) -> None:
        now = time.perf_counter()
        logger.info(format_line(record, self.log_format, now))
        if self.metrics is None:
            return
        self.metrics.requests.inc(tags={"route": record.route, "status": str(record.status)})
        self.metrics.latency.observe(now - record.started, tags={"route": record.route})
        if record.first_byte is not None:
            self.metrics.ttft.observe(record.first_byte - record.started, tags={"route": record.route})
        self.update_gauges()

    def update_gauges(self) -> None:
        if self.metrics is not None and self.limiter is not None:
            self.metrics.in_flight.set(self.limiter.in_flight)
            self.metrics.queued.set(self.limiter.queued)

    def rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejections.inc(tags={"reason": reason})
