"""Before the app is registered, Serve's HAProxy answers every path itself: with the start-up gate
(scripts/haproxy-startup-gate) that answer is a 503 error envelope with Retry-After, never Ray's
text/plain 404. Proved on a Serve instance of its own (no engine: the window is Serve's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from configs.ray_env import STARTUP_GATE, private_haproxy_ports, startup_gate_env
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
    answers["after"] = get("/v1/models")
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
    status, _, body = answers["after"]
    assert (status, json.loads(body)) == (200, {"path": "/v1/models"})
