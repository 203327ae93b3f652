"""`make serve`'s readiness wait, against a real HTTP server on loopback (no Ray, no engine)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.serve_main import health_url, wait_until_healthy


class ScriptedHealth(BaseHTTPRequestHandler):
    """Answers GET /health with the next status of the server's script, then its last one forever."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        server.paths.append(self.path)
        status = server.script[min(len(server.paths), len(server.script)) - 1]
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHealth)
    server.paths, server.script = [], [200]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url_of(server: ThreadingHTTPServer) -> str:
    return health_url("127.0.0.1", server.server_address[1])


def test_waits_through_haproxys_own_answers_until_200(scripted):
    scripted.script = [404, 503, 500, 200]
    assert wait_until_healthy(url_of(scripted), 10, threading.Event(), poll_s=0.01) is None
    assert scripted.paths == ["/health"] * 4


def test_gives_up_with_the_last_answer(scripted):
    scripted.script = [503]
    started = time.monotonic()
    assert wait_until_healthy(url_of(scripted), 0.3, threading.Event(), poll_s=0.01) == "HTTP 503"
    assert time.monotonic() - started < 5
    assert len(scripted.paths) >= 2


def test_no_listener_yet_is_an_answer_too():
    with ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHealth) as closed:
        port = closed.server_address[1]
    assert "refused" in wait_until_healthy(health_url("127.0.0.1", port), 0.2, threading.Event(), poll_s=0.01)


def test_stop_ends_the_wait(scripted):
    scripted.script = [503]
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert wait_until_healthy(url_of(scripted), 60, stop, poll_s=0.05) == "HTTP 503"
    assert time.monotonic() - started < 5


def test_a_proxy_in_the_environment_is_not_used(scripted, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert wait_until_healthy(url_of(scripted), 5, threading.Event(), poll_s=0.01) is None


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:8000/health"),
    ("0.0.0.0", "http://127.0.0.1:8000/health"),
    ("::", "http://[::1]:8000/health"),
    ("10.1.2.3", "http://10.1.2.3:8000/health"),
])
def test_health_url_reaches_a_wildcard_bind_on_loopback(host, url):
    assert health_url(host, 8000) == url
